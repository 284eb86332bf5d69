"""batch_norm_stats, batch_norm_relu, batch_norm_relu_backward: the cpu/cuda extension and reference
backends against float64.

The Triton kernels are tested in tests/test_batch_norm_relu_triton.py with the same checks
(imported from here). Inputs are random with a per-channel offset and scale (never zeros, never
centred), expected values are float64 computations on the very values the backend saw, and out=
buffers are NaN-poisoned so that a kernel writing outside its channel slice, or leaving part of
it unwritten, fails. The training-mode gradient is checked against autograd through
torch.relu(F.batch_norm(..., training=True)).
"""

import pytest
import torch
import torch.nn.functional as F

from ranet_fast import _extension
from ranet_fast.ops import (batch_norm_relu, batch_norm_relu_backward, batch_norm_relu_backward_reference,
                            batch_norm_relu_reference, batch_norm_stats, batch_norm_stats_reference)
from op_testing import COMPILED_AND_REFERENCE, TOLERANCE_BY_DTYPE, backends, needs_extension, seed_of

EPS = 1e-5

# Outputs stored in the input dtype, against float64 on the same input values: float32 differs
# by accumulation-order rounding, the half types by the rounding of the result.
TOLERANCES = {**TOLERANCE_BY_DTYPE, torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# Per-channel results (statistics, parameter gradients) are in the accumulation dtype, so only its
# rounding counts, whatever the input dtype.
ACCUMULATION_TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}

SHAPES = {
    "odd": (2, 3, 7, 5),
    "ranet-16": (4, 16, 8, 8),
    # More channels than one CUDA (32) or Triton (64) tile holds.
    "wide": (2, 70, 3, 5),
    "one-channel": (3, 1, 4, 6),
    "pixels-only-batch": (5, 6, 1, 1),
    # More pixels than one CUDA split (4096) and one Triton tile.
    "many-pixels": (1, 3, 64, 70),
    # Several programs along both grid axes of every Triton kernel, the last ones ragged: 70
    # channels over tiles of 64, 2310 pixels over the interpreter's tiles of 128 and splits of 8 tiles.
    "multi-tile": (2, 70, 33, 35),
}


def accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_input(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Normal values with a per-channel offset in [-1, 3] and scale in [0.5, 2]."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    offset = torch.rand(channels, generator=generator, dtype=torch.float64) * 4 - 1
    scale = torch.rand(channels, generator=generator, dtype=torch.float64) * 1.5 + 0.5
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale.view(1, -1, 1, 1)
    return (values + offset.view(1, -1, 1, 1)).to(dtype).to(device)


def random_parameters(channels, dtype=torch.float32, seed=0, device="cpu"):
    """BN weight (magnitude 0.5 to 1.5, either sign) and bias."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    weight = torch.where(torch.rand(channels, generator=generator, dtype=torch.float64) < 0.2, -weight, weight)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) * 0.5
    return weight.to(dtype).to(device), bias.to(dtype).to(device)


def batch_statistics(x):
    """(mean, invstd) of x from float64, rounded to the accumulation dtype, on x's device."""
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    acc = accumulation(x.dtype)
    return mean.to(acc).to(x.device), torch.rsqrt(var + EPS).to(acc).to(x.device)


def as_double(*tensors):
    return [t.detach().cpu().double() for t in tensors]


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.detach().cpu().double(), expected, equal_nan=True, **TOLERANCES[dtype])


def assert_sums_close(actual, expected, terms, dtype):
    """A sum over M terms: the error is bounded by a multiple of eps * sum(|term|) per channel."""
    bound = ACCUMULATION_TOLERANCES[accumulation(dtype)]["rtol"] * terms.abs().sum((0, 2, 3))
    error = (actual.detach().cpu().double() - expected).abs()
    assert bool((error <= bound).all()), f"error {error.tolist()} over bound {bound.tolist()}"


BACKENDS = backends(*COMPILED_AND_REFERENCE)


# ---------------------------------------------------------------------------
# Checks shared with the Triton tests: each takes the backend name and the device.
# ---------------------------------------------------------------------------


