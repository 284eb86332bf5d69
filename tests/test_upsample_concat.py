"""upsample_concat: the cpu/cuda extension and reference backends against the float64 reference.

The Triton backend's kernels are tested in tests/test_upsample_concat_triton.py.
Every comparison recomputes the expected values with F.interpolate in float64
from the very values the backend saw, so only the backend's accumulation
(float32 for float16/bfloat16/float32 inputs) and its final rounding differ.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ranet_fast import _extension
from ranet_fast.ops import upsample_concat, upsample_concat_reference
from cuda_testing import NO_CUDA_GPU
from op_testing import COMPILED_AND_REFERENCE, HAS_GPU, backends, compile_recording_ops, needs_extension, seed_of
from triton_interpreter import each_check_under_interpreter

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    # Like torch, the kernels compute source coordinates and weights in float32
    # for float32 inputs, so a weight is off by up to ulp(size) ~ 4e-6 at
    # RANet's size 56, times neighbour differences of a few units (randn data).
    # test_forward_matches_torch_float32 checks the arithmetic itself tightly.
    torch.float32: dict(rtol=1e-5, atol=3e-5),
    # The result is rounded to the half type once (2**-8 relative for bfloat16).
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def random_tensor(shape, dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)


def make_parts(batch, part_shapes, dtype=torch.float32, device="cpu", seed=0):
    return [
        random_tensor((batch, *shape), dtype, seed + index, device) for index, shape in enumerate(part_shapes)
    ]


def expected_output(parts, size, channel_offsets=None, out=None):
    """The float64 reference on the same values, on the CPU."""
    parts64 = [part.detach().cpu().double() for part in parts]
    out64 = None if out is None else out.detach().cpu().double()
    return upsample_concat_reference(parts64, size, channel_offsets=channel_offsets, out=out64)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.cpu().double(), expected, equal_nan=True, **TOLERANCES[dtype])


BACKENDS = backends(*COMPILED_AND_REFERENCE)


# (part shapes as (C, H, W), target size). RANet's fusion layers resize by 2
# between neighbouring scales (up in the fusion layers, down in the
# down-sampling blocks) and copy the part that already has the size.
CASES = {
    "cifar-up-32": ([(3, 16, 16), (2, 32, 32)], (32, 32)),
    "cifar-up-16": ([(4, 8, 8), (2, 16, 16), (1, 16, 16)], (16, 16)),
    "cifar-down-16": ([(3, 32, 32), (2, 8, 8), (1, 16, 16)], (16, 16)),
    "cifar-down-8": ([(2, 16, 16), (3, 8, 8)], (8, 8)),
    "imagenet-up-56": ([(2, 28, 28), (1, 56, 56)], (56, 56)),
    "imagenet-up-28-14": ([(1, 7, 7), (2, 14, 14), (1, 28, 28)], (28, 28)),
    "imagenet-down-28": ([(2, 56, 56), (1, 14, 14)], (28, 28)),
    "imagenet-down-7": ([(2, 14, 14), (1, 7, 7)], (7, 7)),
    "odd-5-to-13": ([(2, 5, 5)], (13, 13)),
    "odd-13-to-5": ([(2, 13, 13)], (5, 5)),
    "odd-1-to-7": ([(3, 1, 1)], (7, 7)),
    "odd-7-to-1": ([(3, 7, 7)], (1, 1)),
    "odd-3x9-to-8x4": ([(2, 3, 9)], (8, 4)),
    "non-integer-7-to-10": ([(2, 7, 7), (1, 10, 10)], (10, 10)),
    "non-integer-10-to-7": ([(2, 10, 10), (1, 6, 9)], (7, 7)),
    "one-axis-identity": ([(2, 9, 5), (1, 9, 12)], (9, 12)),
    "identity-1x1": ([(2, 1, 1), (1, 1, 1)], (1, 1)),
    "many-parts": ([(1, 2 + index, 3 + index) for index in range(11)], (6, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(backend_and_device, case, dtype):
    backend, device = backend_and_device
    part_shapes, size = CASES[case]
    parts = make_parts(2, part_shapes, dtype, device, seed=seed_of(case, dtype))
    result = upsample_concat(parts, size, backend=backend)
    total_channels = sum(shape[0] for shape in part_shapes)
    assert result.shape == (2, total_channels, *size)
    assert result.dtype == dtype and result.device.type == device
    assert_close(result, expected_output(parts, size), dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_torch_float32(backend_and_device, case):
    # Same index and weight arithmetic as F.interpolate in float32: only the
    # order of the final multiply-adds may differ.
    backend, device = backend_and_device
    part_shapes, size = CASES[case]
    parts = make_parts(2, part_shapes, torch.float32, device, seed=seed_of(case, "float32"))
    result = upsample_concat(parts, size, backend=backend)
    expected = upsample_concat_reference([part.cpu() for part in parts], size)
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-6, atol=1e-6)


def test_reference_is_interpolate_and_cat():
    # The reference against an independent spelling of the definition.
    parts = make_parts(3, [(2, 5, 7), (3, 11, 11), (1, 9, 9)], torch.float64, seed=1)
    expected = torch.cat(
        [
            part if part.shape[2:] == (9, 9) else F.interpolate(part, size=(9, 9), mode="bilinear", align_corners=True)
            for part in parts
        ],
        dim=1,
    )
    assert torch.equal(upsample_concat_reference(parts, 9), expected)
    # align_corners=True keeps the corners exactly.
    up = upsample_concat_reference([parts[0]], (13, 17))
    assert torch.equal(up[:, :, 0, 0], parts[0][:, :, 0, 0])
    assert torch.equal(up[:, :, -1, -1], parts[0][:, :, -1, -1])


def test_identity_part_is_copied_exactly(backend_and_device):
    # A copy, not an interpolation with weight 0: an infinity must not leak to
    # a neighbour as 0 * inf = NaN.
    backend, device = backend_and_device
    part = random_tensor((1, 2, 4, 5), torch.float32, seed=2, device=device)
    part[0, 0, 1, 2] = float("inf")
    resized = random_tensor((1, 1, 2, 3), torch.float32, seed=3, device=device)
    result = upsample_concat([part, resized], (4, 5), backend=backend)
    assert torch.equal(result[:, :2], part)


@pytest.mark.parametrize("case", ["cifar-up-16", "imagenet-down-28", "odd-1-to-7", "odd-7-to-1", "odd-3x9-to-8x4",
                                  "non-integer-10-to-7", "one-axis-identity", "many-parts"])
def test_gradients_match_autograd_through_reference(backend_and_device, case):
    backend, device = backend_and_device
    part_shapes, size = CASES[case]
    parts = [part.requires_grad_() for part in make_parts(2, part_shapes, torch.float32, device, seed=seed_of(case))]
    result = upsample_concat(parts, size, backend=backend)
    grad_output = random_tensor(result.shape, torch.float32, seed=seed_of(case, "grad"), device=device)
    gradients = torch.autograd.grad(result, parts, grad_output)

    parts64 = [part.detach().cpu().double().requires_grad_() for part in parts]
    expected = torch.autograd.grad(upsample_concat_reference(parts64, size), parts64, grad_output.cpu().double())
    # torch's own float32 backward uses the same float32 weights; only the
    # summation order differs (it scatters, the kernels gather).
    parts32 = [part.detach().cpu().requires_grad_() for part in parts]
    expected32 = torch.autograd.grad(upsample_concat_reference(parts32, size), parts32, grad_output.cpu())
    for gradient, expected_gradient, expected_gradient32, part in zip(gradients, expected, expected32, parts):
        assert gradient.shape == part.shape and gradient.dtype == part.dtype
        assert_close(gradient, expected_gradient, torch.float32)
        torch.testing.assert_close(gradient.cpu(), expected_gradient32, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_gradients(backend_and_device, dtype):
    backend, device = backend_and_device
    parts = [part.requires_grad_() for part in make_parts(2, [(2, 4, 6), (1, 8, 8)], dtype, device, seed=4)]
    result = upsample_concat(parts, (8, 8), backend=backend)
    grad_output = random_tensor(result.shape, dtype, seed=5, device=device)
    gradients = torch.autograd.grad(result, parts, grad_output)
    parts64 = [part.detach().cpu().double().requires_grad_() for part in parts]
    expected = torch.autograd.grad(upsample_concat_reference(parts64, (8, 8)), parts64, grad_output.cpu().double())
    for gradient, expected_gradient in zip(gradients, expected):
        assert gradient.dtype == dtype
        torch.testing.assert_close(gradient.cpu().double(), expected_gradient, rtol=1e-2, atol=2e-2)


def test_gradcheck(backend_and_device):
    backend, device = backend_and_device
    parts = [
        part.requires_grad_()
        for part in make_parts(2, [(1, 3, 4), (2, 5, 5), (1, 7, 2), (1, 1, 1)], torch.float64, device, seed=6)
    ]
    # Offsets out of order: the parts tile the channels in a permuted order.
    offsets = [4, 0, 2, 3]
    assert torch.autograd.gradcheck(
        lambda *tensors: upsample_concat(list(tensors), (5, 5), channel_offsets=offsets, backend=backend), parts
    )


def test_gradgradcheck(backend_and_device):
    backend, device = backend_and_device
    parts = [part.requires_grad_() for part in make_parts(1, [(1, 2, 3), (1, 4, 4)], torch.float64, device, seed=23)]
    assert torch.autograd.gradgradcheck(
        lambda *tensors: upsample_concat(list(tensors), (4, 4), backend=backend), parts
    )


@needs_extension
def test_backward_op_gradient_with_uncovered_channels():
    # The backward op called directly on some channels only: its gradient with
    # respect to grad_output is zero on the channels no part reads.
    grad_output = random_tensor((2, 7, 3, 4), torch.float64, seed=24).requires_grad_()

    def part_gradients(grad):
        return tuple(torch.ops.ranet_fast.upsample_concat_backward(grad, [4, 1], [2, 1], [2, 3], [5, 4]))

    assert torch.autograd.gradcheck(part_gradients, (grad_output,))
    (gradient,) = torch.autograd.grad(sum(g.sum() for g in part_gradients(grad_output)), grad_output)
    assert (gradient[:, [0, 2, 3]] == 0).all() and (gradient[:, [1, 4, 5]] != 0).all()


def test_channels_last_gradients(backend_and_device):
    # channels_last outputs (from a channels_last first part) give channels_last
    # part gradients, so a channels_last network stays channels_last.
    backend, device = backend_and_device
    parts = [
        part.contiguous(memory_format=torch.channels_last).requires_grad_()
        for part in make_parts(2, [(3, 4, 4), (2, 8, 8)], device=device, seed=25)
    ]
    result = upsample_concat(parts, (8, 8), backend=backend)
    assert result.is_contiguous(memory_format=torch.channels_last)
    grad_output = random_tensor(result.shape, seed=26, device=device).contiguous(memory_format=torch.channels_last)
    gradients = torch.autograd.grad(result, parts, grad_output)
    if backend != "reference":
        assert all(gradient.is_contiguous(memory_format=torch.channels_last) for gradient in gradients)
    parts64 = [part.detach().cpu().double().requires_grad_() for part in parts]
    expected = torch.autograd.grad(upsample_concat_reference(parts64, (8, 8)), parts64, grad_output.cpu().double())
    for gradient, expected_gradient in zip(gradients, expected):
        assert_close(gradient, expected_gradient, torch.float32)


def test_backward_is_deterministic(backend_and_device):
    backend, device = backend_and_device
    parts = [part.requires_grad_() for part in make_parts(4, [(8, 7, 7), (4, 28, 28)], torch.float32, device, seed=7)]
    result = upsample_concat(parts, (28, 28), backend=backend)
    grad_output = random_tensor(result.shape, torch.float32, seed=8, device=device)
    first = torch.autograd.grad(result, parts, grad_output, retain_graph=True)
    second = torch.autograd.grad(result, parts, grad_output)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_writes_only_its_slices(backend_and_device, dtype):
    # out is a channel slice view of a bigger NaN-filled buffer; the parts
    # fill channels 1-2 and 5-7 of it, in reverse order of their offsets.
    backend, device = backend_and_device
    buffer = torch.full((2, 12, 6, 6), float("nan"), dtype=dtype, device=device)
    out = buffer[:, 2:11]
    parts = make_parts(2, [(3, 3, 3), (2, 6, 6)], dtype, device, seed=9)
    returned = upsample_concat(parts, (6, 6), channel_offsets=[5, 1], out=out, backend=backend)
    assert returned is out
    written = torch.zeros(12, dtype=torch.bool)
    written[[3, 4, 7, 8, 9]] = True
    assert torch.isnan(buffer[:, ~written.to(device)]).all()
    assert not torch.isnan(buffer[:, written.to(device)]).any()
    expected = expected_output(parts, (6, 6), channel_offsets=[5, 1], out=out)
    assert_close(out, expected, dtype)


def test_out_channels_last_and_strided(backend_and_device):
    backend, device = backend_and_device
    buffer = torch.full((3, 10, 8, 8), float("nan"), device=device).contiguous(memory_format=torch.channels_last)
    out = buffer[:, 3:9]
    assert not out.is_contiguous() and out.stride(1) == 1
    parts = make_parts(3, [(2, 4, 4), (1, 8, 8), (3, 5, 3)], torch.float32, device, seed=10)
    upsample_concat(parts, (8, 8), channel_offsets=[0, 2, 3], out=out, backend=backend)
    assert torch.isnan(buffer[:, :3]).all() and torch.isnan(buffer[:, 9:]).all()
    assert_close(out, expected_output(parts, (8, 8), channel_offsets=[0, 2, 3], out=out), torch.float32)

    # An output whose width is strided and whose rows are transposed in memory.
    base = torch.full((2, 3, 6, 10), float("nan"), device=device)
    out = base.transpose(2, 3)[:, :, ::2]  # [2, 3, 5, 6], strides everywhere
    parts = make_parts(2, [(3, 2, 4)], torch.float32, device, seed=11)
    upsample_concat(parts, (5, 6), out=out, backend=backend)
    assert_close(out, expected_output(parts, (5, 6)), torch.float32)
    assert torch.isnan(base.transpose(2, 3)[:, :, 1::2]).all()


def test_channels_last_and_non_contiguous_parts(backend_and_device):
    backend, device = backend_and_device
    channels_last = random_tensor((2, 3, 7, 7), seed=12, device=device).contiguous(memory_format=torch.channels_last)
    transposed = random_tensor((2, 2, 9, 5), seed=13, device=device).transpose(2, 3)  # [2, 2, 5, 9]
    sliced = random_tensor((2, 6, 28, 28), seed=14, device=device)[:, 1:5:2, ::2, 1::2]  # [2, 2, 14, 14]
    identity_view = random_tensor((2, 8, 14, 28), seed=15, device=device)[:, ::4, :, ::2]  # [2, 2, 14, 14]
    parts = [channels_last, transposed, sliced, identity_view]
    assert not any(part.is_contiguous() for part in parts)
    result = upsample_concat(parts, (14, 14), backend=backend)
    # parts[0] is channels_last, so the functional output is too.
    assert result.is_contiguous(memory_format=torch.channels_last)
    assert_close(result, expected_output(parts, (14, 14)), torch.float32)
    contiguous_first = upsample_concat(parts[1:] + parts[:1], (14, 14), backend=backend)
    assert contiguous_first.is_contiguous()


@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(backend_and_device, batch):
    backend, device = backend_and_device
    parts = [part.requires_grad_() for part in make_parts(batch, [(2, 3, 3), (1, 6, 6)], device=device, seed=16)]
    result = upsample_concat(parts, (6, 6), backend=backend)
    assert result.shape == (batch, 3, 6, 6)
    assert_close(result, expected_output(parts, (6, 6)), torch.float32)
    gradients = torch.autograd.grad(result.sum(), parts)
    assert [gradient.shape for gradient in gradients] == [part.shape for part in parts]
    if batch:
        # Every output reads its taps with weights summing to 1.
        assert torch.allclose(gradients[0].sum(), torch.tensor(2 * 36.0, device=device))


@needs_extension
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 3),
    part_sizes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_extension_random_shapes(batch, part_sizes, size, seed):
    parts = [part.requires_grad_() for part in make_parts(batch, part_sizes, seed=seed)]
    result = upsample_concat(parts, size, backend="cpu")
    assert_close(result, expected_output(parts, size), torch.float32)
    grad_output = random_tensor(result.shape, seed=seed + 1)
    gradients = torch.autograd.grad(result, parts, grad_output)
    parts64 = [part.detach().double().requires_grad_() for part in parts]
    expected = torch.autograd.grad(upsample_concat_reference(parts64, size), parts64, grad_output.double())
    for gradient, expected_gradient in zip(gradients, expected):
        assert_close(gradient, expected_gradient, torch.float32)


# ---------------------------------------------------------------------------
# torch.library integration of the compiled ops.
# ---------------------------------------------------------------------------

@needs_extension
def test_ops_pass_opcheck(device):
    parts = [
        random_tensor((2, 2, 3, 3), seed=17, device=device).requires_grad_(),
        random_tensor((2, 1, 6, 6), seed=18, device=device).contiguous(memory_format=torch.channels_last),
        random_tensor((2, 2, 5, 8), seed=19, device=device)[:, :, :, ::2].requires_grad_(),
    ]
    torch.library.opcheck(torch.ops.ranet_fast.upsample_concat.default, (parts, [3, 0, 1], 5, 6, 6))
    out = torch.zeros(2, 7, 6, 6, device=device)[:, 1:]
    detached = [part.detach() for part in parts]
    torch.library.opcheck(torch.ops.ranet_fast.upsample_concat_out.default, (out, detached, [0, 2, 4]))
    grad_output = random_tensor((2, 6, 6, 6), seed=20, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(
        torch.ops.ranet_fast.upsample_concat_backward.default,
        (grad_output, [3, 0, 1], [2, 1, 2], [3, 6, 5], [3, 6, 4]),
    )


@needs_extension
def test_compiled_op_under_torch_compile_fullgraph():
    def fusion(low, high):
        return upsample_concat([low * 2, high], high.shape[-2:], backend="cpu").relu()

    compiled, graph_ops = compile_recording_ops(fusion)
    low = random_tensor((2, 3, 4, 4), seed=21)
    high = random_tensor((2, 2, 8, 8), seed=22)
    assert torch.equal(compiled(low, high), fusion(low, high))
    assert "ranet_fast.upsample_concat" in graph_ops, graph_ops

    # Through AOTAutograd too, gradients included.
    aot = torch.compile(fusion, fullgraph=True, backend="aot_eager")
    leaves = [low.clone().requires_grad_(), high.clone().requires_grad_()]
    eager_leaves = [low.clone().requires_grad_(), high.clone().requires_grad_()]
    aot(*leaves).square().sum().backward()
    fusion(*eager_leaves).square().sum().backward()
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        assert torch.equal(leaf.grad, eager_leaf.grad)


@needs_extension
def test_compiled_ops_reject_bad_input_themselves():
    # Direct torch.ops calls bypass the Python validation; the kernels must still refuse.
    part = torch.randn(1, 2, 3, 3)
    ops = torch.ops.ranet_fast
    with pytest.raises(RuntimeError, match=r"part 0 must have shape \[N, C, H, W\]"):
        ops.upsample_concat_out(torch.empty(1, 2, 3, 3), [torch.randn(2, 3, 3)], [0])
    with pytest.raises(RuntimeError, match=r"part 0 needs channels \[1, 3\) but the output has 2 channels"):
        ops.upsample_concat([part], [1], 2, 4, 4)
    with pytest.raises(RuntimeError, match=r"parts have 2 channels in all but must tile the output's 3 channels"):
        ops.upsample_concat([part], [0], 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"\[0, 2\) and \[1, 3\) overlap"):
        ops.upsample_concat_out(torch.empty(1, 4, 3, 3), [part, part], [0, 1])
    with pytest.raises(RuntimeError, match=r"part 0 has dtype Double but out has dtype Float"):
        ops.upsample_concat_out(torch.empty(1, 2, 3, 3), [part.double()], [0])
    with pytest.raises(RuntimeError, match=r"one channel offset per part"):
        ops.upsample_concat_out(torch.empty(1, 2, 3, 3), [part], [0, 1])
    with pytest.raises(RuntimeError, match=r"float16, bfloat16, float32 or float64"):
        ops.upsample_concat_out(torch.empty(1, 2, 3, 3, dtype=torch.int32), [part.int()], [0])
    with pytest.raises(RuntimeError, match=r"backward: part 0 needs H, W >= 1"):
        ops.upsample_concat_backward(torch.randn(1, 2, 3, 3), [0], [2], [0], [3])


# ---------------------------------------------------------------------------
# Validation and backend selection.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_raises_clear_error(backend):
    part = torch.randn(2, 3, 4, 4)

    def call(parts, size=(4, 4), **kwargs):
        return upsample_concat(parts, size, backend=backend, **kwargs)

    with pytest.raises(TypeError, match=r"list or tuple of tensors as parts, got Tensor"):
        call(part)
    with pytest.raises(ValueError, match=r"at least one part"):
        call([])
    with pytest.raises(ValueError, match=r"part 1 must be a 4-D \[N, C, H, W\] tensor; got a 3-D tensor of shape \(3, 4, 4\)"):
        call([part, torch.randn(3, 4, 4)])
    with pytest.raises(ValueError, match=r"part 1 has batch size 5 but part 0 has 2"):
        call([part, torch.randn(5, 1, 4, 4)])
    with pytest.raises(TypeError, match=r"part 1 has dtype torch.float16 but part 0 has torch.float32"):
        call([part, part.half()])
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 and float64 tensors; part 0 has dtype torch.int64"):
        call([torch.ones(2, 3, 4, 4, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"part 0 needs C, H, W >= 1; got shape \(2, 3, 0, 4\)"):
        call([torch.randn(2, 3, 0, 4)])
    with pytest.raises(ValueError, match=r"target size >= 1, got \(0, 4\)"):
        call([part], (0, 4))
    with pytest.raises(TypeError, match=r"size as an int or a pair of ints"):
        call([part], (4, 4, 4))
    with pytest.raises(ValueError, match=r"one channel offset per part: got 1 offsets for 2 parts"):
        call([part, part], channel_offsets=[0])
    with pytest.raises(ValueError, match=r"channel offset 0 is negative \(-1\)"):
        call([part], channel_offsets=[-1])
    with pytest.raises(ValueError, match=r"channel slices of parts 0 and 1 overlap: \[0, 3\) and \[2, 5\)"):
        call([part, part], channel_offsets=[0, 2])
    with pytest.raises(ValueError, match=r"must tile the output channels \[0, 7\) exactly, but they cover only 6"):
        call([part, part], channel_offsets=[0, 4])
    with pytest.raises(ValueError, match=r"part 0 needs channels \[2, 5\) but out has 4 channels"):
        call([part], channel_offsets=[2], out=torch.empty(2, 4, 4, 4))
    with pytest.raises(TypeError, match=r"out has dtype torch.float64 but the parts have torch.float32"):
        call([part], out=torch.empty(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out has shape \(2, 3, 5, 4\) but must be \[2, C, 4, 4\]"):
        call([part], out=torch.empty(2, 3, 5, 4))
    with pytest.raises(ValueError, match=r"out must be a 4-D"):
        call([part], out=torch.empty(3, 4, 4))


@pytest.mark.skipif(not HAS_GPU, reason=NO_CUDA_GPU)
def test_device_mismatch_is_named():
    part = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"part 1 is on cuda:0 but part 0 is on cpu"):
        upsample_concat([part, part.cuda()], 3)
    with pytest.raises(ValueError, match=r"out is on cuda:0 but the parts are on cpu"):
        upsample_concat([part], 3, out=torch.empty(1, 2, 3, 3, device="cuda"))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_out_form_refuses_to_build_a_graph(backend):
    part = torch.randn(1, 2, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"out= form is not differentiable"):
        upsample_concat([part], 5, out=torch.empty(1, 2, 5, 5), backend=backend)
    with torch.no_grad():
        upsample_concat([part], 5, out=torch.empty(1, 2, 5, 5), backend=backend)


def test_automatic_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("RANET_FAST_BACKEND", raising=False)
    expected = "cpu" if _extension.extension_loaded() else "reference"
    assert _extension.resolve_backend("upsample_concat", torch.empty(1), None, "upsample_concat") == expected


def test_triton_backend_needs_its_kernel_module():
    if _extension.triton_import_error() is not None:
        pytest.skip(_extension.triton_import_error())
    available, reason = _extension.backend_status("triton", "cuda", "no_such_kernels")
    assert not available and reason == "ranet_fast.kernels has no no_such_kernels module"


# ---------------------------------------------------------------------------
# The wrapper's Triton backend (custom ops, autograd, out=) on CPU tensors
# under the Triton interpreter, in a subprocess: Triton fixes interpreter mode
# when a kernel module is imported. The kernels themselves are tested in
# tests/test_upsample_concat_triton.py.
# ---------------------------------------------------------------------------

def _wrapper_parts(device, seed=0):
    """A float32 low-resolution part and a channels_last high-resolution one, both leaves."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64).float().to(device).requires_grad_()
    high = torch.randn(2, 2, 8, 8, generator=generator, dtype=torch.float64).float().to(device)
    return [low, high.contiguous(memory_format=torch.channels_last).requires_grad_()]


