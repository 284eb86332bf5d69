"""Every public op under fire: property-based tests (hypothesis) on every backend that runs on the
CPU here, against the op's pure-PyTorch reference, and every class of bad input.

Drawn for each example: shapes including N = 0 and 1, C = 1 and odd H/W; every supported dtype;
layouts (contiguous, transposed, channels_last, strided slices and expanded inputs, whose elements
share memory); values of ordinary and extreme magnitude, ties, NaN and +-inf at random places;
thresholds that send every, no, or some samples out, including a threshold equal to a sample's
confidence. The backend's result on the odd layout is compared with the reference on a contiguous
copy of the same values, so layout handling and arithmetic are checked together; NaN and inf must
land where eager PyTorch puts them.

Bounded for CI: ``RANET_FAST_FUZZ_EXAMPLES`` examples per test (default 25); for a long run, e.g.
``RANET_FAST_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_ops.py``. The Triton kernels are fuzzed by
one short subprocess under ``TRITON_INTERPRET=1`` (Triton fixes interpreter mode when a kernel is
defined, so it cannot be switched on inside this process).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ranet_fast import _extension
from ranet_fast.ops import (batch_norm_relu, batch_norm_relu_backward, batch_norm_relu_backward_reference,
                            batch_norm_relu_reference, batch_norm_stats, batch_norm_stats_reference, exit_confidence,
                            exit_confidence_reference, exit_partition, exit_partition_reference, fused_conv2d,
                            fused_conv2d_reference, gather_rows, scatter_exits, scatter_exits_reference,
                            upsample_concat, upsample_concat_reference)
from ranet_fast.ops.exit_partition import stable_partition
from triton_interpreter import each_check_under_interpreter

EXAMPLES = int(os.environ.get("RANET_FAST_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ["reference"] + (["cpu"] if _extension.extension_loaded() else [])
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INF = math.inf

# The kernels accumulate in float32 (float64 for float64 inputs) like the reference, in another
# order: a few ulps of the accumulation type. The entropy confidence 1 - H / log C carries H's
# absolute error (a few ulps per class) and is ~0 for near-uniform rows, where only an absolute
# tolerance can hold (as in tests/test_exit_partition.py).
def _confidence_tolerance(dtype, criterion: str = "max_softmax") -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12 if criterion == "entropy" else 1e-15)
    return dict(rtol=1e-5, atol=2e-6 if criterion == "entropy" else 1e-7)


# ---------------------------------------------------------------------------
# Strategies: small parameters drawn by hypothesis, tensors made from a seeded generator.
# ---------------------------------------------------------------------------

VALUE_KINDS = ("normal", "large", "huge", "ties", "specials")


def _values(shape, dtype, kind: str, seed: int) -> torch.Tensor:
    """float64 values of ``kind``, exactly representable in ``dtype``, then cast."""
    generator = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    if kind == "ties":
        values = torch.randint(-2, 3, shape, generator=generator).double()
    else:
        scale = {"normal": 3.0, "large": 1e3, "huge": finfo.max / 8, "specials": 3.0}[kind]
        values = torch.randn(shape, generator=generator, dtype=torch.float64).clamp(-4, 4) * scale
    if kind == "specials":
        choice = torch.rand(shape, generator=generator, dtype=torch.float64)
        values[choice < 0.08] = math.nan
        values[(choice >= 0.08) & (choice < 0.14)] = INF
        values[(choice >= 0.14) & (choice < 0.22)] = -INF
    return values.to(dtype)


LAYOUTS_2D = ("contiguous", "transposed", "strided", "expand_rows", "expand_columns")


def _matrix(num_rows: int, num_cols: int, dtype, kind: str, layout: str, seed: int) -> torch.Tensor:
    """A [num_rows, num_cols] tensor with ``layout``; the expanded ones repeat a row or column."""
    if layout == "transposed":
        return _values((num_cols, num_rows), dtype, kind, seed).t()
    if layout == "strided":
        return _values((num_rows + 1, 2 * num_cols + 1), dtype, kind, seed)[1:, 1::2]
    if layout == "expand_rows":
        return _values((1, num_cols), dtype, kind, seed).expand(num_rows, num_cols)
    if layout == "expand_columns":
        return _values((num_rows, 1), dtype, kind, seed).expand(num_rows, num_cols)
    return _values((num_rows, num_cols), dtype, kind, seed)


logit_cases = st.fixed_dictionaries({
    "num_rows": st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)),
    "num_classes": st.one_of(st.sampled_from([1, 2]), st.integers(1, 70)),
    "dtype": st.sampled_from(DTYPES),
    "kind": st.sampled_from(VALUE_KINDS),
    "layout": st.sampled_from(LAYOUTS_2D),
    "seed": st.integers(0, 2**31 - 1),
})


def _logits(case) -> torch.Tensor:
    return _matrix(case["num_rows"], case["num_classes"], case["dtype"], case["kind"], case["layout"], case["seed"])


def _assert_close(actual, expected, **tolerance):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance)


# ---------------------------------------------------------------------------
# exit_confidence and exit_partition
# ---------------------------------------------------------------------------


def check_exit_confidence(backend, case):
    logits = _logits(case)
    confidence, prediction = exit_confidence(logits, backend=backend)
    expected_confidence, expected_prediction = exit_confidence_reference(logits.contiguous())
    _assert_close(confidence, expected_confidence, **_confidence_tolerance(logits.dtype))
    assert torch.equal(prediction, expected_prediction)


@st.composite
def thresholds(draw, confidence: torch.Tensor):
    """-inf (all but NaN leave), +inf (none leaves), 0, 1, anything in [0, 1], or exactly one of
    the confidences (that sample leaves: the comparison is >=)."""
    options = [st.sampled_from([-INF, INF, 0.0, 1.0]), st.floats(0.0, 1.0)]
    finite = confidence[~confidence.isnan()]
    if finite.numel():
        options.append(st.sampled_from(finite.tolist()))
    return draw(st.one_of(*options))


def check_exit_partition(backend, case, criterion, data):
    logits = _logits(case)
    reference = exit_partition_reference(logits.contiguous(), 0.5, criterion)[0]
    threshold = data.draw(thresholds(reference), label="threshold")
    confidence, prediction, order, num_continue = exit_partition(logits, threshold, criterion, backend=backend)
    expected_confidence, expected_prediction, _, _ = exit_partition_reference(logits.contiguous(), threshold, criterion)
    _assert_close(confidence, expected_confidence, **_confidence_tolerance(logits.dtype, criterion))
    assert torch.equal(prediction, expected_prediction)
    # The partition follows the backend's own confidence exactly (a confidence within rounding of
    # the threshold may fall on either side of it on different backends).
    expected_order, expected_continue = stable_partition(confidence >= threshold)
    assert order.dtype == torch.int64 and num_continue.dtype == torch.int64 and num_continue.dim() == 0
    assert torch.equal(order, expected_order) and torch.equal(num_continue, expected_continue)
    nan_rows = int(confidence.isnan().sum())
    if threshold == INF:
        assert int(num_continue) == logits.shape[0]
    if threshold == -INF:
        assert int(num_continue) == nan_rows


# ---------------------------------------------------------------------------
# scatter_exits
# ---------------------------------------------------------------------------


def _buffer(rows: int, cols: int, dtype, layout: str, seed: int) -> torch.Tensor:
    """A writable [rows, cols] buffer full of poison values (no expanded layouts: it is written)."""
    return _matrix(rows, cols, dtype, "normal", layout, seed).mul_(1000)


def _index_vector(values: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "strided":
        spread = torch.full((2 * values.numel() + 1,), -7, dtype=torch.int64)
        spread[1::2] = values
        return spread[1::2]
    return values


def check_scatter_exits(backend, case, extra_rows, result_layout, index_layout, exit_index, data):
    logits = _logits(case)
    num_rows, num_classes = logits.shape
    num_results = num_rows + extra_rows
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    if data.draw(st.booleans(), label="order from exit_partition"):
        threshold = data.draw(st.sampled_from([-INF, INF, 0.3, 0.9]), label="threshold")
        _, _, order, num_continue = exit_partition_reference(logits, threshold)
    else:
        order = torch.randperm(num_rows, generator=generator)
        num_continue = torch.tensor(data.draw(st.integers(0, num_rows), label="num_continue"))
    positions = torch.randperm(num_results, generator=generator)[:num_rows]
    order, positions = _index_vector(order, index_layout), _index_vector(positions, index_layout)

    result_logits = _buffer(num_results, num_classes, logits.dtype, result_layout, case["seed"] + 2)
    result_exit = _index_vector(torch.randint(-5, 0, (num_results,), generator=generator), index_layout)
    expected_logits, expected_exit = result_logits.clone(), result_exit.clone()
    scatter_exits_reference(expected_logits, expected_exit, logits.contiguous(), order.contiguous(),
                            num_continue, positions.contiguous(), exit_index)
    scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, exit_index, backend=backend)
    # A copy: exact, NaN where NaN.
    _assert_close(result_logits, expected_logits, rtol=0, atol=0)
    assert torch.equal(result_exit, expected_exit)


# ---------------------------------------------------------------------------
# upsample_concat
# ---------------------------------------------------------------------------

PART_LAYOUTS = ("contiguous", "channels_last", "strided", "expand_batch", "expand_width")


def _part(batch: int, channels: int, height: int, width: int, dtype, kind: str, layout: str, seed: int):
    if layout == "channels_last":
        return _values((batch, channels, height, width), dtype, kind, seed).contiguous(
            memory_format=torch.channels_last)
    if layout == "strided":  # every other channel and column of a bigger tensor
        return _values((batch, 2 * channels, height, 2 * width), dtype, kind, seed)[:, ::2, :, 1::2]
    if layout == "expand_batch":
        return _values((1, channels, height, width), dtype, kind, seed).expand(batch, -1, -1, -1)
    if layout == "expand_width":
        return _values((batch, channels, height, 1), dtype, kind, seed).expand(-1, -1, -1, width)
    return _values((batch, channels, height, width), dtype, kind, seed)


# Bilinear weights are computed in float32 for every input dtype but float64 (as torch does), so
# a weight is off by up to ulp(size); the error scales with the values' magnitude. Half results
# are rounded to the half type once.
RESIZE_TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 3e-6), torch.float16: (1e-2, 1e-3),
                    torch.bfloat16: (1e-2, 1e-2)}


def _assert_resized_close(actual: torch.Tensor, expected: torch.Tensor, magnitude: float):
    rtol, atol = RESIZE_TOLERANCE[expected.dtype]
    _assert_close(actual, expected, rtol=rtol, atol=atol * max(1.0, magnitude))


upsample_cases = st.fixed_dictionaries({
    "batch": st.one_of(st.sampled_from([0, 1]), st.integers(0, 3)),
    "parts": st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
                                st.sampled_from(PART_LAYOUTS)), min_size=1, max_size=3),
    "size": st.tuples(st.integers(1, 11), st.integers(1, 11)),
    "dtype": st.sampled_from(DTYPES),
    "kind": st.sampled_from(VALUE_KINDS),
    "seed": st.integers(0, 2**31 - 1),
    "use_out": st.booleans(),
    "shuffle_offsets": st.booleans(),
})


def check_upsample_concat(backend, case):
    dtype = case["dtype"]
    parts = [_part(case["batch"], c, h, w, dtype, case["kind"], layout, case["seed"] + index)
             for index, (c, h, w, layout) in enumerate(case["parts"])]
    channels = [part.shape[1] for part in parts]
    offsets = None
    if case["shuffle_offsets"]:  # the parts' slices in reverse order
        offsets = [sum(channels[index + 1:]) for index in range(len(parts))]
    contiguous = [part.contiguous() for part in parts]
    magnitude = max([part.abs().nan_to_num(posinf=0).max().item() for part in contiguous if part.numel()] + [1.0])
    if case["use_out"]:
        # Two spare channels on each side, and a strided (every other row) spatial layout.
        height, width = case["size"]
        base = _values((case["batch"], sum(channels) + 4, 2 * height, width), dtype, "normal", case["seed"] + 99)
        out, expected = base[:, 2:-2, ::2], base.clone()[:, 2:-2, ::2]
        untouched = base.clone()
        result = upsample_concat(parts, case["size"], channel_offsets=offsets, out=out, backend=backend)
        upsample_concat_reference(contiguous, case["size"], channel_offsets=offsets, out=expected)
        assert result is out
        # Only the parts' slices were written: the spare channels and rows are as they were.
        assert torch.equal(base[:, :2], untouched[:, :2]) and torch.equal(base[:, -2:], untouched[:, -2:])
        assert torch.equal(base[:, :, 1::2], untouched[:, :, 1::2])
    else:
        result = upsample_concat(parts, case["size"], channel_offsets=offsets, backend=backend)
        expected = upsample_concat_reference(contiguous, case["size"], channel_offsets=offsets)
    _assert_resized_close(result, expected, magnitude)


def check_upsample_concat_gradients(backend, case):
    """float32/float64 gradients against autograd through the reference. The op is linear, so the
    gradients depend on the output gradient and the layouts, not on the input values."""
    dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    parts = [_part(case["batch"], c, h, w, dtype, "normal", layout, case["seed"] + index).requires_grad_()
             for index, (c, h, w, layout) in enumerate(case["parts"])]
    result = upsample_concat(parts, case["size"], backend=backend)
    grad_output = _values(result.shape, dtype, "normal", case["seed"] + 7)
    gradients = torch.autograd.grad(result, parts, grad_output, allow_unused=True)
    leaves = [part.detach().contiguous().requires_grad_() for part in parts]
    expected = torch.autograd.grad(upsample_concat_reference(leaves, case["size"]), leaves, grad_output)
    # An input element gathers at most about (2 * ceil(out / in) + 1) output gradients per axis,
    # each at most 12 in magnitude (normal values are clamped to 4 * 3).
    height, width = case["size"]
    fan_in = max((2 * -(-height // h) + 1) * (2 * -(-width // w) + 1) for _, h, w, _ in case["parts"])
    magnitude = 12.0 * fan_in
    for gradient, expected_gradient in zip(gradients, expected, strict=True):
        _assert_resized_close(gradient, expected_gradient, magnitude)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_along_a_copied_axis(backend):
    """Along an axis whose size does not change, eager reads one element (both taps on it), so a
    neighbour's inf does not become a NaN through a zero weight."""
    part = torch.tensor([[[[4.0, -1.0], [-INF, 2.0]]]])  # width 2 -> 1 resizes, height 2 -> 2 copies
    expected = upsample_concat_reference([part], (2, 1))
    assert expected[0, 0, 0, 0] == 4.0 and expected[0, 0, 1, 0].isnan()
    _assert_close(upsample_concat([part], (2, 1), backend=backend), expected)
    wide = torch.tensor([[[[1.0, INF, 3.0], [1.0, 2.0, 3.0]]]])  # width 3 -> 3 copies, height 2 -> 3 resizes
    expected = upsample_concat_reference([wide], (3, 3))
    assert expected[0, 0, 0, 0] == 1.0 and expected[0, 0, 0, 2] == 3.0
    _assert_close(upsample_concat([wide], (3, 3), backend=backend), expected)


