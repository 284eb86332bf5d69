"""Triton kernels of the batch-norm training ops (ranet_fast.ops.batch_norm_relu).

Every kernel works on [BLOCK_P, BLOCK_C] tiles of (pixel, channel) pairs, pixels numbered in NHW
order, and reads and writes through the tensors' strides: a channels_last tensor or a channel
slice of a bigger buffer is read in place. (Triton specialises integer arguments equal to 1, so a
unit channel or width stride is known when the kernel is compiled and the loads coalesce along it.)

Reductions are deterministic two-stage ones: the pixels are cut into splits whose size depends on
the shape only; program (channel block, split) reduces its split and stores one partial per
channel, and a second kernel combines the partials of each channel in split order. No atomics.

Statistics: each tile's Moments (count, mean, M2) come from the corrected two-pass formula on the
tile in registers (its mean, then the sums of deviations from it), and tiles, then splits, merge
with Chan's formula, as in csrc/ops/batch_norm_relu_math.h. Nothing subtracts E[x]^2 from E[x^2].
"""

import itertools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .indexing import index_type
from .specializations import FLOATING_DTYPES, Specialization, powers_of_two

_ACCUMULATION_TYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float64: tl.float64,
}
# At most this many splits per channel: the combining kernel walks them in order.
_MAX_SPLITS = 256
# Tiles a split reduces at least (when there are that many), so a program has work to amortise.
_MIN_TILES_PER_SPLIT = 8


