"""Triton kernel of fused_conv2d: an implicit-GEMM convolution with an affine+activation prologue and epilogue.

GEMM rows are output pixels (n, oh, ow), columns output channels, and the reduction runs over
(ci, kh, kw) in the weight's memory order, so the weight [Co, Ci, k, k] is a row-major [Co, K]
matrix. Each program computes a BLOCK_M x BLOCK_N output tile: per step of BLOCK_K reductions it
gathers an input tile from x through x's strides (masked to zero in the padding and past the
edges), applies the prologue act(x * scale + shift) on load to the real elements only, loads a
weight tile and accumulates their product in float32 (float64 for float64). The epilogue
act(scale * acc + shift) is applied in registers and the tile is stored through the output's
strides, so x may be a channel prefix of a bigger NCHW or channels_last buffer and the output a
channel slice of one. With GENSTATS each program also sums its stored tile (as stored, in the
output's dtype) and its squares per channel and adds them to the statistics vectors atomically:
the next batch norm's batch statistics without reading the output again.

Products: float16/bfloat16 tiles go to tl.dot in their own type (tensor cores), the prologue's
result rounded to it as eager BN -> ReLU would round it; float32 uses tl.dot in TF32 where eager
convolutions may (``float32_dots_in_tf32``: cuDNN's conv precision flag, on by default) and with
IEEE precision otherwise, so its results match float32 eager either way; float64 is multiplied and
summed elementwise (no float64 tl.dot everywhere). Under TRITON_INTERPRET=1 float32 dots stay IEEE
(the interpreter is the exact check), and bfloat16 tiles are upcast to float32 first (the
interpreter computes bfloat16 dots wrongly).
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
# How a tile product is computed (the kernel's DOT_MODE constexpr).
_DOT_NATIVE, _DOT_IEEE, _DOT_UPCAST, _DOT_ELEMENTWISE, _DOT_TF32 = 0, 1, 2, 3, 4
# Activation codes: the index in ranet_fast.ops.fused_conv2d.ACTIVATIONS (the enum of csrc/ops/fused_conv2d_math.h).
_NONE, _RELU, _RELU6, _SILU, _GELU, _HARDSWISH, _LEAKY_RELU = range(7)


@triton.jit
def _activate(value, KIND: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """Activation KIND of value, as torch.nn.functional computes it; the clamps are comparisons that
    are false for NaN, so a NaN passes through as in torch. Inexact constants (the slope, GELU's
    1/sqrt(2)) are materialised in value's type: a float argument or literal would reach a float64
    kernel rounded to float32."""
    if KIND == 1:
        value = tl.where(value < 0, 0.0, value)
    elif KIND == 2:
        value = tl.where(value < 0, 0.0, tl.where(value > 6, 6.0, value))
    elif KIND == 3:
        value = value / (1.0 + tl.exp(-value))
    elif KIND == 4:
        value = value * 0.5 * (1.0 + tl.erf(value * tl.full((), 0.7071067811865476, value.dtype)))
    elif KIND == 5:
        gate = value + 3.0
        gate = tl.where(gate < 0, 0.0, tl.where(gate > 6, 6.0, gate))
        value = value * gate / 6.0
    elif KIND == 6:
        value = tl.where(value > 0, value, value * tl.full((), NEGATIVE_SLOPE, value.dtype))
    return value


@triton.jit
def _fused_conv2d_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    stats_sum_ptr,
    stats_sumsq_ptr,
    prologue_scale_ptr,
    prologue_shift_ptr,
    epilogue_scale_ptr,
    epilogue_shift_ptr,
    in_height,
    in_width,
    x_stride_n,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    out_channels,
    out_height,
    out_width,
    out_stride_n,
    out_stride_c,
    out_stride_h,
    out_stride_w,
    rows,
    reduction,
    stride,
    padding,
    KERNEL: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr,
    HAS_EPILOGUE_SCALE: tl.constexpr,
    HAS_EPILOGUE_SHIFT: tl.constexpr,
    PROLOGUE_ACTIVATION: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NEGATIVE_SLOPE: tl.constexpr,
    GENSTATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_MODE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    rows_block = tl.program_id(0).to(INDEX_DTYPE) * BLOCK_M + tl.arange(0, BLOCK_M).to(INDEX_DTYPE)
    channels = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows_block < rows
    channel_mask = channels < out_channels
    ow = rows_block % out_width
    rest = rows_block // out_width
    oh = rest % out_height
    n = rest // out_height
    ih0 = oh * stride - padding
    iw0 = ow * stride - padding
    x_rows = x_ptr + n * x_stride_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, reduction, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < reduction
        kw = ks % KERNEL
        kh = (ks // KERNEL) % KERNEL
        ci = (ks // (KERNEL * KERNEL)).to(INDEX_DTYPE)
        ih = ih0[:, None] + kh[None, :]
        iw = iw0[:, None] + kw[None, :]
        inside = (row_mask[:, None] & k_mask[None, :]) & ((ih >= 0) & (ih < in_height) & (iw >= 0) & (iw < in_width))
        a = tl.load(x_rows[:, None] + ci[None, :] * x_stride_c + ih * x_stride_h + iw * x_stride_w, mask=inside,
                    other=0.0)
        if HAS_PROLOGUE:
            scale = tl.load(prologue_scale_ptr + ci, mask=k_mask, other=0.0)
            shift = tl.load(prologue_shift_ptr + ci, mask=k_mask, other=0.0)
            activated = _activate(a.to(ACC_DTYPE) * scale[None, :] + shift[None, :], PROLOGUE_ACTIVATION,
                                  NEGATIVE_SLOPE)
            # Padding and masked elements stay zero.
            a = tl.where(inside, activated, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(weight_ptr + channels[None, :] * reduction + ks[:, None],
                    mask=channel_mask[None, :] & k_mask[:, None], other=0.0)
        # DOT_MODE: 0 native, 1 IEEE float32, 2 upcast to float32, 3 elementwise, 4 TF32 (see _dot_mode).
        if DOT_MODE == 0:
            acc += tl.dot(a, b, out_dtype=ACC_DTYPE)
        elif DOT_MODE == 1:
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=ACC_DTYPE)
        elif DOT_MODE == 2:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC_DTYPE)
        elif DOT_MODE == 3:
            acc += tl.sum(a.to(ACC_DTYPE)[:, :, None] * b.to(ACC_DTYPE)[None, :, :], axis=1)
        else:
            acc += tl.dot(a, b, input_precision="tf32", out_dtype=ACC_DTYPE)

    if HAS_EPILOGUE_SCALE:
        acc = acc * tl.load(epilogue_scale_ptr + channels, mask=channel_mask, other=1.0)[None, :]
    if HAS_EPILOGUE_SHIFT:
        acc = acc + tl.load(epilogue_shift_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    acc = _activate(acc, ACTIVATION, NEGATIVE_SLOPE)
    out_offsets = (n * out_stride_n + oh * out_stride_h + ow * out_stride_w)[:, None] + channels[None, :] * out_stride_c
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offsets, stored, mask=row_mask[:, None] & channel_mask[None, :])
    if GENSTATS:
        values = tl.where(row_mask[:, None] & channel_mask[None, :], stored.to(ACC_DTYPE), 0.0)
        tl.atomic_add(stats_sum_ptr + channels, tl.sum(values, axis=0), mask=channel_mask)
        tl.atomic_add(stats_sumsq_ptr + channels, tl.sum(values * values, axis=0), mask=channel_mask)


# Whether this import got Triton's interpreter (TRITON_INTERPRET=1, CPU tensors).
INTERPRETED = isinstance(_fused_conv2d_kernel, InterpretedFunction)


def _largest_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def float32_dots_in_tf32() -> bool:
    """Whether eager float32 convolutions may use TF32 now: cuDNN's conv precision, which F.conv2d
    follows (torch.backends.cudnn.conv.fp32_precision, inheriting from cudnn.fp32_precision and
    torch.backends.fp32_precision where "none"; torch.backends.cudnn.allow_tf32 before torch 2.9).
    The matmul flag governs GEMMs (torch.mm), not convolutions, so it is not read."""
    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):
        return bool(cudnn.allow_tf32)
    for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def _dot_mode(dtype: torch.dtype, tf32: bool) -> int:
    """How tiles of dtype are multiplied; tf32: float32 dots may use TF32 (ignored by the interpreter)."""
    if dtype == torch.float64:
        return _DOT_ELEMENTWISE
    if dtype == torch.float32:
        return _DOT_TF32 if tf32 and not INTERPRETED else _DOT_IEEE
    if dtype == torch.bfloat16 and INTERPRETED:
        return _DOT_UPCAST
    return _DOT_NATIVE


def _gpu_tile(dtype: torch.dtype, out_channels: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of a compiled (GPU) launch."""
    if dtype == torch.float64:
        # The elementwise product holds a BLOCK_M x BLOCK_K x BLOCK_N cube in registers: with a
        # reduction step of 8 the variants with a SiLU, Hardswish or LeakyReLU prologue spilled on
        # sm_90 (tests/test_triton_sm90_compile.py); 4 halves the cube and the prologue's tile.
        return 32, 16, 4, 4
    # Eight warps: with four, a 64 x 64 tile spilled registers on sm_90 for float32 (IEEE products on
    # the FMA units) and for 64-bit indices (tests/test_triton_sm90_compile.py); the two warpgroups
    # split the tile's columns, so half-precision products stay wgmma instructions. float32 also
    # takes half the reduction step (a 64 x 32 x 32 step with 64-bit indices still spilled); the
    # FMA units gain nothing from a longer one.
    block_n = max(16, min(64, triton.next_power_of_2(out_channels)))
    return 64, block_n, 16 if dtype == torch.float32 else 32, 8


