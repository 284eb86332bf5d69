"""Every op at RANet's real sizes on the GPU backends, against the float64 reference.

The op test files check each kernel on small, awkward shapes; this file checks the kernels where
they will run: RANet C-3 and ImageNet layer shapes at batch 64-256, in fp32, bf16 and fp16, NCHW,
channels_last and non-contiguous (channel-slice) inputs, fresh random inputs for every case (never
zeros), outputs poisoned with NaN before a kernel writes them, and a gather and an upsample whose
tensors pass 2**31 elements, where an int32 offset would wrap.

Error measure: ||out - ref|| / ||ref|| against the op's reference run in float64 on the same
(rounded) inputs. Tolerances: fp32 1e-5, bf16/fp16 1e-2 (the brief's; the kernels accumulate in
fp32 and round once).

Runs on a CUDA GPU (backends cuda and triton). ``RANET_FAST_REALISTIC_DEVICE=cpu`` runs the same
cases at a hundredth of the sizes on the CPU backends: scripts/gpu_check.sh --dry-run uses that to
rehearse this file before a GPU's minutes are spent on it. Without a GPU and without that variable
every test skips with "no CUDA GPU".
"""

from __future__ import annotations

import os

import pytest
import torch

from cuda_testing import NO_CUDA_GPU, exact_float32
from ranet_fast import _extension
from ranet_fast.ops import (batch_norm_relu, batch_norm_relu_backward, batch_norm_relu_backward_reference,
                            batch_norm_relu_reference, batch_norm_stats, batch_norm_stats_reference, exit_partition,
                            exit_partition_reference, exit_partition_scatter, fused_conv2d, fused_conv2d_reference,
                            gather_rows, scatter_exits, scatter_exits_reference, upsample_concat,
                            upsample_concat_reference)

DEVICE = torch.device(os.environ.get("RANET_FAST_REALISTIC_DEVICE", "cuda"))
REHEARSAL = DEVICE.type == "cpu"
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason=NO_CUDA_GPU)

