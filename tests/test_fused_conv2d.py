"""fused_conv2d: the cpu/cuda extension and reference backends against the float64 reference.

The Triton backend's kernel is tested in tests/test_fused_conv2d_triton.py, with the same cases
(imported from here). Every expected value is the float64 reference (F.conv2d between the
prologue and the epilogue) recomputed from the very values the backend saw, with random inputs,
weights and BN-like scales and shifts; outputs are written into NaN-poisoned buffers so that a
kernel writing outside its channel slice, or leaving part of it unwritten, fails.
"""

import dataclasses

import pytest
import torch

from ranet_fast import _extension
from ranet_fast.ops import fused_conv2d, fused_conv2d_reference
from ranet_fast.ops.fused_conv2d import ACTIVATIONS, activate, activate_
from cuda_testing import deterministic_on
from op_testing import (COMPILED_AND_REFERENCE, TOLERANCE_BY_DTYPE, backends, compile_recording_ops, needs_extension,
                        seed_of)


# Against the float64 reference. float32: accumulation-order rounding over up to 9 * 70 products of
# standard-normal values. Half types: the inputs are the same rounded values, so what differs is the
# rounding of the prologue's output (what the conv reads) and of the result: twice 2**-8 for
# bfloat16, which the shared 1e-2 leaves too little room for.
TOLERANCES = {**TOLERANCE_BY_DTYPE, torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def random_tensor(shape, dtype=torch.float32, seed=0, device="cpu", low=None, high=None):
    generator = torch.Generator().manual_seed(seed)
    if low is None:
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        values = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return values.to(dtype).to(device)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    prologue: bool = False
    epilogue_scale: bool = True
    epilogue_shift: bool = True
    activation: str = "relu"
    prologue_activation: str = "relu"
    negative_slope: float = 0.01

    def tensors(self, dtype=torch.float32, device="cpu", seed=0):
        """(x, weight, {scale/shift keyword arguments}) with fresh random values.

        The shifts are large enough (and the prologue's often positive) that a prologue wrongly
        applied to the zero padding turns it into a visible non-zero value.
        """
        x = random_tensor((self.batch, self.in_channels, self.height, self.width), dtype, seed, device)
        fan_in = self.in_channels * self.kernel * self.kernel
        weight = random_tensor((self.out_channels, self.in_channels, self.kernel, self.kernel), dtype, seed + 1,
                               device) / fan_in**0.5
        vectors = {}
        if self.prologue:
            vectors["prologue_scale"] = random_tensor(self.in_channels, torch.float32, seed + 2, device, 0.5, 1.5)
            vectors["prologue_shift"] = random_tensor(self.in_channels, torch.float32, seed + 3, device, -0.5, 1.0)
        if self.epilogue_scale:
            vectors["epilogue_scale"] = random_tensor(self.out_channels, torch.float32, seed + 4, device, 0.5, 1.5)
        if self.epilogue_shift:
            vectors["epilogue_shift"] = random_tensor(self.out_channels, torch.float32, seed + 5, device, -1.0, 1.0)
        return x, weight, vectors

    def options(self):
        return dict(stride=self.stride, padding=self.padding, activation=self.activation,
                    prologue_activation=self.prologue_activation, negative_slope=self.negative_slope)


CASES = {
    # RANet's shapes: the bottleneck's 1x1, its 3x3 (stride 1 and 2), the classifier's 3x3/2.
    "1x1-bottleneck": Case(2, 5, 7, 6, 4, 1),
    "3x3-normal": Case(2, 3, 9, 7, 6, 3, padding=1),
    "3x3-down-odd": Case(2, 4, 9, 11, 5, 3, stride=2, padding=1),
    "1x1-prologue": Case(2, 6, 5, 5, 3, 1, prologue=True),
    "3x3-prologue-down": Case(2, 3, 7, 8, 4, 3, stride=2, padding=1, prologue=True, epilogue_scale=False,
                              epilogue_shift=False, activation="none"),
    "3x3-plain": Case(1, 4, 6, 6, 3, 3, padding=1, epilogue_scale=False, epilogue_shift=False, activation="none"),
    "3x3-no-padding": Case(2, 3, 8, 7, 2, 3, stride=2),
    "1x1-stride2": Case(2, 3, 7, 7, 5, 1, stride=2),
    "scale-only": Case(2, 3, 5, 6, 4, 3, padding=1, epilogue_shift=False, activation="none"),
    "7x7-stem": Case(1, 3, 13, 12, 4, 7, stride=2, padding=3, epilogue_scale=False),
    # More channels than one CUDA/Triton tile holds, in every direction of the GEMM.
    "wide": Case(1, 70, 5, 4, 70, 3, padding=1, prologue=True),
    # More of everything than one Triton interpreter tile takes (1024 output pixels, 128 output
    # channels, 64 reductions), none a multiple of it: two programs along both grid axes, the
    # second ones ragged, and a ragged second reduction step.
    "multi-tile": Case(2, 9, 24, 24, 130, 3, padding=1, prologue=True),
    # The same with stride 2 (1152 output pixels) and a smooth activation.
    "multi-tile-stride2": Case(2, 9, 48, 47, 130, 3, stride=2, padding=1, prologue=True, activation="silu"),
}


def expected(x, weight, vectors, options, out=None, out_offset=0):
    """The float64 reference on the same values, on the CPU."""
    vectors64 = {name: v.detach().cpu().double() for name, v in vectors.items()}
    out64 = None if out is None else out.detach().cpu().double()
    return fused_conv2d_reference(x.detach().cpu().double(), weight.detach().cpu().double(), **vectors64, **options,
                                  out=out64, out_offset=out_offset)


def assert_close(actual, reference, dtype):
    torch.testing.assert_close(actual.detach().cpu().double(), reference, equal_nan=True, **TOLERANCES[dtype])


BACKENDS = backends(*COMPILED_AND_REFERENCE)
# The schemas' activation codes.
NONE, RELU = ACTIVATIONS.index("none"), ACTIVATIONS.index("relu")


def activation_case(name):
    """A case with activation `name` in the prologue and the epilogue (stride 2, ragged channels)."""
    return Case(2, 5, 9, 8, 6, 3, stride=2, padding=1, prologue=True, activation=name, prologue_activation=name,
                negative_slope=0.2)


def activation_tensors(name, dtype, device, seed):
    """activation_case(name)'s tensors; in float32/float64 with scales widened to about 4, so that the
    pre-activations span every piece of each activation (ReLU6's clamp at 6, Hardswish's at -3 and 3,
    the negative side). Half types keep the usual scales: their error is the rounding of what the
    conv reads, relative to its magnitude, which the half tolerances assume near 1. The activations
    themselves run in float32 for them too (the accumulation type)."""
    x, weight, vectors = activation_case(name).tensors(dtype, device, seed)
    if dtype in (torch.float32, torch.float64):
        for key in ("prologue_scale", "epilogue_scale"):
            vectors[key] = vectors[key] * 4
    return x, weight, vectors


# ---------------------------------------------------------------------------
# Checks shared with the Triton tests: each takes the backend name and the device.
# ---------------------------------------------------------------------------


def check_forward(backend, device, case, dtype):
    x, weight, vectors = case.tensors(dtype, device, seed_of(case, dtype))
    y = fused_conv2d(x, weight, **vectors, **case.options(), backend=backend)
    assert y.dtype == dtype and y.device.type == device
    assert_close(y, expected(x, weight, vectors, case.options()), dtype)


def _layout(x, layout):
    """x's values in a given memory arrangement: the point is how the kernel reads them."""
    batch, channels, height, width = x.shape
    if layout == "nchw":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout in ("prefix_nchw", "prefix_channels_last"):
        # A channel prefix of a dense block's buffer: the other channels are NaN, so reading them fails.
        memory_format = torch.channels_last if layout == "prefix_channels_last" else torch.contiguous_format
        buffer = torch.full((batch, channels + 3, height, width), float("nan"), dtype=x.dtype, device=x.device)
        buffer = buffer.contiguous(memory_format=memory_format)
        buffer[:, :channels] = x
        return buffer[:, :channels]
    if layout == "strided":
        # Every other column of a wider tensor, channels and height transposed in memory.
        wide = torch.full((batch, height, channels, 2 * width), float("nan"), dtype=x.dtype, device=x.device)
        view = wide.transpose(1, 2)[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(layout)


INPUT_LAYOUTS = ["nchw", "channels_last", "prefix_nchw", "prefix_channels_last", "strided"]


def check_input_layout(backend, device, layout, case_name, dtype=torch.float32):
    case = CASES[case_name]
    x, weight, vectors = case.tensors(dtype, device, seed_of(layout, case_name))
    strided = _layout(x, layout)
    assert torch.equal(strided, x)
    y = fused_conv2d(strided, weight, **vectors, **case.options(), backend=backend)
    assert_close(y, expected(x, weight, vectors, case.options()), dtype)
    channels_inner = layout in ("channels_last", "prefix_channels_last")
    assert y.is_contiguous(memory_format=torch.channels_last if channels_inner else torch.contiguous_format)


def _out_buffer(layout, batch, channels, height, width, dtype, device):
    """A NaN-poisoned output of `channels` channels in the given layout (a view for 'slice'/'strided')."""
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


OUT_LAYOUTS = ["nchw", "channels_last", "slice", "strided"]


def check_out_slice(backend, device, layout, case_name, dtype=torch.float32):
    case = CASES[case_name]
    x, weight, vectors = case.tensors(dtype, device, seed_of(layout, case_name, "out"))
    reference = expected(x, weight, vectors, case.options())
    offset, channels = 2, case.out_channels + 5
    out = _out_buffer(layout, case.batch, channels, *reference.shape[2:], dtype, device)
    returned = fused_conv2d(x, weight, **vectors, **case.options(), out=out, out_offset=offset, backend=backend)
    assert returned is out
    assert_close(out[:, offset:offset + case.out_channels], reference, dtype)
    outside = torch.cat([out[:, :offset], out[:, offset + case.out_channels:]], dim=1)
    assert torch.isnan(outside).all(), "fused_conv2d wrote outside its channel slice"


def check_dense_block_in_place(backend, device, dtype=torch.float32):
    """Layers of a dense block: each reads the buffer's channel prefix and appends its channels."""
    batch, channels, growth, size = 2, 4, 3, 6
    for memory_format in (torch.contiguous_format, torch.channels_last):
        buffer = torch.full((batch, channels + 2 * growth, size, size), float("nan"), dtype=dtype, device=device)
        buffer = buffer.contiguous(memory_format=memory_format)
        buffer[:, :channels] = random_tensor((batch, channels, size, size), dtype, 40, device)
        expected_buffer = buffer.detach().cpu().double().clone()
        for layer in range(2):
            used = channels + layer * growth
            case = Case(batch, used, size, size, growth, 3, padding=1, prologue=layer == 1)
            _, weight, vectors = case.tensors(dtype, device, seed_of("dense", layer))
            fused_conv2d(buffer[:, :used], weight, **vectors, **case.options(), out=buffer, out_offset=used,
                         backend=backend)
            expected(expected_buffer[:, :used], weight, vectors, case.options(), out=expected_buffer,
                     out_offset=used)
        assert_close(buffer, expected_buffer, dtype)


def check_statistics(backend, device, case_name, dtype, use_out=True):
    """stats_sum/stats_sumsq (NaN-poisoned first) receive the per-channel sums of the output as
    written, against float64 sums of the same values; the output itself stays right."""
    case = CASES[case_name]
    x, weight, vectors = case.tensors(dtype, device, seed_of("stats", case_name, dtype))
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    stats_sum, stats_sumsq = (torch.full((case.out_channels,), float("nan"), dtype=accumulation, device=device)
                              for _ in range(2))
    reference = expected(x, weight, vectors, case.options())
    offset = 1
    out = _out_buffer("slice", case.batch, case.out_channels + 2, *reference.shape[2:], dtype, device) if use_out else None
    returned = fused_conv2d(x, weight, **vectors, **case.options(), out=out, out_offset=offset if use_out else 0,
                            stats_sum=stats_sum, stats_sumsq=stats_sumsq, backend=backend)
    written = returned[:, offset:offset + case.out_channels] if use_out else returned
    assert_close(written, reference, dtype)
    values = written.detach().cpu().double()
    # Summation order: float64 leaves ~1e-16 per term, float32 accumulation ~1e-7 per term over
    # the 1152 terms of the largest case, relative to the sum of magnitudes.
    relative = 1e-12 if dtype == torch.float64 else 1e-4
    for name, stored, terms in (("sum", stats_sum, values), ("sum of squares", stats_sumsq, values.square())):
        exact = terms.sum((0, 2, 3))
        bound = relative * terms.abs().sum((0, 2, 3)) + 1e-30
        error = (stored.cpu().double() - exact).abs()
        assert bool((error <= bound).all()), f"{name}: error {error.max().item():.3g} above {bound.min().item():.3g}"


STATISTICS_CASES = ("multi-tile", "multi-tile-stride2", "3x3-down-odd", "3x3-plain")


def check_small_batches(backend, device, batch):
    case = dataclasses.replace(CASES["3x3-down-odd"], batch=batch)
    x, weight, vectors = case.tensors(torch.float32, device, seed_of("batch", batch))
    y = fused_conv2d(x, weight, **vectors, **case.options(), backend=backend)
    reference = expected(x, weight, vectors, case.options())
    assert y.shape == reference.shape
    assert_close(y, reference, torch.float32)
    out = torch.full((batch, case.out_channels + 1, *reference.shape[2:]), float("nan"), device=device)
    fused_conv2d(x, weight, **vectors, **case.options(), out=out, out_offset=1, backend=backend)
    assert_close(out[:, 1:], reference, torch.float32)


def check_activation(backend, device, name, dtype):
    """Activation `name` in the prologue and the epilogue, both on pre-activations spanning its pieces."""
    case = activation_case(name)
    x, weight, vectors = activation_tensors(name, dtype, device, seed_of("activation", name, dtype))
    y = fused_conv2d(x, weight, **vectors, **case.options(), backend=backend)
    assert_close(y, expected(x, weight, vectors, case.options()), dtype)


def check_gradients(backend, device, case_name):
    """Gradients of x, weight and every scale and shift against autograd through the float64 reference.

    case_name: a name of CASES, an activation (activation_case), or a Case."""
    seed = seed_of("grad", case_name)
    if isinstance(case_name, Case):
        case = case_name
        x, weight, vectors = case.tensors(torch.float64, device, seed)
    elif case_name in ACTIVATIONS:
        case = activation_case(case_name)
        x, weight, vectors = activation_tensors(case_name, torch.float64, device, seed)
    else:
        case = CASES[case_name]
        x, weight, vectors = case.tensors(torch.float64, device, seed)
    vectors = {name: v.double() for name, v in vectors.items()}
    leaves = [x, weight, *vectors.values()]
    ours = [t.clone().requires_grad_() for t in leaves]
    theirs = [t.clone().requires_grad_() for t in leaves]
    names = list(vectors)
    y = fused_conv2d(ours[0], ours[1], **dict(zip(names, ours[2:])), **case.options(), backend=backend)
    y_reference = fused_conv2d_reference(theirs[0], theirs[1], **dict(zip(names, theirs[2:])), **case.options())
    weighting = random_tensor(y.shape, torch.float64, 77, device)
    (y * weighting).sum().backward()
    (y_reference * weighting).sum().backward()
    for name, a, b in zip(["x", "weight", *names], ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def check_gradcheck(backend, device, activation="relu", prologue_activation="relu"):
    case = Case(1, 2, 4, 3, 2, 3, stride=2, padding=1, prologue=True, activation=activation,
                prologue_activation=prologue_activation)
    x, weight, vectors = case.tensors(torch.float64, device, 5)
    names = list(vectors)

    def function(x, weight, *vector_values):
        return fused_conv2d(x, weight, **dict(zip(names, vector_values)), **case.options(), backend=backend)

    inputs = [t.double().requires_grad_() for t in (x, weight, *vectors.values())]
    # On CUDA the conv backward is cuDNN's, whose weight-gradient algorithms may sum with atomics;
    # gradcheck's reentrancy check (two backward passes, compared bit for bit) needs repeatable ones.
    with deterministic_on(device):
        assert torch.autograd.gradcheck(function, inputs)


# ---------------------------------------------------------------------------
# The extension and reference backends.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_matches_reference(backend_and_device, case, dtype):
    check_forward(*backend_and_device, case, dtype)


@pytest.mark.parametrize("case_name", ["1x1-bottleneck", "3x3-prologue-down"])
@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
def test_input_layouts(backend_and_device, layout, case_name):
    check_input_layout(*backend_and_device, layout, case_name)


@pytest.mark.parametrize("case_name", ["1x1-prologue", "3x3-down-odd"])
@pytest.mark.parametrize("layout", OUT_LAYOUTS)
def test_out_writes_only_its_slice(backend_and_device, layout, case_name):
    check_out_slice(*backend_and_device, layout, case_name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dense_block_in_place(backend_and_device, dtype):
    check_dense_block_in_place(*backend_and_device, dtype)


@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(backend_and_device, batch):
    check_small_batches(*backend_and_device, batch)


@pytest.mark.parametrize("case_name", STATISTICS_CASES)
def test_statistics_are_those_of_the_output(backend_and_device, case_name, dtype):
    check_statistics(*backend_and_device, case_name, dtype)


def test_statistics_without_out(backend_and_device):
    check_statistics(*backend_and_device, "3x3-down-odd", torch.float32, use_out=False)


def test_statistics_of_an_empty_batch_are_zero(backend_and_device):
    check_empty_batch_statistics(*backend_and_device)


def check_empty_batch_statistics(backend, device):
    case = dataclasses.replace(CASES["3x3-down-odd"], batch=0)
    x, weight, vectors = case.tensors(torch.float32, device, 3)
    stats = [torch.full((case.out_channels,), float("nan"), device=device) for _ in range(2)]
    fused_conv2d(x, weight, **vectors, **case.options(), stats_sum=stats[0], stats_sumsq=stats[1], backend=backend)
    assert all(bool((s == 0).all()) for s in stats)


@pytest.mark.parametrize("case_name", ["3x3-down-odd", "1x1-prologue", "scale-only", "3x3-prologue-down"])
def test_gradients_match_reference(backend_and_device, case_name):
    check_gradients(*backend_and_device, case_name)


def test_gradcheck(backend_and_device):
    check_gradcheck(*backend_and_device)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_reference(backend_and_device, name, dtype):
    check_activation(*backend_and_device, name, dtype)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_gradients_match_reference(backend_and_device, name):
    check_gradients(*backend_and_device, name)


@pytest.mark.parametrize("activation, prologue_activation", [("silu", "gelu"), ("hardswish", "leaky_relu")])
def test_activation_gradcheck(backend_and_device, activation, prologue_activation):
    check_gradcheck(*backend_and_device, activation, prologue_activation)


# Each activation as an eager module, for the reference's definition.
EAGER_ACTIVATIONS = {
    "none": lambda slope: torch.nn.Identity(),
    "relu": lambda slope: torch.nn.ReLU(),
    "relu6": lambda slope: torch.nn.ReLU6(),
    "silu": lambda slope: torch.nn.SiLU(),
    "gelu": lambda slope: torch.nn.GELU(),
    "hardswish": lambda slope: torch.nn.Hardswish(),
    "leaky_relu": lambda slope: torch.nn.LeakyReLU(slope),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_reference_activations_are_eager_modules(name):
    """BN -> act -> conv -> BN -> act with nn modules (eval mode), the padding left at zero."""
    x, weight, vectors = activation_tensors(name, torch.float64, "cpu", seed_of("eager", name))
    act = EAGER_ACTIVATIONS[name](0.2)
    pre = act(x * vectors["prologue_scale"].double().view(1, -1, 1, 1)
              + vectors["prologue_shift"].double().view(1, -1, 1, 1))
    conv = torch.nn.functional.conv2d(pre, weight, stride=2, padding=1)
    eager = act(conv * vectors["epilogue_scale"].double().view(1, -1, 1, 1)
                + vectors["epilogue_shift"].double().view(1, -1, 1, 1))
    ours = fused_conv2d_reference(x, weight, **vectors, **activation_case(name).options())
    torch.testing.assert_close(ours, eager, rtol=1e-12, atol=1e-12)


def test_reference_is_eager_bn_relu_conv():
    """The reference's definition spelled out with torch.nn modules in eval mode."""
    torch.manual_seed(3)
    pre_bn, post_bn = torch.nn.BatchNorm2d(4).double().eval(), torch.nn.BatchNorm2d(5).double().eval()
    for bn in (pre_bn, post_bn):
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    conv = torch.nn.Conv2d(4, 5, 3, 2, 1, bias=False).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)

    def fold(bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    (ps, ph), (es, eh) = fold(pre_bn), fold(post_bn)
    with torch.no_grad():
        eager = torch.relu(post_bn(conv(torch.relu(pre_bn(x)))))
        ours = fused_conv2d_reference(x, conv.weight, stride=2, padding=1, prologue_scale=ps, prologue_shift=ph,
                                      epilogue_scale=es, epilogue_shift=eh, activation="relu")
    torch.testing.assert_close(ours, eager, rtol=1e-12, atol=1e-12)


@needs_extension
def test_cpu_extension_channels_last_output_layouts():
    case = CASES["3x3-normal"]
    x, weight, vectors = case.tensors(seed=9)
    y = fused_conv2d(x.contiguous(memory_format=torch.channels_last), weight, **vectors, **case.options(),
                     backend="cpu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = fused_conv2d(x, weight, **vectors, **case.options(), backend="cpu")
    assert y.is_contiguous()


# ---------------------------------------------------------------------------
# torch.library integration.
# ---------------------------------------------------------------------------


def opcheck_arguments(device):
    """(functional op arguments, out op arguments) covering a prologue, absent tensors and a slice."""
    case = Case(2, 3, 5, 6, 4, 3, stride=2, padding=1, prologue=True, epilogue_shift=False)
    x, weight, vectors = case.tensors(torch.float32, device, 11)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    functional = (x, weight.requires_grad_(), vectors["prologue_scale"].requires_grad_(),
                  vectors["prologue_shift"], vectors["epilogue_scale"].requires_grad_(), None, 2, 1, RELU, RELU, 0.01)
    out = torch.zeros(2, 7, 3, 3, device=device)[:, 1:]
    out_arguments = (out, x.detach(), weight.detach(), None, None, None, vectors["epilogue_scale"].detach(), 2, 1,
                     RELU, NONE, 0.01, 2)
    return functional, out_arguments


def stats_opcheck_arguments(device):
    """The statistics op's arguments: the out op's, after two [Co] statistics vectors."""
    out, *rest = opcheck_arguments(device)[1]
    return (out, torch.zeros(4, device=device), torch.zeros(4, device=device), *rest)


@needs_extension
def test_ops_pass_opcheck(device):
    functional, out_arguments = opcheck_arguments(device)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d.default, functional)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_out.default, out_arguments)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_stats_out.default, stats_opcheck_arguments(device))


@needs_extension
def test_compiled_op_under_torch_compile_fullgraph():
    def layer(x, weight, scale, shift):
        return fused_conv2d(x * 2, weight, padding=1, epilogue_scale=scale, epilogue_shift=shift, activation="relu",
                            backend="cpu") + 1

    case = CASES["3x3-normal"]
    x, weight, vectors = case.tensors(torch.float64, seed=21)
    arguments = (x, weight, vectors["epilogue_scale"], vectors["epilogue_shift"])
    compiled, graph_ops = compile_recording_ops(layer)
    assert torch.equal(compiled(*arguments), layer(*arguments))
    assert "ranet_fast.fused_conv2d" in graph_ops, graph_ops

    # Through AOTAutograd too, gradients included.
    aot = torch.compile(layer, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in arguments]
    eager_leaves = [t.clone().requires_grad_() for t in arguments]
    aot(*leaves).square().sum().backward()
    layer(*eager_leaves).square().sum().backward()
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-12, atol=1e-12)


def check_strided_vectors(backend, device):
    """Scales and shifts that are views with a stride (every other entry of a longer vector)."""
    case = CASES["1x1-prologue"]
    x, weight, vectors = case.tensors(torch.float32, device, seed_of("strided vectors"))
    strided = {}
    for name, vector in vectors.items():
        spread = torch.full((2 * vector.numel(),), float("nan"), device=device)
        spread[::2] = vector
        strided[name] = spread[::2]
    y = fused_conv2d(x, weight, **strided, **case.options(), backend=backend)
    assert_close(y, expected(x, weight, vectors, case.options()), torch.float32)


def test_strided_scales_and_shifts(backend_and_device):
    check_strided_vectors(*backend_and_device)


@needs_extension
def test_compiled_ops_reject_bad_input_themselves():
    # Direct torch.ops calls bypass the Python validation; the kernels must still refuse.
    ops = torch.ops.ranet_fast
    x, weight = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.fused_conv2d(x, torch.randn(4, 2, 3, 3), None, None, None, None, 1, 1, RELU, NONE, 0.01)
    with pytest.raises(RuntimeError, match="stride >= 1"):
        ops.fused_conv2d(x, weight, None, None, None, None, 0, 1, RELU, NONE, 0.01)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ops.fused_conv2d(x, weight, None, None, torch.ones(4, dtype=torch.float64), None, 1, 1, RELU, NONE, 0.01)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.fused_conv2d(x, weight, None, None, torch.ones(8)[::2], None, 1, 1, RELU, NONE, 0.01)
    with pytest.raises(RuntimeError, match="come together"):
        ops.fused_conv2d(x, weight, torch.ones(3), None, None, None, 1, 1, RELU, NONE, 0.01)
    with pytest.raises(RuntimeError, match="channels"):
        ops.fused_conv2d_out(torch.zeros(1, 5, 5, 5), x, weight, None, None, None, None, 1, 1, RELU, NONE, 0.01, 2)
    with pytest.raises(RuntimeError, match="activation code 7"):
        ops.fused_conv2d(x, weight, None, None, None, None, 1, 1, RELU, len(ACTIVATIONS), 0.01)


def _validation_cases():
    x, weight = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    return {
        "not a tensor": ((x.tolist(), weight), {}, TypeError, "x as a torch.Tensor"),
        "3-D x": ((x[0], weight), {}, ValueError, r"\[N, Ci, H, W\]"),
        "channels": ((x, torch.randn(4, 2, 3, 3)), {}, ValueError, "expects 2 input channels"),
        "dtype": ((x, weight.double()), {}, TypeError, "weight has dtype"),
        "int dtype": ((x.int(), weight.int()), {}, TypeError, "supports float16"),
        "non-square": ((x, torch.randn(4, 3, 3, 1)), {}, ValueError, "square kernels"),
        "stride": ((x, weight), dict(stride=3), ValueError, "stride 1 or 2"),
        "padding": ((x, weight), dict(padding=2), ValueError, "padding 0 or"),
        "too small": ((torch.randn(1, 3, 2, 2), torch.randn(4, 3, 7, 7)), {}, ValueError, "leaves no output"),
        "scale length": ((x, weight), dict(epilogue_scale=torch.ones(3)), ValueError, "one entry per output channel"),
        "prologue alone": ((x, weight), dict(prologue_scale=torch.ones(3)), ValueError, "together"),
        "integer shift": ((x, weight), dict(epilogue_shift=torch.ones(4, dtype=torch.int64)), TypeError, "floating"),
        "offset without out": ((x, weight), dict(out_offset=1), ValueError, "needs out="),
        "activation": ((x, weight), dict(activation="tanh"), ValueError, "activation must be one of none, relu, relu6, "
                       "silu, gelu, hardswish, leaky_relu; got 'tanh'"),
        "prologue activation": ((x, weight), dict(prologue_activation="ReLU"), ValueError,
                                "prologue_activation must be one of none, relu"),
        "activation type": ((x, weight), dict(activation=True), ValueError, "activation must be one of"),
        "negative slope": ((x, weight), dict(negative_slope=float("nan")), ValueError, "finite number"),
        "stats alone": ((x, weight), dict(stats_sum=torch.zeros(4)), ValueError, "together"),
        "stats dtype": ((x, weight), dict(stats_sum=torch.zeros(4, dtype=torch.float64),
                                          stats_sumsq=torch.zeros(4, dtype=torch.float64)), ValueError,
                        "contiguous torch.float32"),
        "stats strided": ((x, weight), dict(stats_sum=torch.zeros(8)[::2], stats_sumsq=torch.zeros(4)), ValueError,
                          "contiguous"),
        "stats length": ((x, weight), dict(stats_sum=torch.zeros(3), stats_sumsq=torch.zeros(3)), ValueError,
                         "one entry per output channel"),
        "out shape": ((x, weight), dict(out=torch.zeros(2, 4, 6, 5), padding=1), ValueError, "must be"),
        "out channels": ((x, weight), dict(out=torch.zeros(2, 5, 4, 4), out_offset=2), ValueError, r"\[2, 6\)"),
        "out dtype": ((x, weight), dict(out=torch.zeros(2, 4, 4, 4, dtype=torch.float64)), TypeError, "out has dtype"),
    }


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
@pytest.mark.parametrize("name", list(_validation_cases()))
def test_bad_input_raises_clear_error(backend, name):
    arguments, options, error, message = _validation_cases()[name]
    with pytest.raises(error, match=message):
        fused_conv2d(*arguments, **options, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_out_form_refuses_to_build_a_graph(backend):
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        fused_conv2d(x, torch.randn(2, 3, 1, 1), out=torch.zeros(1, 2, 4, 4), backend=backend)
    with pytest.raises(RuntimeError, match="statistics form"):
        fused_conv2d(x, torch.randn(2, 3, 1, 1), stats_sum=torch.zeros(2), stats_sumsq=torch.zeros(2), backend=backend)


@needs_extension
def test_automatic_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("RANET_FAST_BACKEND", raising=False)
    assert _extension.resolve_backend("fused_conv2d", torch.zeros(1)) == "cpu"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_in_place_activation_equals_the_out_of_place_one(name, dtype):
    """activate_ writes over its input exactly what activate returns (the folded layers use it on a
    conv's fresh result); values straddle every kink (0, 3, 6, -3) and include infinities."""
    code = ACTIVATIONS.index(name)
    value = torch.randn(3, 5, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(code)) * 5
    value[0, 0, 0, :6] = torch.tensor([0.0, 3.0, 6.0, -3.0, float("inf"), -float("inf")])
    value = value.to(dtype).contiguous(memory_format=torch.channels_last)
    expected = activate(value, code, 0.2)
    result = activate_(value, code, 0.2)
    assert result.data_ptr() == value.data_ptr()
    torch.testing.assert_close(result, expected, rtol=0, atol=0, equal_nan=True)
