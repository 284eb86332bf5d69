"""Triton kernels of upsample_concat: bilinear resize (align_corners=True) into channel slices.

Forward: every part p_i [N, C_i, H_i, W_i] is written, resized to out's (H, W)
(or copied when its size already is (H, W)), into out[:, o_i : o_i + C_i].
Backward: the gradient of every part from the output gradient, in gather form:
each input-gradient element sums the output-gradient elements that read it,
found by recomputing the forward's indices and weights for a small range of
candidate outputs, so the result is deterministic and needs no atomics.

One launch handles up to MAX_PARTS_PER_LAUNCH parts. Each part's pointer,
sizes and strides are scalar kernel arguments and its elements occupy a
contiguous range of program ids; longer part lists are launched in chunks.
Any strides work for parts, out and grad_output (NCHW, channels_last, channel
slices of bigger buffers); the element order inside a part follows out's (or
the gradient's) memory order so that stores are coalesced.

The index and weight arithmetic is torch's (upsample_bilinear2d,
align_corners=True), in float32 (float64 for float64 tensors):
scale = (in - 1) / (out - 1) if out > 1 else 0; src = scale * dst;
i0 = (int)src; i1 = i0 + (i0 < in - 1 and scale != 1); l1 = src - i0; l0 = 1 - l1.
"""

import itertools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .indexing import index_type
from .specializations import FLOATING_DTYPES, Specialization

MAX_PARTS_PER_LAUNCH = 4
# Elements per program: enough to hide memory latency, few registers per thread.
_FORWARD_BLOCK = 1024
_BACKWARD_BLOCK = 256
# Warps of compiled launches (tests/test_triton_sm90_compile.py checks both on sm_90). Forward:
# with Triton's default of four the float16 forward with unit strides spilled registers (8
# elements per thread). Backward: Triton's four.
_FORWARD_WARPS = 8
_BACKWARD_WARPS = 4
# The backward's register cap (PTX .maxnreg). Left to itself ptxas (sm_90) kept int64 variants at 56
# registers and spilled 8 bytes around its 64-bit division subroutine; with a cap it takes what it
# needs (up to 72 registers, fp64 with int64 indices) and spills nothing. 64 still spilled fp64.
_BACKWARD_MAX_REGISTERS = 128


@triton.jit
def _split_index(index, size_c, size_h, size_w, CHANNELS_INNER: tl.constexpr):
    """(n, c, h, w) of a flat element index in NCHW order, or NHWC order when CHANNELS_INNER."""
    if CHANNELS_INNER:
        c = index % size_c
        rest = index // size_c
        w = rest % size_w
        rest = rest // size_w
        h = rest % size_h
        n = rest // size_h
    else:
        w = index % size_w
        rest = index // size_w
        h = rest % size_h
        rest = rest // size_h
        c = rest % size_c
        n = rest // size_c
    return n, c, h, w


@triton.jit
def _source_scale(in_size, out_size, float32_scale, ACC_DTYPE: tl.constexpr):
    """(in - 1) / (out - 1) in the accumulation type, 0 for a single output.

    The float32 value comes correctly rounded from the host (Triton's float32
    division may be approximate on the GPU); float64 division is always exact,
    and a Python float argument would reach the kernel rounded to float32.
    """
    if ACC_DTYPE == tl.float64:
        # tl.cast, not .to: sizes of 1 reach the kernel as constexpr ints.
        denominator = tl.cast(out_size - 1, tl.float64)
        scale = tl.cast(in_size - 1, tl.float64) / tl.where(denominator > 0, denominator, 1.0)
        return tl.where(denominator > 0, scale, 0.0)
    else:
        return float32_scale