BACKENDS = ("cpu", "reference") if REHEARSAL else ("cuda", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LAYOUTS = ("nchw", "channels_last", "channel_slice")

# (batch, Ci, H, W, Co, kernel, stride): C-3's widest CIFAR layers and ImageNet model 1's stem-side
# and deep layers (shapes from benchmarks.fused_conv2d.conv_shapes).
CONV_SHAPES = [(256, 64, 32, 32, 64, 3, 1), (256, 144, 16, 16, 96, 1, 1), (256, 96, 32, 32, 48, 3, 2),
               (64, 64, 56, 56, 64, 3, 1), (64, 256, 28, 28, 128, 1, 1), (64, 512, 7, 7, 32, 3, 1)]
# (batch, [(C, H, W) of each part], target size): fusion-layer concats of C-3 and ImageNet 1.
FUSION_SHAPES = [(256, [(96, 16, 16), (48, 8, 8), (48, 16, 16)], (16, 16)),
                 (256, [(64, 32, 32), (64, 16, 16)], (32, 32)),
                 (64, [(128, 56, 56), (64, 28, 28), (64, 56, 56)], (56, 56))]
BN_SHAPES = [(256, 144, 16, 16), (256, 64, 32, 32), (64, 256, 28, 28), (64, 64, 56, 56)]


def scaled(batch: int) -> int:
    """The batch for this run: a CPU rehearsal uses a hundredth (at least 1)."""
    return max(1, batch // 100) if REHEARSAL else batch


def shrink(size: int) -> int:
    return max(2, size // 8) if REHEARSAL else size


def backend_or_skip(backend: str, module: str) -> str:
    available, reason = _extension.backend_status(backend, DEVICE, module)
    if not available:
        # On the GPU machine a missing backend is a defect, never a quiet skip.
        pytest.fail(f"backend {backend} unavailable on {DEVICE}: {reason}")
    return backend


def laid_out(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """``tensor`` (values unchanged) as NCHW, channels_last or a channel slice of a wider buffer."""
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        wider = torch.randn(tensor.shape[0], tensor.shape[1] + 5, *tensor.shape[2:], device=tensor.device,
                            dtype=tensor.dtype).contiguous(memory_format=torch.channels_last)
        view = wider[:, 3:3 + tensor.shape[1]]
        view.copy_(tensor)
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    return tensor.contiguous()


def random(*shape, dtype, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale + offset).to(dtype)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    assert torch.isfinite(got).all(), "non-finite values in the output (unwritten poison?)"
    return ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    error = relative_error(got, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} above {TOLERANCE[dtype]:g}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_conv2d_real_shapes(backend, shape, dtype, layout):
    backend_or_skip(backend, "fused_conv2d")
    batch, ci, h, w, co, k, stride = shape
    batch, h, w = scaled(batch), shrink(h), shrink(w)
    x = laid_out(random(batch, ci, h, w, dtype=dtype), layout)
    weight = random(co, ci, k, k, dtype=dtype, scale=(ci * k * k) ** -0.5)
    vectors = dict(prologue_scale=torch.rand(ci, device=DEVICE) + 0.5, prologue_shift=torch.randn(ci, device=DEVICE),
                   epilogue_scale=torch.rand(co, device=DEVICE) + 0.5, epilogue_shift=torch.randn(co, device=DEVICE))
    padding = (k - 1) // 2
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    # Written into channels [4, 4 + co) of a NaN-poisoned buffer: every element in the slice must be
    # written, none outside it.
    out = torch.full((batch, co + 7, ho, wo), float("nan"), device=DEVICE, dtype=dtype)
    with exact_float32():  # the Triton conv's float32 dots would follow cuDNN's TF32 default
        fused_conv2d(x, weight, stride=stride, padding=padding, activation="relu", out=out, out_offset=4,
                     backend=backend, **vectors)
    # float64 convolutions are slow even on an H200: the reference runs on the first and last two
    # samples (the smallest and largest offsets); the poison check below covers every sample.
    rows = sorted({0, 1, batch - 2, batch - 1} & set(range(batch)))
    expected = fused_conv2d_reference(x[rows].double(), weight.double(), stride=stride, padding=padding,
                                      activation="relu",
                                      **{name: v.double() for name, v in vectors.items()})
    assert_close(out[rows, 4:4 + co], expected, dtype, f"fused_conv2d {backend}")
    assert not torch.isnan(out[:, 4:4 + co]).any(), "left elements of its channel slice unwritten"
    assert torch.isnan(out[:, :4]).all() and torch.isnan(out[:, 4 + co:]).all(), "wrote outside its channel slice"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSION_SHAPES, ids=lambda c: f"{c[0]}-{c[2][0]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_concat_real_shapes(backend, case, dtype, layout):
    backend_or_skip(backend, "upsample_concat")
    batch, part_shapes, size = case
    batch, size = scaled(batch), (shrink(size[0]), shrink(size[1]))
    parts = [laid_out(random(batch, c, shrink(h), shrink(w), dtype=dtype), layout) for c, h, w in part_shapes]
    channels = sum(p.shape[1] for p in parts)
    out = torch.full((batch, channels + 3, *size), float("nan"), device=DEVICE, dtype=dtype)
    offsets = [3 + sum(p.shape[1] for p in parts[:i]) for i in range(len(parts))]
    upsample_concat(parts, size, channel_offsets=offsets, out=out, backend=backend)
    expected = upsample_concat_reference([p.double() for p in parts], size)
    assert_close(out[:, 3:], expected, dtype, f"upsample_concat {backend}")
    assert torch.isnan(out[:, :3]).all(), "wrote outside its channel slices"
    # Backward: each part's gradient gathers the output-gradient elements that read it.
    leaves = [p.detach().clone().requires_grad_() for p in parts]
    grad = random(batch, channels, *size, dtype=dtype)
    upsample_concat(leaves, size, backend=backend).backward(grad)
    double_leaves = [p.detach().double().requires_grad_() for p in parts]
    upsample_concat_reference(double_leaves, size).backward(grad.double())
    for leaf, double_leaf in zip(leaves, double_leaves):
        assert_close(leaf.grad, double_leaf.grad, dtype, f"upsample_concat backward {backend}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_ops_real_shapes(backend, shape, dtype, layout):
    backend_or_skip(backend, "batch_norm_relu")
    batch, c, h, w = shape
    # A large mean next to a small spread is where a one-pass variance loses its digits.
    x = laid_out(random(scaled(batch), c, shrink(h), shrink(w), dtype=dtype, scale=2.0, offset=3.0), layout)
    weight, bias = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    mean, var = batch_norm_stats(x, backend=backend)
    mean_ref, var_ref = batch_norm_stats_reference(x.double())
    # The statistics are fp32 whatever x's dtype: held to fp32's tolerance.
    assert_close(mean, mean_ref, torch.float32, f"batch_norm_stats mean {backend}")
    assert_close(var, var_ref, torch.float32, f"batch_norm_stats var {backend}")
    invstd = torch.rsqrt(var + 1e-5)
    out = torch.full((x.shape[0], c + 2, *x.shape[2:]), float("nan"), device=DEVICE, dtype=dtype)
    batch_norm_relu(x, mean, invstd, weight, bias, out=out, out_offset=2, backend=backend)
    double = dict(mean=mean.double(), invstd=invstd.double(), weight=weight.double(), bias=bias.double())
    assert_close(out[:, 2:], batch_norm_relu_reference(x.double(), **double), dtype, f"batch_norm_relu {backend}")
    assert torch.isnan(out[:, :2]).all(), "wrote outside its channel slice"
    grad = laid_out(random(*x.shape, dtype=dtype), layout)
    got = batch_norm_relu_backward(grad, x, mean, invstd, weight, bias, backend=backend)
    expected = batch_norm_relu_backward_reference(grad.double(), x.double(), **double)
    assert_close(got[0], expected[0], dtype, f"batch_norm_relu_backward input {backend}")
    # The weight and bias gradients are sums of N*H*W terms of both signs (262,144 here) whose
    # result is far smaller than the sum of their magnitudes: float32 accumulation is held to 1e-5
    # of that magnitude (the bound of a summation in fp32), not of the cancelled result (measured
    # on an H200: the Triton weight gradient 1.6e-5 of the result, the CUDA one under 1e-5).
    g64, x64 = grad.double(), x.double()
    normalised = (x64 - double["mean"].view(1, -1, 1, 1)) * double["invstd"].view(1, -1, 1, 1)
    active = (normalised * double["weight"].view(1, -1, 1, 1) + double["bias"].view(1, -1, 1, 1)) > 0
    magnitudes = {"weight": (g64 * normalised * active).abs().sum(dim=(0, 2, 3)),
                  "bias": (g64 * active).abs().sum(dim=(0, 2, 3))}
    for name, g, e in zip(("weight", "bias"), got[1:], expected[1:]):
        error = ((g.double() - e).norm() / magnitudes[name].norm()).item()
        assert error <= TOLERANCE[torch.float32], f"batch_norm_relu_backward {name} {backend}: {error:.3g} of the " \
                                                  "summed magnitudes"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [10, 100, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_ops_real_sizes(backend, classes, dtype):
    backend_or_skip(backend, "exit_partition")
    batch = scaled(4096)
    logits = random(batch, classes, dtype=dtype, scale=3.0)
    threshold = 0.4
    got = exit_partition(logits, threshold, backend=backend)
    expected = exit_partition_reference(logits.double(), threshold)
    # Confidences within rounding of the threshold may fall on either side in low precision; the
    # partition is checked on the backend's own decisions, the confidences against float64.
    assert_close(got[0], expected[0], torch.float32, f"exit_partition confidence {backend}")
    leaves = got[0] >= threshold
    order_ref = torch.cat([torch.nonzero(~leaves).flatten(), torch.nonzero(leaves).flatten()])
    assert torch.equal(got[2], order_ref), "order is not the stable continue/leave partition"
    assert int(got[3]) == int((~leaves).sum())
    result = torch.full((batch + 5, classes), float("nan"), device=DEVICE, dtype=dtype)
    result_exit = torch.full((batch + 5,), -1, device=DEVICE, dtype=torch.int64)
    positions = torch.randperm(batch + 5, device=DEVICE)[:batch]
    expected_result, expected_exit = result.clone(), result_exit.clone()
    scatter_exits(result, result_exit, logits, got[2], got[3], positions, 2, backend=backend)
    scatter_exits_reference(expected_result, expected_exit, logits, got[2], got[3], positions, 2)
    assert torch.equal(result.isnan(), expected_result.isnan())
    assert torch.equal(result.nan_to_num(), expected_result.nan_to_num()) and torch.equal(result_exit, expected_exit)
    # The scatter form takes the same decisions as exit_partition on this backend and writes the same rows.
    fused_result = torch.full_like(result, float("nan"))
    fused_exit = torch.full_like(result_exit, -1)
    order, num_continue = exit_partition_scatter(logits, threshold, "max_softmax", positions, 2, fused_result, fused_exit,
                                                 backend=backend)
    assert torch.equal(order, got[2]) and torch.equal(num_continue, got[3])
    assert torch.equal(fused_result.isnan(), result.isnan())
    assert torch.equal(fused_result.nan_to_num(), result.nan_to_num()) and torch.equal(fused_exit, result_exit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_real_state(backend):
    """The state alive at C-3's first exit at batch 1024, every layout at once, half of the samples kept."""
    backend_or_skip(backend, "gather_rows")
    batch = scaled(1024)
    shapes = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (96, 32, 32)]
    tensors = [laid_out(random(batch, *shape, dtype=dtype), layout)
               for shape, dtype, layout in zip(shapes, DTYPES + (torch.float32,), LAYOUTS + ("nchw",))]
    tensors.append(torch.randperm(batch, device=DEVICE))
    index = torch.randperm(batch, device=DEVICE)[: max(1, batch // 2)]
    for got, tensor in zip(gather_rows(tensors, index, backend=backend), tensors):
        assert torch.equal(got, tensor.index_select(0, index))


def _past_int32(backend: str):
    """A tensor of more than 2**31 elements (rehearsal: a small one, same code path otherwise)."""
    elements = 2**31 + 2**20 if not REHEARSAL else 2**16 + 4
    rows = 8
    return rows, elements // rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_past_int32_offsets(backend):
    """Rows whose element offsets pass 2**31: an int32 offset would read the wrong rows."""
    backend_or_skip(backend, "gather_rows")
    rows, per_row = _past_int32(backend)
    tensor = torch.empty(rows, per_row, device=DEVICE, dtype=torch.bfloat16)
    # Each row holds its own index at both ends and random values between: cheap to fill, and a
    # wrapped offset lands in another row's values.
    tensor.normal_()
    row_ids = torch.arange(rows, device=DEVICE, dtype=torch.bfloat16)
    tensor[:, 0], tensor[:, -1] = row_ids, row_ids
    index = torch.tensor([rows - 1, 0, rows - 2], device=DEVICE)
    (got,) = gather_rows([tensor], index, backend=backend)
    assert torch.equal(got, tensor.index_select(0, index))
    del tensor, got
    torch.cuda.empty_cache() if DEVICE.type == "cuda" else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_concat_past_int32_offsets(backend):
    """An output of more than 2**31 elements: the last samples' values, checked in float64."""
    backend_or_skip(backend, "upsample_concat")
    batch, channels, low, size = (2, 8, 8, 16) if REHEARSAL else (130, 64, 256, 512)
    # 130 * (64 + 64) * 512 * 512 = 4.4e9 output elements > 2**31 (bf16: 8.7 GB).
    parts = [random(batch, channels, size, size, dtype=torch.bfloat16),
             random(batch, channels, low, low, dtype=torch.bfloat16)]
    out = upsample_concat(parts, size, backend=backend)
    assert out.numel() > (2**31 if not REHEARSAL else 0)
    tail = slice(batch - 2, batch)  # the rows with the largest offsets
    expected = upsample_concat_reference([p[tail].double() for p in parts], size)
    assert_close(out[tail], expected, torch.bfloat16, f"upsample_concat past 2**31 {backend}")
    del out, parts
    torch.cuda.empty_cache() if DEVICE.type == "cuda" else None