# ---------------------------------------------------------------------------
# batch_norm_stats, batch_norm_relu, batch_norm_relu_backward
# ---------------------------------------------------------------------------

LAYOUTS_4D = ("contiguous", "channels_last", "strided", "channel_slice", "expand_batch")

batch_norm_cases = st.fixed_dictionaries({
    "batch": st.one_of(st.sampled_from([0, 1]), st.integers(0, 3)),
    "channels": st.one_of(st.sampled_from([1, 2]), st.integers(1, 9)),
    "height": st.integers(1, 7),
    "width": st.integers(1, 7),
    "dtype": st.sampled_from(DTYPES),
    # Finite values only: with inf the statistics are NaN by different routes on every backend.
    "kind": st.sampled_from(("normal", "large", "ties")),
    "layout": st.sampled_from(LAYOUTS_4D),
    "grad_layout": st.sampled_from(LAYOUTS_4D[:4]),
    "relu": st.booleans(),
    "use_out": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})

# Outputs in the input dtype; statistics and parameter gradients in the accumulation dtype, where
# an error is bounded by a multiple of eps times the sum of the magnitudes of the terms.
BN_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _tensor_4d(shape, dtype, kind, layout, seed):
    batch, channels, height, width = shape
    if layout == "channels_last":
        return _values(shape, dtype, kind, seed).contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other channel and column of a bigger tensor
        return _values((batch, 2 * channels, height, 2 * width), dtype, kind, seed)[:, ::2, :, 1::2]
    if layout == "channel_slice":  # channels [1, 1 + C) of a channels_last buffer
        return _values((batch, channels + 3, height, width), dtype, kind, seed).contiguous(
            memory_format=torch.channels_last)[:, 1:1 + channels]
    if layout == "expand_batch":
        return _values((1, channels, height, width), dtype, kind, seed).expand(batch, -1, -1, -1)
    return _values(shape, dtype, kind, seed)