def check_triton_forward_and_gradients(device):
    parts = _wrapper_parts(device)
    result = upsample_concat(parts, (8, 8), backend="triton")
    parts64 = [part.detach().cpu().double().requires_grad_() for part in parts]
    expected = upsample_concat_reference(parts64, (8, 8))
    torch.testing.assert_close(result.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    grad_output = random_tensor(result.shape, seed=1, device=device)
    gradients = torch.autograd.grad(result, parts, grad_output)
    expected_gradients = torch.autograd.grad(expected, parts64, grad_output.cpu().double())
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient.cpu().double(), expected_gradient, rtol=1e-5, atol=1e-5)


def check_triton_out_writes_only_its_slices(device):
    parts = [part.detach() for part in _wrapper_parts(device)]
    out = torch.full((2, 9, 8, 8), float("nan"), device=device)
    upsample_concat(parts, (8, 8), channel_offsets=[4, 1], out=out, backend="triton")
    assert out[:, [0, 3, 7, 8]].isnan().all()
    expected = upsample_concat_reference([part.cpu() for part in parts], (8, 8), channel_offsets=[4, 1],
                                         out=torch.zeros(2, 9, 8, 8))
    torch.testing.assert_close(out[:, [1, 2, 4, 5, 6]].cpu(), expected[:, [1, 2, 4, 5, 6]], rtol=1e-5, atol=1e-5)