def check_stats(backend, device, shape, dtype, x=None):
    x = random_input(shape, dtype, seed_of("stats", shape, dtype), device) if x is None else x
    mean, var = batch_norm_stats(x, backend=backend)
    acc = accumulation(dtype)
    assert mean.dtype == var.dtype == acc and mean.device.type == var.device.type == torch.device(device).type
    expected_var, expected_mean = torch.var_mean(x.detach().cpu().double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.cpu().double(), expected_mean, **ACCUMULATION_TOLERANCES[acc])
    torch.testing.assert_close(var.cpu().double(), expected_var, **ACCUMULATION_TOLERANCES[acc])


def check_forward(backend, device, shape, dtype, relu=True, x=None):
    x = random_input(shape, dtype, seed_of("forward", shape, dtype), device) if x is None else x
    mean, invstd = batch_statistics(x)
    weight, bias = random_parameters(shape[1], torch.float32, seed_of("parameters", shape), device)
    y = batch_norm_relu(x, mean, invstd, weight, bias, relu=relu, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape and y.device.type == torch.device(device).type
    expected = batch_norm_relu_reference(*as_double(x, mean, invstd, weight, bias), relu=relu)
    if relu:
        assert bool((expected == 0).any()) and bool((expected > 0).any()), "the case must exercise ReLU"
    else:
        assert bool((expected < 0).any())
    assert_close(y, expected, dtype)
    return y


def check_backward(backend, device, shape, dtype, relu=True, x=None, grad_out=None):
    x = random_input(shape, dtype, seed_of("backward", shape, dtype), device) if x is None else x
    if grad_out is None:
        grad_out = random_input(shape, dtype, seed_of("grad_out", shape, dtype), device)
    mean, invstd = batch_statistics(x)
    weight, bias = random_parameters(shape[1], torch.float32, seed_of("parameters", shape), device)
    grad_x, grad_weight, grad_bias = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, relu=relu,
                                                              backend=backend)
    acc = accumulation(dtype)
    assert grad_x.dtype == dtype and grad_weight.dtype == grad_bias.dtype == acc
    assert grad_x.shape == x.shape and grad_weight.shape == grad_bias.shape == (shape[1],)
    x64, grad64, mean64, invstd64, weight64, bias64 = as_double(x, grad_out, mean, invstd, weight, bias)
    expected = batch_norm_relu_backward_reference(grad64, x64, mean64, invstd64, weight64, bias64, relu=relu)
    assert_close(grad_x, expected[0], dtype)
    # The terms of the two sums, for their error bounds.
    xhat = (x64 - mean64.view(1, -1, 1, 1)) * invstd64.view(1, -1, 1, 1)
    z = xhat * weight64.view(1, -1, 1, 1) + bias64.view(1, -1, 1, 1)
    dz = torch.where(z > 0, grad64, 0.0) if relu else grad64
    assert_sums_close(grad_weight, expected[1], dz * xhat, dtype)
    assert_sums_close(grad_bias, expected[2], dz, dtype)
    return grad_x