def _assert_sums_close(actual, expected, terms, accumulation):
    bound = (1e-12 if accumulation == torch.float64 else 1e-5) * terms.abs().sum((0, 2, 3))
    assert actual.dtype == expected.dtype == accumulation
    assert bool(((actual.double() - expected.double()).abs() <= bound).all()), (actual, expected)


def check_batch_norm(backend, case):
    dtype, channels = case["dtype"], case["channels"]
    shape = (case["batch"], channels, case["height"], case["width"])
    x = _tensor_4d(shape, dtype, case["kind"], case["layout"], case["seed"])
    dense = x.contiguous()
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    count = shape[0] * shape[2] * shape[3]
    if count >= 2:
        mean, var = batch_norm_stats(x, backend=backend)
        expected_mean, expected_var = batch_norm_stats_reference(dense)
        # Deviations are measured against the spread of the values, in the accumulation type.
        spread = float(dense.double().abs().max())
        tolerance = BN_TOLERANCE[accumulation]
        _assert_close(mean, expected_mean, rtol=tolerance, atol=tolerance * spread)
        _assert_close(var, expected_var, rtol=tolerance, atol=tolerance * spread**2)
        invstd = torch.rsqrt(expected_var + 1e-5)
        mean = expected_mean
    else:
        mean, invstd = torch.zeros(channels, dtype=accumulation), torch.ones(channels, dtype=accumulation)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    tolerance = BN_TOLERANCE[dtype]
    expected = batch_norm_relu_reference(dense, mean, invstd, weight, bias, relu=case["relu"])
    if case["use_out"]:
        base = torch.full((shape[0], channels + 4, *shape[2:]), 7.0, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        result = batch_norm_relu(x, mean, invstd, weight, bias, relu=case["relu"], out=base, out_offset=2,
                                 backend=backend)
        assert result is base and bool((base[:, :2] == 7).all()) and bool((base[:, 2 + channels:] == 7).all())
        result = base[:, 2:2 + channels]
    else:
        result = batch_norm_relu(x, mean, invstd, weight, bias, relu=case["relu"], backend=backend)
    _assert_close(result, expected, rtol=tolerance, atol=tolerance)

    grad_out = _tensor_4d(shape, dtype, "normal", case["grad_layout"], case["seed"] + 2)
    grad_x, grad_weight, grad_bias = batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias,
                                                              relu=case["relu"], backend=backend)
    expected_x, expected_weight, expected_bias = batch_norm_relu_backward_reference(
        grad_out.contiguous(), dense, mean, invstd, weight, bias, relu=case["relu"])
    # grad_x = scale * (dz - mean(dz) - xhat * mean(dz * xhat)) cancels: its rounding follows the
    # magnitude of the largest gradient, not of each element.
    magnitude = max(1.0, float(expected_x.double().abs().max())) if expected_x.numel() else 1.0
    _assert_close(grad_x, expected_x, rtol=tolerance, atol=tolerance * magnitude)
    xhat = (dense.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
    z = xhat * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    dz = torch.where(z > 0, grad_out.double(), 0.0) if case["relu"] else grad_out.double()
    _assert_sums_close(grad_weight, expected_weight, dz * xhat, accumulation)
    _assert_sums_close(grad_bias, expected_bias, dz, accumulation)


# ---------------------------------------------------------------------------
# fused_conv2d
# ---------------------------------------------------------------------------

fused_conv2d_cases = st.fixed_dictionaries({
    "batch": st.one_of(st.sampled_from([0, 1]), st.integers(0, 3)),
    "in_channels": st.integers(1, 6),
    "out_channels": st.integers(1, 6),
    "kernel_size": st.sampled_from([1, 3]),
    "stride": st.sampled_from([1, 2]),
    "same_padding": st.booleans(),
    "height": st.integers(1, 9),
    "width": st.integers(1, 9),
    "dtype": st.sampled_from(DTYPES),
    "layout": st.sampled_from(LAYOUTS_4D),
    "prologue": st.booleans(),
    "epilogue_scale": st.booleans(),
    "epilogue_shift": st.booleans(),
    "relu": st.booleans(),
    "use_out": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})

# Each output is a sum of Ci * k * k <= 54 products; the bound is a multiple of the unit roundoff
# times the sum of the products' magnitudes (and of the shift) plus the result's magnitude: float32
# accumulation costs <= 54 * 2**-24 ~ 3e-6 of the sum; a half type rounds the prologue's output (what
# the conv reads, 2**-8 for bfloat16) and the result once each. float64 keeps only accumulation order.
CONV_ROUNDOFF = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def check_fused_conv2d(backend, case):
    dtype, kernel_size = case["dtype"], case["kernel_size"]
    padding = (kernel_size - 1) // 2 if case["same_padding"] else 0
    # The padded input must hold one kernel window.
    height, width = (max(size, kernel_size - 2 * padding) for size in (case["height"], case["width"]))
    in_channels, out_channels, seed = case["in_channels"], case["out_channels"], case["seed"]
    x = _tensor_4d((case["batch"], in_channels, height, width), dtype, "normal", case["layout"], seed)
    weight = _values((out_channels, in_channels, kernel_size, kernel_size), dtype, "normal", seed + 1) / 4
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(seed + 2)

    def vector(size, present, low, high):
        return torch.empty(size, dtype=accumulation).uniform_(low, high, generator=generator) if present else None

    vectors = dict(prologue_scale=vector(in_channels, case["prologue"], -2, 2),
                   prologue_shift=vector(in_channels, case["prologue"], -1, 1),
                   epilogue_scale=vector(out_channels, case["epilogue_scale"], -2, 2),
                   epilogue_shift=vector(out_channels, case["epilogue_shift"], -1, 1))
    options = dict(stride=case["stride"], padding=padding, activation="relu" if case["relu"] else "none")
    vectors64 = {name: None if v is None else v.double() for name, v in vectors.items()}
    expected = fused_conv2d_reference(x.double(), weight.double(), **vectors64, **options)
    # The magnitudes of the terms: the same conv on absolute values, without ReLU.
    magnitudes = fused_conv2d_reference(
        x.double().abs(), weight.double().abs(), stride=case["stride"], padding=padding,
        prologue_scale=None if vectors64["prologue_scale"] is None else vectors64["prologue_scale"].abs(),
        prologue_shift=None if vectors64["prologue_shift"] is None else vectors64["prologue_shift"].abs(),
        epilogue_scale=None if vectors64["epilogue_scale"] is None else vectors64["epilogue_scale"].abs(),
        epilogue_shift=None if vectors64["epilogue_shift"] is None else vectors64["epilogue_shift"].abs())
    if case["use_out"]:
        base = torch.full((case["batch"], out_channels + 4, *expected.shape[2:]), 7.0, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        result = fused_conv2d(x, weight, **vectors, **options, out=base, out_offset=2, backend=backend)
        assert result is base and bool((base[:, :2] == 7).all()) and bool((base[:, 2 + out_channels:] == 7).all())
        result = base[:, 2:2 + out_channels]
    else:
        result = fused_conv2d(x, weight, **vectors, **options, backend=backend)
    assert result.dtype == dtype and result.shape == expected.shape
    bound = CONV_ROUNDOFF[dtype] * (magnitudes + expected.abs())
    error = (result.double() - expected).abs()
    assert bool((error <= bound).all()), f"largest error over bound {(error - bound).max().item()}"


# ---------------------------------------------------------------------------
# gather_rows
# ---------------------------------------------------------------------------

GATHER_DTYPES = DTYPES + (torch.int64, torch.int32, torch.uint8, torch.bool)
GATHER_LAYOUTS = ("contiguous", "strided_rows", "inner_transposed", "channels_last", "expand_rows")

gather_rows_cases = st.fixed_dictionaries({
    "rows": st.one_of(st.sampled_from([0, 1]), st.integers(0, 6)),
    "tensors": st.lists(st.tuples(st.lists(st.integers(1, 4), max_size=3), st.sampled_from(GATHER_DTYPES),
                                  st.sampled_from(GATHER_LAYOUTS)), min_size=1, max_size=3),
    "index_length": st.integers(0, 8),
    "seed": st.integers(0, 2**31 - 1),
})


def _gathered_tensor(rows: int, inner_shape, dtype, layout: str, seed: int) -> torch.Tensor:
    """A [rows, *inner_shape] tensor of ``dtype``, in ``layout`` where the layout fits its rank."""
    shape = (rows, *inner_shape)
    if dtype.is_floating_point:
        values = _values(shape, dtype, "specials", seed)
    else:
        values = torch.randint(0, 2 if dtype == torch.bool else 200, shape,
                               generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout == "strided_rows":  # every other row of a tensor twice as long
        return values.repeat_interleave(2, dim=0)[::2]
    if layout == "inner_transposed" and values.dim() >= 2:  # rows innermost for 2-D, else the last two dims swapped
        return values.mT.contiguous().mT
    if layout == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "expand_rows" and rows:  # every row the same memory
        return values[:1].expand(shape)
    return values


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():  # compared as integers of the same width: NaN payloads and -0.0 count
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[actual.dtype.itemsize]
        actual, expected = actual.contiguous().view(bits), expected.contiguous().view(bits)
    assert torch.equal(actual, expected)


def check_gather_rows(backend, case):
    rows, seed = case["rows"], case["seed"]
    tensors = [_gathered_tensor(rows, inner, dtype, layout, seed + number)
               for number, (inner, dtype, layout) in enumerate(case["tensors"])]
    length = case["index_length"] if rows else 0  # an empty batch has no row to take
    index = torch.randint(0, max(rows, 1), (length,), generator=torch.Generator().manual_seed(seed))
    results = gather_rows(tensors, index, backend=backend)
    for result, tensor in zip(results, tensors, strict=True):
        _assert_same_bits(result, tensor.index_select(0, index))
        # New memory, never a view of the input.
        assert result.numel() == 0 or result.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()

# ---------------------------------------------------------------------------
# The tests: every check on every backend. The Triton subprocess below reuses CHECKS.
# ---------------------------------------------------------------------------

CHECKS = {
    "exit_confidence": (check_exit_confidence, dict(case=logit_cases)),
    "exit_partition": (check_exit_partition, dict(case=logit_cases, data=st.data(),
                                                  criterion=st.sampled_from(["max_softmax", "entropy"]))),
    "scatter_exits": (check_scatter_exits, dict(
        case=logit_cases, extra_rows=st.integers(0, 5), exit_index=st.integers(0, 7), data=st.data(),
        result_layout=st.sampled_from(["contiguous", "transposed", "strided"]),
        index_layout=st.sampled_from(["contiguous", "strided"]))),
    "upsample_concat": (check_upsample_concat, dict(case=upsample_cases)),
    "upsample_concat_gradients": (check_upsample_concat_gradients, dict(case=upsample_cases)),
    "batch_norm": (check_batch_norm, dict(case=batch_norm_cases)),
    "fused_conv2d": (check_fused_conv2d, dict(case=fused_conv2d_cases)),
    "gather_rows": (check_gather_rows, dict(case=gather_rows_cases)),
}


def property_test(check, strategies, backend, examples=EXAMPLES):
    """``check(backend, **drawn)`` as a hypothesis test of ``examples`` examples."""
    return settings(FUZZ, max_examples=examples)(given(**strategies)(lambda **drawn: check(backend, **drawn)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CHECKS))
def test_op_matches_reference_on_random_input(op, backend):
    check, strategies = CHECKS[op]
    property_test(check, strategies, backend)()


# ---------------------------------------------------------------------------
# Bad input: validated before anything is launched, with a message that names the problem.
# ---------------------------------------------------------------------------


def _scatter_arguments(**changes):
    logits = torch.randn(3, 4)
    _, _, order, num_continue = exit_partition_reference(logits, 0.5)
    arguments = dict(result_logits=torch.zeros(5, 4), result_exit=torch.zeros(5, dtype=torch.int64), logits=logits,
                     order=order, num_continue=num_continue, positions=torch.tensor([4, 0, 2]), exit_index=1)
    arguments.update(changes)
    return arguments


def _parts(*shapes, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for shape in shapes]


BAD_INPUTS = {
    # exit_confidence / exit_partition: one tensor of logits.
    "confidence-non-tensor": (lambda b: exit_confidence([[1.0, 2.0]], backend=b), TypeError,
                              r"expects a torch.Tensor of logits, got list"),
    "confidence-1d": (lambda b: exit_confidence(torch.randn(4), backend=b), ValueError,
                      r"shape \[N, C\]; got a 1-D tensor of shape \(4,\)"),
    "confidence-no-classes": (lambda b: exit_confidence(torch.randn(4, 0), backend=b), ValueError,
                              r"at least one class \(C >= 1\)"),
    "confidence-int-dtype": (lambda b: exit_confidence(torch.ones(2, 3, dtype=torch.int32), backend=b), TypeError,
                             r"float16, bfloat16, float32 and float64 logits; got torch.int32"),
    "partition-3d": (lambda b: exit_partition(torch.randn(2, 3, 4), 0.5, backend=b), ValueError,
                     r"exit_partition expects logits of shape \[N, C\]; got a 3-D tensor"),
    "partition-complex": (lambda b: exit_partition(torch.randn(2, 3, dtype=torch.complex64), 0.5, backend=b),
                          TypeError, r"got torch.complex64"),
    "partition-nan-threshold": (lambda b: exit_partition(torch.randn(2, 3), math.nan, backend=b), ValueError,
                                r"threshold is NaN"),
    "partition-tensor-threshold": (lambda b: exit_partition(torch.randn(2, 3), torch.tensor(0.5), backend=b),
                                   TypeError, r"threshold to be a Python float, got Tensor"),
    "partition-criterion": (lambda b: exit_partition(torch.randn(2, 3), 0.5, "margin", backend=b), ValueError,
                            r"unknown criterion 'margin'"),
    # scatter_exits
    "scatter-non-tensor": (lambda b: scatter_exits(**_scatter_arguments(positions=[4, 0, 2]), backend=b), TypeError,
                           r"positions to be a torch.Tensor, got list"),
    "scatter-device-mix": (lambda b: scatter_exits(**_scatter_arguments(result_logits=torch.zeros(5, 4, device="meta")),
                                                   backend=b), ValueError, r"result_logits is on meta"),
    "scatter-class-count": (lambda b: scatter_exits(**_scatter_arguments(result_logits=torch.zeros(5, 3)), backend=b),
                            ValueError, r"result_logits of shape \[M, C\] with C = 4"),
    "scatter-result-dtype": (lambda b: scatter_exits(**_scatter_arguments(result_logits=torch.zeros(5, 4).double()),
                                                     backend=b), TypeError, r"result_logits of the logits' dtype"),
    "scatter-index-dtype": (lambda b: scatter_exits(**_scatter_arguments(positions=torch.tensor([4, 0, 2]).int()),
                                                    backend=b), TypeError, r"positions to be int64, got torch.int32"),
    "scatter-order-length": (lambda b: scatter_exits(**_scatter_arguments(order=torch.arange(2)), backend=b),
                             ValueError, r"order of shape \[N\] = \[3\]; got shape \(2,\)"),
    "scatter-num-continue-shape": (lambda b: scatter_exits(**_scatter_arguments(num_continue=torch.tensor([1])),
                                                           backend=b), TypeError, r"num_continue to be a 0-dim int64"),
    "scatter-negative-exit": (lambda b: scatter_exits(**_scatter_arguments(exit_index=-1), backend=b), ValueError,
                              r"exit_index >= 0, got -1"),
    "scatter-overlapping-result": (
        lambda b: scatter_exits(**_scatter_arguments(result_logits=torch.zeros(1, 4).expand(5, 4)), backend=b),
        ValueError, r"result_logits has elements that share memory \(an expanded view\?\)"),
    "scatter-overlapping-exit": (
        lambda b: scatter_exits(**_scatter_arguments(result_exit=torch.zeros(1, dtype=torch.int64).expand(5)),
                                backend=b), ValueError, r"result_exit has elements that share memory"),
    # upsample_concat
    "upsample-non-list": (lambda b: upsample_concat(torch.randn(1, 2, 3, 3), 4, backend=b), TypeError,
                          r"a list or tuple of tensors as parts, got Tensor"),
    "upsample-non-tensor-part": (lambda b: upsample_concat([torch.randn(1, 2, 3, 3), 5], 4, backend=b), TypeError,
                                 r"part 1 is a int, not a torch.Tensor"),
    "upsample-3d-part": (lambda b: upsample_concat(_parts((2, 3, 3)), 4, backend=b), ValueError,
                         r"part 0 must be a 4-D \[N, C, H, W\] tensor"),
    "upsample-empty-channels": (lambda b: upsample_concat(_parts((1, 0, 3, 3)), 4, backend=b), ValueError,
                                r"part 0 needs C, H, W >= 1"),
    "upsample-dtype-mix": (lambda b: upsample_concat(_parts((1, 2, 3, 3)) + _parts((1, 2, 3, 3), dtype=torch.float64),
                                                     4, backend=b), TypeError, r"part 1 has dtype torch.float64"),
    "upsample-int-dtype": (lambda b: upsample_concat([torch.ones(1, 2, 3, 3, dtype=torch.uint8)], 4, backend=b),
                           TypeError, r"float16, bfloat16, float32 and float64 tensors; part 0 has dtype torch.uint8"),
    "upsample-device-mix": (lambda b: upsample_concat(_parts((1, 2, 3, 3)) + _parts((1, 2, 3, 3), device="meta"),
                                                      4, backend=b), ValueError, r"part 1 is on meta but part 0 is on cpu"),
    "upsample-batch-mix": (lambda b: upsample_concat(_parts((1, 2, 3, 3), (2, 2, 3, 3)), 4, backend=b), ValueError,
                           r"part 1 has batch size 2 but part 0 has 1"),
    "upsample-size": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), (0, 4), backend=b), ValueError,
                      r"target size >= 1, got \(0, 4\)"),
    "upsample-size-type": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), 4.0, backend=b), TypeError,
                           r"size as an int or a pair of ints"),
    "upsample-overlapping-slices": (lambda b: upsample_concat(_parts((1, 2, 3, 3), (1, 2, 3, 3)), 4,
                                                              channel_offsets=[0, 1], backend=b), ValueError,
                                    r"channel slices of parts 0 and 1 overlap: \[0, 2\) and \[1, 3\)"),
    "upsample-gap": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), 4, channel_offsets=[1], backend=b), ValueError,
                     r"must tile the output channels \[0, 3\) exactly"),
    "upsample-offset-count": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), 4, channel_offsets=[0, 2], backend=b),
                              ValueError, r"one channel offset per part: got 2 offsets for 1 parts"),
    "upsample-out-slice-bounds": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), 4, channel_offsets=[3],
                                                            out=torch.zeros(1, 4, 4, 4), backend=b), ValueError,
                                  r"part 0 needs channels \[3, 5\) but out has 4 channels"),
    "upsample-out-shape": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), 4, out=torch.zeros(1, 2, 4, 5), backend=b),
                           ValueError, r"out has shape \(1, 2, 4, 5\) but must be \[1, C, 4, 4\]"),
    "upsample-out-device": (lambda b: upsample_concat(_parts((1, 2, 3, 3)), 4, out=torch.zeros(1, 2, 4, 4,
                                                                                              device="meta"),
                                                      backend=b), ValueError, r"out is on meta but the parts are on cpu"),
    "upsample-overlapping-out": (lambda b: upsample_concat(_parts((2, 2, 3, 3)), 4,
                                                           out=torch.zeros(1, 2, 4, 4).expand(2, 2, 4, 4), backend=b),
                                 ValueError, r"out has elements that share memory"),
    # batch_norm_stats, batch_norm_relu, batch_norm_relu_backward
    "bn-stats-single-value": (lambda b: batch_norm_stats(torch.randn(1, 4, 1, 1), backend=b), ValueError,
                              r"N \* H \* W >= 2\) to train BatchNorm; x has shape \(1, 4, 1, 1\)"),
    "bn-stats-3d": (lambda b: batch_norm_stats(torch.randn(4, 5, 6), backend=b), ValueError,
                    r"batch_norm_stats expects x of shape \[N, C, H, W\]; got shape \(4, 5, 6\)"),
    "bn-relu-vector-length": (lambda b: batch_norm_relu(torch.randn(2, 3, 4, 4), *_parts((3,), (3,), (3,), (2,)),
                                                        backend=b), ValueError,
                              r"bias must be a 1-D tensor with one entry per channel \(3\); got shape \(2,\)"),
    "bn-relu-overlapping-out": (
        lambda b: batch_norm_relu(torch.randn(2, 3, 4, 4), *_parts((3,), (3,), (3,), (3,)),
                                  out=torch.zeros(1, 3, 4, 4).expand(2, 3, 4, 4), backend=b),
        ValueError, r"out has elements that share memory"),
    "bn-backward-grad-dtype": (
        lambda b: batch_norm_relu_backward(torch.randn(2, 3, 4, 4).double(), torch.randn(2, 3, 4, 4),
                                           *_parts((3,), (3,), (3,), (3,)), backend=b),
        TypeError, r"grad_out has dtype torch.float64 but x has torch.float32"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_backend_is_chosen(name, backend, monkeypatch):
    call, error, message = BAD_INPUTS[name]

    def launched(*args, **kwargs):
        raise AssertionError(f"{name}: a backend was chosen before the input was validated")

    monkeypatch.setattr(_extension, "resolve_backend", launched)
    with pytest.raises(error, match=message):
        call(backend)


def test_scatter_exits_refusal_leaves_the_buffers_alone():
    result_logits, result_exit = torch.full((5, 4), 7.0), torch.full((5,), 3, dtype=torch.int64)
    arguments = _scatter_arguments(result_logits=result_logits, result_exit=result_exit,
                                   positions=torch.tensor([4, 0, 2], dtype=torch.int32))
    with pytest.raises(TypeError):
        scatter_exits(**arguments)
    assert torch.equal(result_logits, torch.full((5, 4), 7.0)) and torch.equal(result_exit, torch.full((5,), 3))


# ---------------------------------------------------------------------------
# Triton under the interpreter: every check, fewer examples, in one subprocess (conftest.py's
# triton_interpreter_report). The examples are CPU tensors, so a check ignores the device.
# ---------------------------------------------------------------------------

TRITON_EXAMPLES = max(3, EXAMPLES // 5)


def triton_interpreter_checks():
    return {op: lambda device, check=check, strategies=strategies:
            property_test(check, strategies, "triton", examples=TRITON_EXAMPLES)()
            for op, (check, strategies) in CHECKS.items()}


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)