@triton.jit
def _pixel_offsets(pixels, height, width, stride_n, stride_h, stride_w):
    w = pixels % width
    rest = pixels // width
    return (rest // height) * stride_n + (rest % height) * stride_h + w * stride_w


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Moments of the union of two disjoint sets (counts as floats, count_b > 0)."""
    count = count_a + count_b
    fraction = count_b / count
    delta = mean_b - mean_a
    return mean_a + delta * fraction, m2_a + m2_b + delta * delta * count_a * fraction


@triton.jit
def _moments_partials_kernel(
    x_ptr, mean_partials_ptr, m2_partials_ptr,
    channels, height, width, pixels, pixels_per_split,
    stride_n, stride_c, stride_h, stride_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    split = tl.program_id(1).to(INDEX_DTYPE)
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, pixels)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(INDEX_DTYPE)
        pixel_mask = ps < end
        mask = pixel_mask[:, None] & channel_mask[None, :]
        offsets = _pixel_offsets(ps, height, width, stride_n, stride_h, stride_w)[:, None] + cs[None, :] * stride_c
        values = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        # Every tile but a split's last is full, so the counts follow from the positions.
        count_before = (p0 - start).to(ACC_DTYPE)
        count = tl.minimum(end - p0, BLOCK_P).to(ACC_DTYPE)
        shift = tl.sum(values, axis=0) / count
        deviations = tl.where(mask, values - shift[None, :], 0.0)
        s1 = tl.sum(deviations, axis=0)
        s2 = tl.sum(deviations * deviations, axis=0)
        tile_m2 = s2 - s1 * s1 / count
        tile_m2 = tl.where(tile_m2 < 0, 0.0, tile_m2)  # rounding below zero; `< 0` keeps NaN
        mean, m2 = _chan_merge(count_before, mean, m2, count, shift + s1 / count, tile_m2)
    tl.store(mean_partials_ptr + split * channels + cs, mean, mask=channel_mask)
    tl.store(m2_partials_ptr + split * channels + cs, m2, mask=channel_mask)


@triton.jit
def _moments_combine_kernel(
    mean_partials_ptr, m2_partials_ptr, mean_ptr, var_ptr,
    channels, pixels, pixels_per_split, splits,
    BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for split in range(0, splits):
        start = split * pixels_per_split
        count = tl.minimum(pixels - start, pixels_per_split).to(ACC_DTYPE)
        split_mean = tl.load(mean_partials_ptr + split * channels + cs, mask=channel_mask, other=0.0)
        split_m2 = tl.load(m2_partials_ptr + split * channels + cs, mask=channel_mask, other=0.0)
        mean, m2 = _chan_merge(start.to(ACC_DTYPE), mean, m2, count, split_mean, split_m2)
    tl.store(mean_ptr + cs, mean, mask=channel_mask)
    tl.store(var_ptr + cs, m2 / pixels, mask=channel_mask)


@triton.jit
def _channel_constants(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cs, channel_mask):
    mean = tl.load(mean_ptr + cs, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + cs, mask=channel_mask, other=0.0)
    scale = invstd * tl.load(weight_ptr + cs, mask=channel_mask, other=0.0)
    bias = tl.load(bias_ptr + cs, mask=channel_mask, other=0.0)
    return mean, invstd, scale, bias


@triton.jit
def _forward_kernel(
    x_ptr, out_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    channels, height, width, pixels,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    ps = tl.program_id(0).to(INDEX_DTYPE) * BLOCK_P + tl.arange(0, BLOCK_P).to(INDEX_DTYPE)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    mask = (ps < pixels)[:, None] & channel_mask[None, :]
    mean, _, scale, bias = _channel_constants(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cs, channel_mask)
    x_offsets = _pixel_offsets(ps, height, width, x_stride_n, x_stride_h, x_stride_w)[:, None] + cs[None, :] * x_stride_c
    values = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    z = (values - mean[None, :]) * scale[None, :] + bias[None, :]
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # `< 0` keeps NaN, as torch.relu does
    out_offsets = (_pixel_offsets(ps, height, width, out_stride_n, out_stride_h, out_stride_w)[:, None]
                   + cs[None, :] * out_stride_c)
    tl.store(out_ptr + out_offsets, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(
    grad_ptr, x_ptr, ps, cs, mask, mean, invstd, scale, bias,
    height, width,
    g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    RELU: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """(dz, xhat) of a tile; zero dz where masked."""
    x_offsets = _pixel_offsets(ps, height, width, x_stride_n, x_stride_h, x_stride_w)[:, None] + cs[None, :] * x_stride_c
    g_offsets = _pixel_offsets(ps, height, width, g_stride_n, g_stride_h, g_stride_w)[:, None] + cs[None, :] * g_stride_c
    values = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    dz = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if RELU:
        z = (values - mean[None, :]) * scale[None, :] + bias[None, :]
        dz = tl.where(z > 0, dz, 0.0)
    return dz, (values - mean[None, :]) * invstd[None, :]


@triton.jit
def _grad_partials_kernel(
    grad_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, dz_partials_ptr, dz_xhat_partials_ptr,
    channels, height, width, pixels, pixels_per_split,
    g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    split = tl.program_id(1).to(INDEX_DTYPE)
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, pixels)
    mean, invstd, scale, bias = _channel_constants(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cs, channel_mask)
    dz_sum = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    dz_xhat_sum = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(INDEX_DTYPE)
        mask = (ps < end)[:, None] & channel_mask[None, :]
        dz, xhat = _grad_tile(grad_ptr, x_ptr, ps, cs, mask, mean, invstd, scale, bias, height, width,
                              g_stride_n, g_stride_c, g_stride_h, g_stride_w,
                              x_stride_n, x_stride_c, x_stride_h, x_stride_w, RELU, ACC_DTYPE)
        dz_sum += tl.sum(dz, axis=0)
        dz_xhat_sum += tl.sum(dz * xhat, axis=0)
    tl.store(dz_partials_ptr + split * channels + cs, dz_sum, mask=channel_mask)
    tl.store(dz_xhat_partials_ptr + split * channels + cs, dz_xhat_sum, mask=channel_mask)


@triton.jit
def _grad_combine_kernel(
    dz_partials_ptr, dz_xhat_partials_ptr, grad_weight_ptr, grad_bias_ptr, channels, splits,
    BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    dz_sum = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    dz_xhat_sum = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for split in range(0, splits):
        dz_sum += tl.load(dz_partials_ptr + split * channels + cs, mask=channel_mask, other=0.0)
        dz_xhat_sum += tl.load(dz_xhat_partials_ptr + split * channels + cs, mask=channel_mask, other=0.0)
    tl.store(grad_bias_ptr + cs, dz_sum, mask=channel_mask)
    tl.store(grad_weight_ptr + cs, dz_xhat_sum, mask=channel_mask)


@triton.jit
def _grad_x_kernel(
    grad_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, grad_weight_ptr, grad_bias_ptr,
    channels, height, width, pixels,
    g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    ps = tl.program_id(0).to(INDEX_DTYPE) * BLOCK_P + tl.arange(0, BLOCK_P).to(INDEX_DTYPE)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = cs < channels
    mask = (ps < pixels)[:, None] & channel_mask[None, :]
    mean, invstd, scale, bias = _channel_constants(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cs, channel_mask)
    mean_dz = tl.load(grad_bias_ptr + cs, mask=channel_mask, other=0.0) / pixels
    mean_dz_xhat = tl.load(grad_weight_ptr + cs, mask=channel_mask, other=0.0) / pixels
    dz, xhat = _grad_tile(grad_ptr, x_ptr, ps, cs, mask, mean, invstd, scale, bias, height, width,
                          g_stride_n, g_stride_c, g_stride_h, g_stride_w,
                          x_stride_n, x_stride_c, x_stride_h, x_stride_w, RELU, ACC_DTYPE)
    grad_x = scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :])
    out_offsets = (_pixel_offsets(ps, height, width, out_stride_n, out_stride_h, out_stride_w)[:, None]
                   + cs[None, :] * out_stride_c)
    tl.store(out_ptr + out_offsets, grad_x.to(out_ptr.dtype.element_ty), mask=mask)


# Whether this import got Triton's interpreter (TRITON_INTERPRET=1, CPU tensors).
INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)


def _largest_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def _index_dtype(pixels: int, *tensors: torch.Tensor, block: int):
    return index_type(max([pixels + block] + [_largest_offset(t) + block for t in tensors]))


def _blocks(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the tiles.

    Triton lays a tile's threads along its last axis unless it can prove another axis contiguous.
    When x's channels are innermost, that axis (channels) is the unit-stride one; otherwise a tile
    holds one channel, so the threads run along the pixels, which are contiguous within rows.
    """
    channels = x.shape[1]
    if INTERPRETED:
        # The interpreter runs programs one after another as numpy calls: few large ones are fast.
        block_c = min(64, triton.next_power_of_2(channels))
        return max(16, 8192 // block_c), block_c
    return _gpu_blocks(channels, channels > 1 and x.stride(1) == 1)


def _gpu_blocks(channels: int, channels_inner: bool) -> tuple[int, int]:
    if channels_inner:
        block_c = min(64, triton.next_power_of_2(channels))
        return max(16, 2048 // block_c), block_c
    return 1024, 1


def _combine_block(channels: int) -> int:
    return min(128, triton.next_power_of_2(channels))


def _splits(pixels: int, block_p: int) -> tuple[int, int]:
    """(pixels_per_split, splits): tile-aligned splits, a function of the shape only."""
    tiles = triton.cdiv(pixels, block_p)
    tiles_per_split = max(min(tiles, _MIN_TILES_PER_SPLIT), triton.cdiv(tiles, _MAX_SPLITS))
    pixels_per_split = tiles_per_split * block_p
    return pixels_per_split, triton.cdiv(pixels, pixels_per_split)


def _shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    batch, channels, height, width = x.shape
    return channels, height, width, batch * height * width


def specializations() -> list[Specialization]:
    """Every variant the batch-norm launchers compile on CUDA (see kernels/specializations.py)."""
    result = []
    channel_counts = powers_of_two(128)
    # The combining kernels see only accumulation-type tensors: one variant set per accumulation type.
    for acc_dtype in (torch.float32, torch.float64):
        for block in sorted({_combine_block(channels) for channels in channel_counts}):
            for wide, ones in itertools.product((False, True), ((), ("channels",))):
                constants = dict(BLOCK_C=block, ACC_DTYPE=_ACCUMULATION_TYPES[acc_dtype])
                result.append(Specialization(_moments_combine_kernel, constants, dict.fromkeys(
                    ("mean_partials_ptr", "m2_partials_ptr", "mean_ptr", "var_ptr"), acc_dtype), wide=wide, ones=ones))
                result.append(Specialization(_grad_combine_kernel, constants, dict.fromkeys(
                    ("dz_partials_ptr", "dz_xhat_partials_ptr", "grad_weight_ptr", "grad_bias_ptr"), acc_dtype),
                    wide=wide, ones=ones))
    for dtype in FLOATING_DTYPES:
        acc = _ACCUMULATION_TYPES[dtype]
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        tiles = {(_gpu_blocks(channels, inner), inner) for channels in channel_counts for inner in (False, True)
                 if channels > 1 or not inner}
        for ((block_p, block_c), inner), index_dtype, wide, unit_strides in itertools.product(
                sorted(tiles), (tl.int32, tl.int64), (False, True), (False, True)):
            if wide and index_dtype == tl.int32:
                continue  # an integer argument of 2**31 or more means offsets that large: int64
            tile = dict(BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc, INDEX_DTYPE=index_dtype)
            # A unit stride along the innermost dimension of every tensor (channels or width).
            unit = "_stride_c" if inner else "_stride_w"
            ones = lambda kernel: tuple(name for name in kernel.arg_names if unit_strides and f"_{name}".endswith(unit))
            case = "unit inner strides" if unit_strides else "none"
            vectors = ("mean_ptr", "invstd_ptr", "weight_ptr", "bias_ptr")
            result.append(Specialization(
                _moments_partials_kernel, tile,
                dict(x_ptr=dtype, mean_partials_ptr=acc_dtype, m2_partials_ptr=acc_dtype),
                wide=wide, ones=ones(_moments_partials_kernel), ones_case=case))
            for relu in (False, True):
                tile_relu = dict(RELU=relu, **tile)
                result.append(Specialization(
                    _forward_kernel, tile_relu, dict(x_ptr=dtype, out_ptr=dtype, **dict.fromkeys(vectors, acc_dtype)),
                    wide=wide, ones=ones(_forward_kernel), ones_case=case))
                result.append(Specialization(
                    _grad_partials_kernel, tile_relu,
                    dict(grad_ptr=dtype, x_ptr=dtype, dz_partials_ptr=acc_dtype, dz_xhat_partials_ptr=acc_dtype,
                         **dict.fromkeys(vectors, acc_dtype)),
                    wide=wide, ones=ones(_grad_partials_kernel), ones_case=case))
                result.append(Specialization(
                    _grad_x_kernel, tile_relu,
                    dict(grad_ptr=dtype, x_ptr=dtype, out_ptr=dtype, grad_weight_ptr=acc_dtype,
                         grad_bias_ptr=acc_dtype, **dict.fromkeys(vectors, acc_dtype)),
                    wide=wide, ones=ones(_grad_x_kernel), ones_case=case))
    return result


def batch_norm_stats_triton(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Writes x's per-channel mean and biased variance into mean and var ([C], accumulation dtype).

    The caller (ranet_fast.ops.batch_norm_relu) validates; N * H * W >= 2.
    """
    channels, height, width, pixels = _shape(x)
    block_p, block_c = _blocks(x)
    pixels_per_split, splits = _splits(pixels, block_p)
    acc = _ACCUMULATION_TYPES[x.dtype]
    mean_partials = torch.empty((splits, channels), dtype=mean.dtype, device=x.device)
    m2_partials = torch.empty_like(mean_partials)
    _moments_partials_kernel[(triton.cdiv(channels, block_c), splits)](
        x, mean_partials, m2_partials, channels, height, width, pixels, pixels_per_split, *x.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc, INDEX_DTYPE=_index_dtype(pixels, x, block=block_p),
    )
    combine_block = _combine_block(channels)
    _moments_combine_kernel[(triton.cdiv(channels, combine_block),)](
        mean_partials, m2_partials, mean, var, channels, pixels, pixels_per_split, splits,
        BLOCK_C=combine_block, ACC_DTYPE=acc,
    )


def batch_norm_relu_triton(out: torch.Tensor, x: torch.Tensor, mean, invstd, weight, bias, relu: bool) -> None:
    """Writes act((x - mean) * invstd * weight + bias) into out (x's shape, any strides).

    mean, invstd, weight and bias are contiguous [C] tensors of the accumulation dtype; nothing is
    launched when x is empty.
    """
    channels, height, width, pixels = _shape(x)
    if pixels == 0:
        return
    block_p, block_c = _blocks(x)
    _forward_kernel[(triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c))](
        x, out, mean, invstd, weight, bias, channels, height, width, pixels, *x.stride(), *out.stride(),
        RELU=bool(relu), BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=_ACCUMULATION_TYPES[x.dtype],
        INDEX_DTYPE=_index_dtype(pixels, x, out, block=block_p),
    )


def batch_norm_relu_backward_triton(grad_x, grad_weight, grad_bias, grad_out, x, mean, invstd, weight, bias,
                                    relu: bool) -> None:
    """Writes the training-mode gradient into grad_x (x's shape), grad_weight and grad_bias ([C])."""
    channels, height, width, pixels = _shape(x)
    if pixels == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return
    block_p, block_c = _blocks(x)
    pixels_per_split, splits = _splits(pixels, block_p)
    acc = _ACCUMULATION_TYPES[x.dtype]
    index_dtype = _index_dtype(pixels, x, grad_out, grad_x, block=block_p)
    dz_partials = torch.empty((splits, channels), dtype=grad_weight.dtype, device=x.device)
    dz_xhat_partials = torch.empty_like(dz_partials)
    _grad_partials_kernel[(triton.cdiv(channels, block_c), splits)](
        grad_out, x, mean, invstd, weight, bias, dz_partials, dz_xhat_partials,
        channels, height, width, pixels, pixels_per_split, *grad_out.stride(), *x.stride(),
        RELU=bool(relu), BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc, INDEX_DTYPE=index_dtype,
    )
    combine_block = _combine_block(channels)
    _grad_combine_kernel[(triton.cdiv(channels, combine_block),)](
        dz_partials, dz_xhat_partials, grad_weight, grad_bias, channels, splits,
        BLOCK_C=combine_block, ACC_DTYPE=acc,
    )
    _grad_x_kernel[(triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c))](
        grad_out, x, grad_x, mean, invstd, weight, bias, grad_weight, grad_bias,
        channels, height, width, pixels, *grad_out.stride(), *x.stride(), *grad_x.stride(),
        RELU=bool(relu), BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc, INDEX_DTYPE=index_dtype,
    )