def check_matches_autograd(backend, device, relu):
    """The whole training step in float64: our statistics, forward and backward against autograd
    through eager BatchNorm (batch statistics) and ReLU."""
    shape = (3, 5, 6, 4)
    x = random_input(shape, torch.float64, seed_of("autograd", relu), device)
    weight, bias = random_parameters(shape[1], torch.float64, seed_of("autograd-parameters"), device)
    grad_out = random_input(shape, torch.float64, seed_of("autograd-grad"), device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=EPS)
    y = torch.relu(y) if relu else y
    expected = torch.autograd.grad(y, leaves, grad_out)
    mean, var = batch_norm_stats(x, backend=backend)
    invstd = torch.rsqrt(var + EPS)
    ours = batch_norm_relu(x, mean, invstd, weight, bias, relu=relu, backend=backend)
    torch.testing.assert_close(ours, y.detach(), rtol=1e-10, atol=1e-10)
    gradients = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, relu=relu, backend=backend)
    for name, actual, wanted in zip(("grad_x", "grad_weight", "grad_bias"), gradients, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


INPUT_LAYOUTS = ["nchw", "channels_last", "slice_nchw", "slice_channels_last", "strided"]


def in_layout(x, layout):
    """x's values in a memory arrangement; the surrounding memory is NaN, so reading it fails."""
    batch, channels, height, width = x.shape
    if layout == "nchw":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout in ("slice_nchw", "slice_channels_last"):
        # Channels [2, 2 + C) of a bigger buffer, as a layer's input or gradient inside a dense block.
        memory_format = torch.channels_last if layout == "slice_channels_last" else torch.contiguous_format
        buffer = torch.full((batch, channels + 5, height, width), float("nan"), dtype=x.dtype, device=x.device)
        buffer = buffer.contiguous(memory_format=memory_format)
        buffer[:, 2:2 + channels] = x
        return buffer[:, 2:2 + channels]
    if layout == "strided":
        # Every other column of a wider tensor, channels and height transposed in memory.
        wide = torch.full((batch, height, channels, 2 * width), float("nan"), dtype=x.dtype, device=x.device)
        view = wide.transpose(1, 2)[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(layout)


def check_input_layout(backend, device, layout, grad_layout, dtype=torch.float32):
    shape = SHAPES["odd"]
    x = random_input(shape, dtype, seed_of("layout", layout), device)
    strided = in_layout(x, layout)
    assert torch.equal(strided, x)
    check_stats(backend, device, shape, dtype, x=strided)
    y = check_forward(backend, device, shape, dtype, x=strided)
    grad_out = in_layout(random_input(shape, dtype, seed_of("layout-grad", layout), device), grad_layout)
    grad_x = check_backward(backend, device, shape, dtype, x=strided, grad_out=grad_out)
    channels_inner = layout in ("channels_last", "slice_channels_last")
    memory_format = torch.channels_last if channels_inner else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format) and grad_x.is_contiguous(memory_format=memory_format)


OUT_LAYOUTS = ["nchw", "channels_last", "slice", "strided"]


def _poisoned_out(layout, batch, channels, height, width, dtype, device):
    if layout == "nchw":
        return torch.full((batch, channels, height, width), float("nan"), dtype=dtype, device=device)
    if layout == "channels_last":
        return torch.full((batch, channels, height, width), float("nan"), dtype=dtype,
                          device=device).contiguous(memory_format=torch.channels_last)
    if layout == "slice":
        return torch.full((batch, channels + 2, height, width), float("nan"), dtype=dtype, device=device)[:, 1:-1]
    if layout == "strided":
        return torch.full((batch, channels, height, 2 * width), float("nan"), dtype=dtype, device=device)[..., ::2]
    raise ValueError(layout)


def check_out_slice(backend, device, layout, dtype=torch.float32, relu=True, shape_name="odd"):
    shape = SHAPES[shape_name]
    x = random_input(shape, dtype, seed_of("out", layout), device)
    mean, invstd = batch_statistics(x)
    weight, bias = random_parameters(shape[1], torch.float32, seed_of("out-parameters"), device)
    offset, channels = 2, shape[1] + 5
    out = _poisoned_out(layout, shape[0], channels, *shape[2:], dtype, device)
    returned = batch_norm_relu(x, mean, invstd, weight, bias, relu=relu, out=out, out_offset=offset, backend=backend)
    assert returned is out
    expected = batch_norm_relu_reference(*as_double(x, mean, invstd, weight, bias), relu=relu)
    assert_close(out[:, offset:offset + shape[1]], expected, dtype)
    outside = torch.cat([out[:, :offset], out[:, offset + shape[1]:]], dim=1)
    assert torch.isnan(outside).all(), "batch_norm_relu wrote outside its channel slice"


def check_small_batches(backend, device, batch):
    shape = (batch, 4, 3, 5)
    x = random_input(shape, torch.float32, seed_of("batch", batch), device)
    weight, bias = random_parameters(4, torch.float32, seed_of("batch-parameters"), device)
    grad_out = random_input(shape, torch.float32, seed_of("batch-grad", batch), device)
    if batch == 0:
        mean, invstd = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
        y = batch_norm_relu(x, mean, invstd, weight, bias, backend=backend)
        assert y.shape == shape
        out = torch.full((0, 6, 3, 5), float("nan"), device=device)
        assert batch_norm_relu(x, mean, invstd, weight, bias, out=out, out_offset=1, backend=backend) is out
        grad_x, grad_weight, grad_bias = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias,
                                                                  backend=backend)
        assert grad_x.shape == shape
        assert torch.equal(grad_weight.cpu(), torch.zeros(4)) and torch.equal(grad_bias.cpu(), torch.zeros(4))
        return
    check_stats(backend, device, shape, torch.float32, x=x)
    check_forward(backend, device, shape, torch.float32, x=x)
    check_backward(backend, device, shape, torch.float32, x=x, grad_out=grad_out)