@triton.jit
def _source_taps(dst, scale, in_size, ACC_DTYPE: tl.constexpr):
    """Forward taps of output positions dst: (i0, i1, l0, l1), exactly as torch computes them."""
    src = scale * dst.to(ACC_DTYPE)
    i0 = src.to(dst.dtype)  # src >= 0, so truncation is floor
    # Along an axis whose size does not change (scale exactly 1) both taps read the same element,
    # as CPU eager does, so that a neighbour's inf/NaN is not spread by a zero weight (0 * inf).
    resizes = (tl.zeros_like(src) + scale) != 1.0  # a block, whether scale is a scalar or a Python float
    i1 = i0 + ((i0 < in_size - 1) & resizes).to(dst.dtype)
    l1 = src - i0.to(ACC_DTYPE)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def _forward_part(
    block,
    out_ptr,
    num_batches,
    out_height,
    out_width,
    out_stride_n,
    out_stride_c,
    out_stride_h,
    out_stride_w,
    part_ptr,
    part_channels,
    part_height,
    part_width,
    part_stride_n,
    part_stride_c,
    part_stride_h,
    part_stride_w,
    channel_offset,
    scale_h,
    scale_w,
    IDENTITY: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    index = block.to(INDEX_DTYPE) * BLOCK + tl.arange(0, BLOCK)
    n, c, h, w = _split_index(index, part_channels, out_height, out_width, CHANNELS_INNER)
    # n < N exactly when index < N * C_i * H * W (a product that could overflow int32).
    mask = n < num_batches
    part_base = part_ptr + n * part_stride_n + c * part_stride_c
    if IDENTITY:
        value = tl.load(part_base + h * part_stride_h + w * part_stride_w, mask=mask)
    else:
        h0, h1, h0_weight, h1_weight = _source_taps(h, _source_scale(part_height, out_height, scale_h, ACC_DTYPE),
                                                    part_height, ACC_DTYPE)
        w0, w1, w0_weight, w1_weight = _source_taps(w, _source_scale(part_width, out_width, scale_w, ACC_DTYPE),
                                                    part_width, ACC_DTYPE)
        row0 = part_base + h0 * part_stride_h
        row1 = part_base + h1 * part_stride_h
        x00 = tl.load(row0 + w0 * part_stride_w, mask=mask).to(ACC_DTYPE)
        x01 = tl.load(row0 + w1 * part_stride_w, mask=mask).to(ACC_DTYPE)
        x10 = tl.load(row1 + w0 * part_stride_w, mask=mask).to(ACC_DTYPE)
        x11 = tl.load(row1 + w1 * part_stride_w, mask=mask).to(ACC_DTYPE)
        # torch's order: rows first, then between rows.
        value = h0_weight * (w0_weight * x00 + w1_weight * x01) + h1_weight * (w0_weight * x10 + w1_weight * x11)
    out_offsets = n * out_stride_n + (channel_offset + c) * out_stride_c + h * out_stride_h + w * out_stride_w
    tl.store(out_ptr + out_offsets, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_concat_forward_kernel(
    out_ptr,
    num_batches,
    out_height,
    out_width,
    out_stride_n,
    out_stride_c,
    out_stride_h,
    out_stride_w,
    # Per part: pointer, channels, height, width, 4 strides, channel offset,
    # float32 scales, and the end of its range of program ids.
    p0_ptr, p0_c, p0_h, p0_w, p0_sn, p0_sc, p0_sh, p0_sw, p0_offset, p0_scale_h, p0_scale_w, p0_end,
    p1_ptr, p1_c, p1_h, p1_w, p1_sn, p1_sc, p1_sh, p1_sw, p1_offset, p1_scale_h, p1_scale_w, p1_end,
    p2_ptr, p2_c, p2_h, p2_w, p2_sn, p2_sc, p2_sh, p2_sw, p2_offset, p2_scale_h, p2_scale_w, p2_end,
    p3_ptr, p3_c, p3_h, p3_w, p3_sn, p3_sc, p3_sh, p3_sw, p3_offset, p3_scale_h, p3_scale_w, p3_end,
    NUM_PARTS: tl.constexpr,
    IDENTITY0: tl.constexpr,
    IDENTITY1: tl.constexpr,
    IDENTITY2: tl.constexpr,
    IDENTITY3: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < p0_end:
        _forward_part(pid, out_ptr, num_batches, out_height, out_width,
                      out_stride_n, out_stride_c, out_stride_h, out_stride_w,
                      p0_ptr, p0_c, p0_h, p0_w, p0_sn, p0_sc, p0_sh, p0_sw, p0_offset, p0_scale_h, p0_scale_w,
                      IDENTITY0, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)
    if NUM_PARTS > 1:
        if (pid >= p0_end) & (pid < p1_end):
            _forward_part(pid - p0_end, out_ptr, num_batches, out_height, out_width,
                          out_stride_n, out_stride_c, out_stride_h, out_stride_w,
                          p1_ptr, p1_c, p1_h, p1_w, p1_sn, p1_sc, p1_sh, p1_sw, p1_offset, p1_scale_h, p1_scale_w,
                          IDENTITY1, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)
    if NUM_PARTS > 2:
        if (pid >= p1_end) & (pid < p2_end):
            _forward_part(pid - p1_end, out_ptr, num_batches, out_height, out_width,
                          out_stride_n, out_stride_c, out_stride_h, out_stride_w,
                          p2_ptr, p2_c, p2_h, p2_w, p2_sn, p2_sc, p2_sh, p2_sw, p2_offset, p2_scale_h, p2_scale_w,
                          IDENTITY2, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)
    if NUM_PARTS > 3:
        if (pid >= p2_end) & (pid < p3_end):
            _forward_part(pid - p2_end, out_ptr, num_batches, out_height, out_width,
                          out_stride_n, out_stride_c, out_stride_h, out_stride_w,
                          p3_ptr, p3_c, p3_h, p3_w, p3_sn, p3_sc, p3_sh, p3_sw, p3_offset, p3_scale_h, p3_scale_w,
                          IDENTITY3, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)


@triton.jit
def _gather_tap(out_position, in_position, scale, in_size, ACC_DTYPE: tl.constexpr):
    """Whether output out_position reads in_position in the forward, and with which weight.

    Both taps count when they coincide (i0 == i1 at the last input): the
    forward reads that element twice.
    """
    i0, i1, l0, l1 = _source_taps(out_position, scale, in_size, ACC_DTYPE)
    reads_first = i0 == in_position
    reads_second = i1 == in_position
    weight = tl.where(reads_first, l0, 0.0) + tl.where(reads_second, l1, 0.0)
    return reads_first | reads_second, weight


@triton.jit
def _backward_part(
    block,
    grad_ptr,
    num_batches,
    out_height,
    out_width,
    grad_stride_n,
    grad_stride_c,
    grad_stride_h,
    grad_stride_w,
    part_grad_ptr,
    part_channels,
    part_height,
    part_width,
    part_stride_n,
    part_stride_c,
    part_stride_h,
    part_stride_w,
    channel_offset,
    scale_h,
    scale_w,
    outputs_per_input_h,
    outputs_per_input_w,
    candidates_h,
    candidates_w,
    IDENTITY: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    index = block.to(INDEX_DTYPE) * BLOCK + tl.arange(0, BLOCK)
    n, c, ih, iw = _split_index(index, part_channels, part_height, part_width, CHANNELS_INNER)
    mask = n < num_batches  # index < N * C_i * H_i * W_i
    grad_base = grad_ptr + n * grad_stride_n + (channel_offset + c) * grad_stride_c
    if IDENTITY:
        total = tl.load(grad_base + ih * grad_stride_h + iw * grad_stride_w, mask=mask)
    else:
        part_scale_h = _source_scale(part_height, out_height, scale_h, ACC_DTYPE)
        part_scale_w = _source_scale(part_width, out_width, scale_w, ACC_DTYPE)
        # Outputs reading input i have i0 in {i - 1, i}, so src in [i - 1, i + 1)
        # and dst in [(i - 1) * r, (i + 1) * r) with r = (out - 1) / (in - 1).
        # Starting one below absorbs rounding; the host sizes the candidate
        # counts to cover the rest, and the recomputed forward taps decide
        # which candidates actually read this input.
        first_h = tl.maximum(((ih - 1).to(tl.float32) * outputs_per_input_h).to(INDEX_DTYPE) - 1, 0)
        first_w = tl.maximum(((iw - 1).to(tl.float32) * outputs_per_input_w).to(INDEX_DTYPE) - 1, 0)
        total = tl.zeros((BLOCK,), ACC_DTYPE)
        for step_h in range(0, candidates_h):
            oh = first_h + step_h
            reads_h, weight_h = _gather_tap(oh, ih, part_scale_h, part_height, ACC_DTYPE)
            row_mask = mask & (oh < out_height) & reads_h
            row = grad_base + oh * grad_stride_h
            for step_w in range(0, candidates_w):
                ow = first_w + step_w
                reads_w, weight_w = _gather_tap(ow, iw, part_scale_w, part_width, ACC_DTYPE)
                reads = row_mask & (ow < out_width) & reads_w
                g = tl.load(row + ow * grad_stride_w, mask=reads, other=0.0).to(ACC_DTYPE)
                # Same product as torch's backward: (h weight * w weight) * gradient.
                total += tl.where(reads, (weight_h * weight_w) * g, 0.0)
    part_offsets = n * part_stride_n + c * part_stride_c + ih * part_stride_h + iw * part_stride_w
    tl.store(part_grad_ptr + part_offsets, total.to(part_grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_concat_backward_kernel(
    grad_ptr,
    num_batches,
    out_height,
    out_width,
    grad_stride_n,
    grad_stride_c,
    grad_stride_h,
    grad_stride_w,
    # Per part: its gradient's pointer, channels, height, width, 4 strides,
    # channel offset, float32 scales, candidate search parameters, and the end
    # of its range of program ids.
    p0_ptr, p0_c, p0_h, p0_w, p0_sn, p0_sc, p0_sh, p0_sw, p0_offset, p0_scale_h, p0_scale_w,
    p0_rate_h, p0_rate_w, p0_count_h, p0_count_w, p0_end,
    p1_ptr, p1_c, p1_h, p1_w, p1_sn, p1_sc, p1_sh, p1_sw, p1_offset, p1_scale_h, p1_scale_w,
    p1_rate_h, p1_rate_w, p1_count_h, p1_count_w, p1_end,
    p2_ptr, p2_c, p2_h, p2_w, p2_sn, p2_sc, p2_sh, p2_sw, p2_offset, p2_scale_h, p2_scale_w,
    p2_rate_h, p2_rate_w, p2_count_h, p2_count_w, p2_end,
    p3_ptr, p3_c, p3_h, p3_w, p3_sn, p3_sc, p3_sh, p3_sw, p3_offset, p3_scale_h, p3_scale_w,
    p3_rate_h, p3_rate_w, p3_count_h, p3_count_w, p3_end,
    NUM_PARTS: tl.constexpr,
    IDENTITY0: tl.constexpr,
    IDENTITY1: tl.constexpr,
    IDENTITY2: tl.constexpr,
    IDENTITY3: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < p0_end:
        _backward_part(pid, grad_ptr, num_batches, out_height, out_width,
                       grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
                       p0_ptr, p0_c, p0_h, p0_w, p0_sn, p0_sc, p0_sh, p0_sw, p0_offset, p0_scale_h, p0_scale_w,
                       p0_rate_h, p0_rate_w, p0_count_h, p0_count_w,
                       IDENTITY0, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)
    if NUM_PARTS > 1:
        if (pid >= p0_end) & (pid < p1_end):
            _backward_part(pid - p0_end, grad_ptr, num_batches, out_height, out_width,
                           grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
                           p1_ptr, p1_c, p1_h, p1_w, p1_sn, p1_sc, p1_sh, p1_sw, p1_offset, p1_scale_h, p1_scale_w,
                           p1_rate_h, p1_rate_w, p1_count_h, p1_count_w,
                           IDENTITY1, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)
    if NUM_PARTS > 2:
        if (pid >= p1_end) & (pid < p2_end):
            _backward_part(pid - p1_end, grad_ptr, num_batches, out_height, out_width,
                           grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
                           p2_ptr, p2_c, p2_h, p2_w, p2_sn, p2_sc, p2_sh, p2_sw, p2_offset, p2_scale_h, p2_scale_w,
                           p2_rate_h, p2_rate_w, p2_count_h, p2_count_w,
                           IDENTITY2, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)
    if NUM_PARTS > 3:
        if (pid >= p2_end) & (pid < p3_end):
            _backward_part(pid - p2_end, grad_ptr, num_batches, out_height, out_width,
                           grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
                           p3_ptr, p3_c, p3_h, p3_w, p3_sn, p3_sc, p3_sh, p3_sw, p3_offset, p3_scale_h, p3_scale_w,
                           p3_rate_h, p3_rate_w, p3_count_h, p3_count_w,
                           IDENTITY3, CHANNELS_INNER, BLOCK, ACC_DTYPE, INDEX_DTYPE)


# Whether this import got Triton's interpreter (TRITON_INTERPRET=1, CPU tensors).
INTERPRETED = isinstance(_upsample_concat_forward_kernel, InterpretedFunction)

_ACCUMULATION_TYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float64: tl.float64,
}


def _float32_scale(in_size: int, out_size: int) -> float:
    """torch's align_corners scale rounded as float32 arithmetic rounds it (exact in a Python float)."""
    if out_size <= 1:
        return 0.0
    numerator = torch.tensor(float(in_size - 1), dtype=torch.float32)
    return (numerator / torch.tensor(float(out_size - 1), dtype=torch.float32)).item()


def _candidate_search(in_size: int, out_size: int) -> tuple[float, int]:
    """(outputs per input step r, number of candidate outputs) for the backward gather.

    The outputs reading input i lie in [(i - 1) * r, (i + 1) * r); starting one
    below floor((i - 1) * r) and taking ceil(2 r) + 4 candidates covers that
    interval with a margin of one on either side for rounding (and one more for
    the rounding of the start itself). A single input
    is read by every output; a single output reads only input 0 and 1.
    """
    if in_size == 1:
        return 0.0, out_size
    if out_size == 1:
        return 0.0, 1
    rate = (out_size - 1) / (in_size - 1)
    return rate, min(out_size, math.ceil(2 * rate) + 4)


def _index_dtype(tensors, largest_index_range: int):
    """tl.int32 when every element index and memory offset fits in 31 bits, else tl.int64 (see kernels/indexing.py)."""
    largest_offset = max(
        sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride())) for tensor in tensors
    )
    # Room for the last block's overshoot.
    return index_type(max(largest_offset, largest_index_range) + _FORWARD_BLOCK + _BACKWARD_BLOCK)


def gradient_memory_format(grad_output: torch.Tensor) -> torch.memory_format:
    """Memory format of the part gradients upsample_concat_backward_triton returns.

    channels_last when grad_output's channels are innermost in memory (so the
    gather reads and the stores both run along channels), else contiguous NCHW.
    """
    return torch.channels_last if _channels_inner(grad_output) else torch.contiguous_format


def _channels_inner(tensor: torch.Tensor) -> bool:
    """Whether tensor's channels are innermost in memory (channels_last, or a channel slice of it)."""
    return tensor.shape[1] > 1 and tensor.stride(1) == 1


def _check_offsets(tensor: torch.Tensor, channel_offsets, part_channels) -> None:
    if len(channel_offsets) != len(part_channels):
        raise ValueError(f"{len(part_channels)} parts but {len(channel_offsets)} channel offsets")
    for index, (offset, channels) in enumerate(zip(channel_offsets, part_channels)):
        if offset < 0 or offset + channels > tensor.shape[1]:
            raise ValueError(
                f"part {index}: channels [{offset}, {offset + channels}) outside the {tensor.shape[1]} channels"
            )


def _chunks(count: int):
    for start in range(0, count, MAX_PARTS_PER_LAUNCH):
        yield range(start, min(start + MAX_PARTS_PER_LAUNCH, count))


def _unused_forward_part(tensor: torch.Tensor, blocks_end: int) -> list:
    """The arguments of an unused part slot: any pointer, sizes 1, zero strides and scales."""
    return [tensor, 1, 1, 1, 0, 0, 0, 0, 0, 0.0, 0.0, blocks_end]


def _unused_backward_part(tensor: torch.Tensor, blocks_end: int) -> list:
    return [tensor, 1, 1, 1, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 1, 1, blocks_end]


def _part_parameters(kernel, slot: int) -> list[str]:
    """Names of the kernel's parameters of part slot (p<slot>_ptr ... p<slot>_end), in order."""
    return [name for name in kernel.arg_names if name.startswith(f"p{slot}_")]


def specializations() -> list[Specialization]:
    """Every variant the forward and backward launchers compile on CUDA (see kernels/specializations.py).

    Unused part slots get _unused_*_part's arguments, whose ones Triton turns into constants.
    Used parts and out may have a unit stride along their innermost dimension (width, or
    channels when CHANNELS_INNER) or not (views).
    """
    result = []
    for kernel, block, warps, max_registers, unused_part in (
            (_upsample_concat_forward_kernel, _FORWARD_BLOCK, _FORWARD_WARPS, None, _unused_forward_part),
            (_upsample_concat_backward_kernel, _BACKWARD_BLOCK, _BACKWARD_WARPS, _BACKWARD_MAX_REGISTERS,
             _unused_backward_part)):
        tensor_parameter = kernel.arg_names[0]
        for dtype, num_parts, channels_inner, index_dtype, wide, unit_strides in itertools.product(
                FLOATING_DTYPES, range(1, MAX_PARTS_PER_LAUNCH + 1), (False, True), (tl.int32, tl.int64),
                (False, True), (False, True)):
            if wide and index_dtype == tl.int32:
                continue  # an integer argument of 2**31 or more means offsets that large: int64
            ones = []
            for slot in range(num_parts, MAX_PARTS_PER_LAUNCH):
                ones += [name for name, value in zip(_part_parameters(kernel, slot), unused_part(None, 2))
                         if type(value) is int and value == 1]
            if unit_strides:
                inner = "c" if channels_inner else "w"
                ones += [f"{tensor_parameter.removesuffix('_ptr')}_stride_{inner}"]
                ones += [f"p{slot}_s{inner}" for slot in range(num_parts)]
            for identities in itertools.product((False, True), repeat=num_parts):
                result.append(Specialization(
                    kernel,
                    dict(NUM_PARTS=num_parts,
                         **{f"IDENTITY{slot}": slot >= num_parts or identities[slot]
                            for slot in range(MAX_PARTS_PER_LAUNCH)},
                         CHANNELS_INNER=channels_inner, BLOCK=block, ACC_DTYPE=_ACCUMULATION_TYPES[dtype],
                         INDEX_DTYPE=index_dtype),
                    {name: dtype for name in kernel.arg_names if name.endswith("_ptr")},
                    floats=tuple(name for name in kernel.arg_names if "_scale_" in name or "_rate_" in name),
                    wide=wide,
                    ones=tuple(ones),
                    ones_case="unit inner strides" if unit_strides else "unused slots only",
                    num_warps=warps,
                    max_registers=max_registers,
                ))
    return result


def upsample_concat_forward_triton(out: torch.Tensor, parts, channel_offsets) -> None:
    """Writes every part, resized to out's (H, W), into out[:, offset : offset + C_i].

    out: [N, C, H, W] (any strides, e.g. a channel slice of a bigger buffer);
    parts: [N, C_i, H_i, W_i] tensors of out's dtype and device (any strides);
    channel_offsets: one int per part. Parts whose size is (H, W) are copied;
    the others are resized bilinearly with align_corners=True. Channels of out
    outside the given slices are left untouched. One launch per
    MAX_PARTS_PER_LAUNCH parts; nothing is launched when N == 0. The caller
    validates shapes, dtypes and devices; only the slice bounds are checked here.
    """
    parts = list(parts)
    channel_offsets = [int(offset) for offset in channel_offsets]
    _check_offsets(out, channel_offsets, [part.shape[1] for part in parts])
    num_batches, _, out_height, out_width = out.shape
    if num_batches == 0 or not parts:
        return
    accumulation = _ACCUMULATION_TYPES[out.dtype]
    index_dtype = _index_dtype([out, *parts], num_batches * out.shape[1] * out_height * out_width)
    for chunk in _chunks(len(parts)):
        part_arguments = []
        identity_flags = []
        blocks_end = 0
        for index in chunk:
            part = parts[index]
            _, channels, height, width = part.shape
            blocks_end += triton.cdiv(num_batches * channels * out_height * out_width, _FORWARD_BLOCK)
            part_arguments += [part, channels, height, width, *part.stride(), channel_offsets[index],
                               _float32_scale(height, out_height), _float32_scale(width, out_width), blocks_end]
            identity_flags.append((height, width) == (out_height, out_width))
        num_parts = len(chunk)
        # Unused slots: never reached (their program-id range is empty).
        for _ in range(num_parts, MAX_PARTS_PER_LAUNCH):
            part_arguments += _unused_forward_part(out, blocks_end)
            identity_flags.append(True)
        if blocks_end == 0:
            continue
        _upsample_concat_forward_kernel[(blocks_end,)](
            out,
            num_batches,
            out_height,
            out_width,
            *out.stride(),
            *part_arguments,
            NUM_PARTS=num_parts,
            IDENTITY0=identity_flags[0],
            IDENTITY1=identity_flags[1],
            IDENTITY2=identity_flags[2],
            IDENTITY3=identity_flags[3],
            CHANNELS_INNER=_channels_inner(out),
            BLOCK=_FORWARD_BLOCK,
            ACC_DTYPE=accumulation,
            INDEX_DTYPE=index_dtype,
            num_warps=_FORWARD_WARPS,
        )


def upsample_concat_backward_triton(grad_output: torch.Tensor, channel_offsets, part_shapes) -> list[torch.Tensor]:
    """Gradient of every part of upsample_concat from grad_output [N, C, H, W] (any strides).

    part_shapes: one (channels, height, width) per part, channel_offsets: one
    int per part. Returns new tensors [N, C_i, H_i, W_i] of grad_output's dtype
    in gradient_memory_format(grad_output): the channel slice for parts of size
    (H, W), the transpose of the bilinear resize (align_corners=True) for the
    others, each element gathered (summing the output-gradient elements that
    read it, in a fixed order) with float32 accumulation (float64 for float64):
    deterministic, no atomics. One launch per MAX_PARTS_PER_LAUNCH parts;
    nothing is launched when N == 0.
    """
    part_shapes = [tuple(int(size) for size in shape) for shape in part_shapes]
    channel_offsets = [int(offset) for offset in channel_offsets]
    for index, shape in enumerate(part_shapes):
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"part {index}: shape must be (channels, height, width) of sizes >= 1, got {shape}")
    _check_offsets(grad_output, channel_offsets, [shape[0] for shape in part_shapes])
    num_batches, _, out_height, out_width = grad_output.shape
    memory_format = gradient_memory_format(grad_output)
    grads = [
        torch.empty((num_batches, *shape), dtype=grad_output.dtype, device=grad_output.device,
                    memory_format=memory_format)
        for shape in part_shapes
    ]
    if num_batches == 0 or not grads:
        return grads
    accumulation = _ACCUMULATION_TYPES[grad_output.dtype]
    index_dtype = _index_dtype([grad_output, *grads], max(grad.numel() for grad in grads))
    for chunk in _chunks(len(grads)):
        part_arguments = []
        identity_flags = []
        blocks_end = 0
        for index in chunk:
            grad = grads[index]
            channels, height, width = part_shapes[index]
            blocks_end += triton.cdiv(num_batches * channels * height * width, _BACKWARD_BLOCK)
            rate_h, count_h = _candidate_search(height, out_height)
            rate_w, count_w = _candidate_search(width, out_width)
            part_arguments += [grad, channels, height, width, *grad.stride(), channel_offsets[index],
                               _float32_scale(height, out_height), _float32_scale(width, out_width),
                               rate_h, rate_w, count_h, count_w, blocks_end]
            identity_flags.append((height, width) == (out_height, out_width))
        num_parts = len(chunk)
        for _ in range(num_parts, MAX_PARTS_PER_LAUNCH):
            part_arguments += _unused_backward_part(grads[chunk[0]], blocks_end)
            identity_flags.append(True)
        _upsample_concat_backward_kernel[(blocks_end,)](
            grad_output,
            num_batches,
            out_height,
            out_width,
            *grad_output.stride(),
            *part_arguments,
            NUM_PARTS=num_parts,
            IDENTITY0=identity_flags[0],
            IDENTITY1=identity_flags[1],
            IDENTITY2=identity_flags[2],
            IDENTITY3=identity_flags[3],
            CHANNELS_INNER=memory_format == torch.channels_last,
            BLOCK=_BACKWARD_BLOCK,
            ACC_DTYPE=accumulation,
            INDEX_DTYPE=index_dtype,
            num_warps=_BACKWARD_WARPS,
            maxnreg=_BACKWARD_MAX_REGISTERS,
        )
    return grads