# Kernel sizes of RANet's and MSDNet's convs (1, 3) and of torchvision stems that convert fuses (7).
KERNEL_SIZES = (1, 3, 7)
_FLAGS = ("HAS_PROLOGUE", "HAS_EPILOGUE_SCALE", "HAS_EPILOGUE_SHIFT", "GENSTATS")
_ACTIVATION_CODES = range(_LEAKY_RELU + 1)
# leaky_relu's slope of the compiled variants (nn.LeakyReLU's default): the slope is a constant of
# the code, which compiles alike for every value.
_DEFAULT_NEGATIVE_SLOPE = 0.01
# Integer arguments that can be 1: none, or the unit width strides of NCHW input and output (most calls).
_UNIT_CASES = ((), ("x_stride_w", "out_stride_w"))


def specializations() -> list[Specialization]:
    """Every variant fused_conv2d_triton compiles on CUDA for KERNEL_SIZES (see kernels/specializations.py)."""
    result = []
    for dtype in FLOATING_DTYPES:
        accumulation = torch.float64 if dtype == torch.float64 else torch.float32
        tiles = sorted({_gpu_tile(dtype, co) for co in powers_of_two(128)})
        dot_modes = sorted({_dot_mode(dtype, tf32) for tf32 in (False, True)})
        for (block_m, block_n, block_k, num_warps), dot_mode in itertools.product(tiles, dot_modes):
            for kernel, flags, prologue_activation, activation, index_dtype, wide, ones in itertools.product(
                    KERNEL_SIZES, itertools.product((False, True), repeat=len(_FLAGS)), _ACTIVATION_CODES,
                    _ACTIVATION_CODES, (tl.int32, tl.int64), (False, True), _UNIT_CASES):
                if wide and index_dtype == tl.int32:
                    continue  # an integer argument of 2**31 or more means offsets that large: int64
                if prologue_activation != _prologue_activation(flags[0], prologue_activation):
                    continue  # the launcher passes one prologue activation when there is no prologue
                result.append(Specialization(
                    _fused_conv2d_kernel,
                    dict(KERNEL=kernel, **dict(zip(_FLAGS, flags)), PROLOGUE_ACTIVATION=prologue_activation,
                         ACTIVATION=activation,
                         NEGATIVE_SLOPE=_negative_slope(prologue_activation, activation, _DEFAULT_NEGATIVE_SLOPE),
                         BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k, ACC_DTYPE=_ACCUMULATION_TYPES[dtype], DOT_MODE=dot_mode,
                         INDEX_DTYPE=index_dtype),
                    dict(x_ptr=dtype, weight_ptr=dtype, out_ptr=dtype, stats_sum_ptr=accumulation,
                         stats_sumsq_ptr=accumulation, prologue_scale_ptr=accumulation,
                         prologue_shift_ptr=accumulation, epilogue_scale_ptr=accumulation,
                         epilogue_shift_ptr=accumulation),
                    wide=wide,
                    ones=ones,
                    num_warps=num_warps,
                    tf32=dot_mode == _DOT_TF32,
                ))
    return result