def check_relu_mask_at_zero(backend, device):
    """Where z is exactly 0 the ReLU passes no gradient (torch.relu's backward uses z > 0)."""
    generator = torch.Generator().manual_seed(23)
    x = torch.randint(-2, 3, (2, 3, 4, 5), generator=generator).float().to(device)  # z = x below: many zeros
    mean, bias = torch.zeros(3, device=device), torch.zeros(3, device=device)
    invstd, weight = torch.ones(3, device=device), torch.ones(3, device=device)
    grad_out = random_input(x.shape, torch.float32, 24, device)
    y = batch_norm_relu(x, mean, invstd, weight, bias, backend=backend)
    assert torch.equal(y, torch.relu(x))
    leaf = x.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(torch.relu(leaf), leaf, grad_out)
    _, _, grad_bias = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, backend=backend)
    torch.testing.assert_close(grad_bias, expected_grad.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)
    assert bool((x == 0).any())


def check_stats_keep_a_small_variance_under_a_large_mean(backend, device):
    """mean 1000, standard deviation 0.01, float32: E[x^2] - E[x]^2 would lose every digit."""
    generator = torch.Generator().manual_seed(17)
    x = (1000 + 0.01 * torch.randn(4, 3, 32, 35, generator=generator, dtype=torch.float64)).float()
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    assert bool(((naive.double() - expected_var).abs() > 0.1 * expected_var).any()), "the case must defeat naive"
    mean, var = batch_norm_stats(x.to(device), backend=backend)
    torch.testing.assert_close(mean.cpu().double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.cpu().double(), expected_var, rtol=1e-4, atol=0)


def check_deterministic(backend, device):
    """Repeated calls give bitwise identical results (fixed reduction order, no atomics)."""
    shape = SHAPES["many-pixels"]
    x = random_input(shape, torch.float32, 5, device).contiguous(memory_format=torch.channels_last)
    grad_out = random_input(shape, torch.float32, 6, device)
    weight, bias = random_parameters(shape[1], torch.float32, 7, device)
    first = batch_norm_stats(x, backend=backend)
    second = batch_norm_stats(x, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    mean, invstd = first[0], torch.rsqrt(first[1] + EPS)
    first = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, backend=backend)
    second = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def check_refuses_grad(backend, device):
    x = random_input((2, 3, 4, 4), torch.float32, 1, device).requires_grad_()
    weight, bias = random_parameters(3, torch.float32, 2, device)
    mean, invstd = batch_statistics(x.detach())
    with pytest.raises(RuntimeError, match="batch_norm_stats is not differentiable"):
        batch_norm_stats(x, backend=backend)
    with pytest.raises(RuntimeError, match="batch_norm_relu is not differentiable"):
        batch_norm_relu(x, mean, invstd, weight, bias, backend=backend)
    with pytest.raises(RuntimeError, match="batch_norm_relu_backward is not differentiable"):
        batch_norm_relu_backward(torch.ones_like(x), x.detach(), mean, invstd, weight.requires_grad_(), bias,
                                 backend=backend)
    with torch.no_grad():  # inside an autograd.Function's forward, grad mode is off
        batch_norm_relu(x, mean, invstd, weight, bias, backend=backend)