def check_triton_opcheck(device):
    parts = [part.detach() for part in _wrapper_parts(device)]
    ops = torch.ops.ranet_fast
    torch.library.opcheck(ops.upsample_concat_triton.default, (parts, [0, 3], 5, 8, 8))
    out = torch.zeros(2, 5, 8, 8, device=device)
    torch.library.opcheck(ops.upsample_concat_triton_out.default, (out, parts, [0, 3]))
    grad_output = random_tensor((2, 5, 8, 8), seed=2, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.upsample_concat_triton_backward.default, (grad_output, [0, 3], [3, 2], [4, 8], [4, 8]))


def check_triton_double_backward(device):
    grad_output = random_tensor((1, 3, 2, 3), torch.float64, seed=3, device=device).requires_grad_()
    backward = torch.ops.ranet_fast.upsample_concat_triton_backward
    assert torch.autograd.gradcheck(lambda g: tuple(backward(g, [2, 0], [1, 1], [1, 2], [2, 3])), (grad_output,))


def check_triton_compiles_fullgraph(device):
    parts = _wrapper_parts(device)
    function = lambda a, b: upsample_concat([a, b], (8, 8), backend="triton")  # noqa: E731
    compiled, graph_ops = compile_recording_ops(function)
    assert torch.equal(compiled(*parts), function(*parts))
    assert "ranet_fast.upsample_concat_triton" in graph_ops, graph_ops


def triton_interpreter_checks():
    """The wrapper's Triton backend: name -> check(device)."""
    return {
        "forward_and_gradients": check_triton_forward_and_gradients,
        "out_writes_only_its_slices": check_triton_out_writes_only_its_slices,
        "opcheck": check_triton_opcheck,
        "compiles_fullgraph": check_triton_compiles_fullgraph,
        "double_backward": check_triton_double_backward,
    }


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)