def _prologue_activation(has_prologue: bool, prologue_activation: int) -> int:
    """The PROLOGUE_ACTIVATION a launch passes: none without a prologue, so that no variant differs by it."""
    return prologue_activation if has_prologue else _NONE


def _negative_slope(prologue_activation: int, activation: int, negative_slope: float) -> float:
    """The NEGATIVE_SLOPE a launch passes: 0 unless leaky_relu reads it, so that no variant differs by it."""
    return negative_slope if _LEAKY_RELU in (prologue_activation, activation) else 0.0


def fused_conv2d_triton(out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride: int,
                        padding: int, prologue_activation: int, activation: int, negative_slope: float,
                        out_offset: int, stats_sum=None, stats_sumsq=None) -> None:
    """Writes act(es * conv2d(pro(x), weight) + eh) into out[:, out_offset : out_offset + Co].

    The caller (ranet_fast.ops.fused_conv2d) validates shapes, dtypes and devices; scales and
    shifts are 1-D tensors of the accumulation dtype or None. With stats_sum and stats_sumsq
    (dense [Co] of the accumulation dtype) they receive the per-channel sum and sum of squares of
    the written channels. Nothing is launched when N == 0 (the statistics are then zero).
    """
    if stats_sum is not None:
        stats_sum.zero_()
        stats_sumsq.zero_()
    out_channels, in_channels, kernel, _ = weight.shape
    prologue_activation = _prologue_activation(prologue_scale is not None, prologue_activation)
    out_slice = out.narrow(1, out_offset, out_channels)
    batch, _, out_height, out_width = out_slice.shape
    rows = batch * out_height * out_width
    if rows == 0:
        return
    weight = weight.contiguous()
    reduction = in_channels * kernel * kernel
    if INTERPRETED:
        # The interpreter runs programs one after another, each as a few numpy calls per block:
        # few large programs are what is fast there.
        block_m = min(1024, triton.next_power_of_2(rows))
        block_n = max(16, min(128, triton.next_power_of_2(out_channels)))
        block_k = max(16, min(64, triton.next_power_of_2(reduction)))
        if x.dtype == torch.float64:
            # The elementwise product's BLOCK_M x BLOCK_K x BLOCK_N cube must stay within Triton's
            # 2**20 elements per block: 1024 x 8 x 128 at most.
            block_k = 8
        num_warps = 4
    else:
        block_m, block_n, block_k, num_warps = _gpu_tile(x.dtype, out_channels)
    # The last row block overshoots rows by up to block_m.
    index_dtype = index_type(max(_largest_offset(x), _largest_offset(out), rows) + block_m)
    # Absent scales, shifts and statistics are never loaded or stored (constexpr flags); any pointer
    # fills their place.
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_channels, block_n))
    _fused_conv2d_kernel[grid](
        x,
        weight,
        out_slice,
        stats_sum if stats_sum is not None else weight,
        stats_sumsq if stats_sumsq is not None else weight,
        prologue_scale if prologue_scale is not None else weight,
        prologue_shift if prologue_shift is not None else weight,
        epilogue_scale if epilogue_scale is not None else weight,
        epilogue_shift if epilogue_shift is not None else weight,
        x.shape[2],
        x.shape[3],
        *x.stride(),
        out_channels,
        out_height,
        out_width,
        *out_slice.stride(),
        rows,
        reduction,
        stride,
        padding,
        KERNEL=kernel,
        HAS_PROLOGUE=prologue_scale is not None,
        HAS_EPILOGUE_SCALE=epilogue_scale is not None,
        HAS_EPILOGUE_SHIFT=epilogue_shift is not None,
        PROLOGUE_ACTIVATION=prologue_activation,
        ACTIVATION=activation,
        NEGATIVE_SLOPE=_negative_slope(prologue_activation, activation, negative_slope),
        GENSTATS=stats_sum is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ACC_DTYPE=_ACCUMULATION_TYPES[x.dtype],
        DOT_MODE=_dot_mode(x.dtype, float32_dots_in_tf32()),
        INDEX_DTYPE=index_dtype,
        num_warps=num_warps,
    )