# ---------------------------------------------------------------------------
# The extension and reference backends.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_stats_match_float64(backend_and_device, shape_name, dtype):
    check_stats(*backend_and_device, SHAPES[shape_name], dtype)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_forward_matches_float64(backend_and_device, shape_name, dtype, relu):
    check_forward(*backend_and_device, SHAPES[shape_name], dtype, relu)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_backward_matches_float64(backend_and_device, shape_name, dtype, relu):
    check_backward(*backend_and_device, SHAPES[shape_name], dtype, relu)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
def test_training_step_matches_autograd_of_eager_batch_norm(backend_and_device, relu):
    check_matches_autograd(*backend_and_device, relu)


@pytest.mark.parametrize("grad_layout", ["nchw", "slice_nchw", "slice_channels_last"])
@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
def test_input_layouts(backend_and_device, layout, grad_layout):
    check_input_layout(*backend_and_device, layout, grad_layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", OUT_LAYOUTS)
def test_out_writes_only_its_slice(backend_and_device, layout, dtype):
    check_out_slice(*backend_and_device, layout, dtype)


@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(backend_and_device, batch):
    check_small_batches(*backend_and_device, batch)


def test_stats_keep_a_small_variance_under_a_large_mean(backend_and_device):
    check_stats_keep_a_small_variance_under_a_large_mean(*backend_and_device)


def test_relu_mask_at_zero(backend_and_device):
    check_relu_mask_at_zero(*backend_and_device)


def test_deterministic(backend_and_device):
    check_deterministic(*backend_and_device)


def test_not_differentiable(backend_and_device):
    check_refuses_grad(*backend_and_device)


@needs_extension
def test_cpu_results_do_not_depend_on_the_thread_count():
    shape = (4, 24, 17, 19)
    threads = torch.get_num_threads()
    results = []
    for layout in ("nchw", "channels_last"):
        x = in_layout(random_input(shape, torch.float32, 3), layout)
        grad_out = random_input(shape, torch.float32, 4)
        weight, bias = random_parameters(shape[1], torch.float32, 5)
        for count in (1, 3):
            torch.set_num_threads(count)
            try:
                mean, var = batch_norm_stats(x, backend="cpu")
                invstd = torch.rsqrt(var + EPS)
                results.append((layout, count, (mean, var, *batch_norm_relu_backward(
                    grad_out, x, mean, invstd, weight, bias, backend="cpu"))))
            finally:
                torch.set_num_threads(threads)
    for (layout, _, one), (other_layout, _, three) in zip(results[::2], results[1::2]):
        assert layout == other_layout
        assert all(torch.equal(a, b) for a, b in zip(one, three)), layout


def test_reference_stats_are_torch_var_mean():
    x = random_input((3, 4, 5, 6), torch.float32, 8)
    mean, var = batch_norm_stats_reference(x)
    expected_var, expected_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert torch.equal(mean, expected_mean) and torch.equal(var, expected_var)


# ---------------------------------------------------------------------------
# torch.library integration.
# ---------------------------------------------------------------------------


def opcheck_arguments(device):
    """Arguments of each op: channels_last x, a channel-slice grad_out, a channel slice of out."""
    shape = (2, 3, 5, 4)
    x = random_input(shape, torch.float32, 11, device).contiguous(memory_format=torch.channels_last)
    mean, invstd = batch_statistics(x)
    weight, bias = random_parameters(3, torch.float32, 12, device)
    grad_out = in_layout(random_input(shape, torch.float32, 13, device), "slice_nchw")
    out = torch.zeros(2, 7, 5, 4, device=device)[:, 1:]
    return {
        "stats": (x,),
        "forward": (x, mean, invstd, weight, bias, True),
        "forward_out": (out, x, mean, invstd, weight, bias, False, 2),
        "backward": (grad_out, x, mean, invstd, weight, bias, True),
    }


OP_NAMES = {"stats": "batch_norm_stats", "forward": "batch_norm_relu", "forward_out": "batch_norm_relu_out",
            "backward": "batch_norm_relu_backward"}


@needs_extension
@pytest.mark.parametrize("op", list(OP_NAMES))
def test_ops_pass_opcheck(device, op):
    torch.library.opcheck(getattr(torch.ops.ranet_fast, OP_NAMES[op]).default, opcheck_arguments(device)[op])


@needs_extension
def test_compiled_ops_reject_bad_input_themselves():
    # Direct torch.ops calls bypass the Python validation; the kernels must still refuse.
    ops = torch.ops.ranet_fast
    x, vector = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(RuntimeError, match="N \\* H \\* W >= 2"):
        ops.batch_norm_stats(torch.randn(1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ops.batch_norm_relu(x, vector.double(), vector, vector, vector, True)
    with pytest.raises(RuntimeError, match="must have shape \\[3\\]"):
        ops.batch_norm_relu(x, torch.ones(4), vector, vector, vector, True)
    with pytest.raises(RuntimeError, match="channels"):
        ops.batch_norm_relu_out(torch.zeros(2, 4, 4, 4), x, vector, vector, vector, vector, True, 2)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        ops.batch_norm_relu_backward(torch.zeros(2, 3, 4, 5), x, vector, vector, vector, vector, True)


def _validation_cases():
    x, v = torch.randn(2, 3, 4, 5), torch.ones(3)
    stats, forward, backward = batch_norm_stats, batch_norm_relu, batch_norm_relu_backward
    return {
        "stats not a tensor": (stats, (x.tolist(),), {}, TypeError, "x as a torch.Tensor"),
        "stats 3-D": (stats, (x[0],), {}, ValueError, r"\[N, C, H, W\]; got shape \(3, 4, 5\)"),
        "stats int dtype": (stats, (x.int(),), {}, TypeError, "supports float16"),
        "stats one value": (stats, (torch.randn(1, 3, 1, 1),), {}, ValueError, r"N \* H \* W >= 2.*\(1, 3, 1, 1\)"),
        "stats empty batch": (stats, (torch.randn(0, 3, 4, 5),), {}, ValueError, r"\(0, 3, 4, 5\)"),
        "no channels": (forward, (torch.randn(2, 0, 4, 5), *[torch.ones(0)] * 4), {}, ValueError, "C >= 1"),
        "vector length": (forward, (x, torch.ones(4), v, v, v), {}, ValueError, "invstd|one entry per channel"),
        "integer vector": (forward, (x, v, v, torch.ones(3, dtype=torch.int64), v), {}, TypeError, "weight must be"),
        "vector device": (forward, (x, v, v, v, torch.ones(3, device="meta")), {}, ValueError, "bias is on meta"),
        "offset without out": (forward, (x, v, v, v, v), dict(out_offset=1), ValueError, "needs out="),
        "out shape": (forward, (x, v, v, v, v), dict(out=torch.zeros(2, 3, 4, 6)), ValueError, "must be"),
        "out channels": (forward, (x, v, v, v, v), dict(out=torch.zeros(2, 4, 4, 5), out_offset=2), ValueError,
                         r"\[2, 5\)"),
        "out dtype": (forward, (x, v, v, v, v), dict(out=torch.zeros(2, 3, 4, 5, dtype=torch.float64)), TypeError,
                      "out has dtype"),
        "out shares memory": (forward, (x, v, v, v, v), dict(out=torch.zeros(1, 3, 4, 5).expand(2, 3, 4, 5)),
                              ValueError, "share memory"),
        "grad_out shape": (backward, (torch.randn(2, 3, 4, 4), x, v, v, v, v), {}, ValueError, "grad_out has shape"),
        "grad_out dtype": (backward, (x.double(), x, v, v, v, v), {}, TypeError, "grad_out has dtype"),
    }


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
@pytest.mark.parametrize("name", list(_validation_cases()))
def test_bad_input_raises_clear_error(backend, name, monkeypatch):
    function, arguments, options, error, message = _validation_cases()[name]

    def launched(*args, **kwargs):
        raise AssertionError(f"{name}: a backend was chosen before the input was validated")

    monkeypatch.setattr(_extension, "resolve_backend", launched)
    with pytest.raises(error, match=message):
        function(*arguments, **options, backend=backend)


@needs_extension
def test_automatic_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("RANET_FAST_BACKEND", raising=False)
    assert _extension.resolve_backend("batch_norm_stats", torch.zeros(1)) == "cpu"
