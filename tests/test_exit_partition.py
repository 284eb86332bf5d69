"""exit_partition: every available backend against the float64 reference.

Decisions (order, num_continue) are compared exactly with the float64
reference only for thresholds that no confidence comes near (midpoints of wide
gaps between the reference's confidences), since a float32 confidence may
legitimately round across a threshold it nearly touches. Every call is also
checked for self-consistency at any threshold: order must be the stable
partition of the op's own ``confidence >= threshold``.

The scatter form (exit_partition_scatter: the decision and the write of the
leaving rows in one pass) is checked on every backend against that backend's
own exit_partition followed by a plain-Python scatter (the definition), into
poisoned results, and its decisions against the float64 reference.

The Triton kernels run on CPU tensors under the Triton interpreter in a
subprocess (see tests/test_exit_confidence.py for why).
"""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranet_fast import _extension
from ranet_fast.ops import exit_partition, exit_partition_reference, exit_partition_scatter
from triton_interpreter import each_check_under_interpreter
from cuda_testing import NO_CUDA_GPU
from op_testing import backends, compile_recording_ops, needs_extension

CRITERIA = ("max_softmax", "entropy")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = [(0, 10), (1, 1), (1, 10), (7, 1), (64, 10), (33, 100), (16, 1000), (5000, 10)]

# Backends accumulate in float32 from the same input values the reference sees.
# max_softmax: as exit_confidence. entropy: confidence = 1 - H / log C, so an
# absolute error of H of a few float32 ulps summed over C classes (measured up
# to 1.3e-6 for C = 2500; the float32 reference itself is off by 3e-7) is an
# absolute error of the confidence; near-uniform rows have confidence ~0, where
# only an absolute tolerance can hold.
TOLERANCE = {
    "max_softmax": dict(rtol=1e-5, atol=1e-7),
    "entropy": dict(rtol=1e-5, atol=2e-6),
}
FLOAT64_TOLERANCE = dict(rtol=1e-12, atol=1e-12)
# Gaps between reference confidences wider than this hold a threshold no
# backend's rounding can cross.
SAFE_GAP = 1e-4


def random_logits(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def special_logits(dtype):
    nan, inf = float("nan"), float("inf")
    return torch.tensor(
        [
            [1.0, nan, 3.0, nan],  # NaN: confidence NaN (never leaves), argmax first NaN
            [-inf, -inf, -inf, -inf],  # all -inf: NaN
            [inf, 1.0, inf, 2.0],  # infinite maximum: NaN, first +inf
            [2.0, 5.0, 5.0, 1.0],  # tie: first index
            [-inf, -inf, 3.0, 0.0],  # -inf entries contribute nothing (0 log 0 = 0)
            [7.0, 7.0, 7.0, 7.0],  # uniform: entropy confidence 0
            [0.0, -inf, -inf, -inf],  # one finite class: confidence 1 for both criteria
            [9.0, -2.0, 0.5, 1.0],
        ],
        dtype=dtype,
    )


def separating_thresholds(reference_confidence):
    """Thresholds at the middle of wide gaps of the reference confidences, near 1/4, 1/2, 3/4."""
    values = torch.unique(reference_confidence[~reference_confidence.isnan()]).tolist()
    thresholds = []
    for fraction in (0.25, 0.5, 0.75):
        target = int(fraction * len(values))
        candidates = [k for k in range(1, len(values)) if values[k] - values[k - 1] > SAFE_GAP]
        if candidates:
            k = min(candidates, key=lambda k: abs(k - target))
            thresholds.append((values[k - 1] + values[k]) / 2)
    return thresholds


def expected_partition(confidence, threshold):
    leaves = confidence >= threshold
    indices = torch.arange(confidence.shape[0], device=confidence.device)
    return torch.cat([indices[~leaves], indices[leaves]]), int((~leaves).sum())


def check_outputs(logits, threshold, criterion, outputs, exact_decisions=True):
    """Compares one call's outputs with the float64 reference and with themselves."""
    confidence, prediction, order, num_continue = outputs
    num_rows = logits.shape[0]
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert confidence.dtype == expected_dtype and confidence.shape == (num_rows,)
    assert prediction.dtype == order.dtype == num_continue.dtype == torch.int64
    assert prediction.shape == order.shape == (num_rows,) and num_continue.shape == ()
    for tensor in outputs:
        assert tensor.device == logits.device and not tensor.requires_grad
    reference = exit_partition_reference(logits.detach().cpu().double(), threshold, criterion)
    tolerance = FLOAT64_TOLERANCE if logits.dtype == torch.float64 else TOLERANCE[criterion]
    torch.testing.assert_close(confidence.cpu().double(), reference[0], equal_nan=True, **tolerance)
    assert torch.equal(prediction.cpu(), reference[1])
    # Self-consistency holds for every threshold, including one a confidence equals.
    own_order, own_num_continue = expected_partition(confidence.cpu(), threshold)
    assert torch.equal(order.cpu(), own_order)
    assert int(num_continue) == own_num_continue
    if exact_decisions:
        assert torch.equal(order.cpu(), reference[2])
        assert torch.equal(num_continue.cpu(), reference[3])


def check_all_thresholds(logits, criterion, backend):
    reference_confidence = exit_partition_reference(logits.detach().cpu().double(), 0.0, criterion)[0]
    thresholds = [-math.inf, math.inf, -1e300, 1e300, 0.0, 1.0] + separating_thresholds(reference_confidence)
    leaving_counts = set()
    for threshold in thresholds:
        outputs = exit_partition(logits, threshold, criterion, backend=backend)
        # 0.0 and 1.0 are exactly attained confidences (entropy of uniform and
        # one-class rows): compare those decisions only with the op itself.
        check_outputs(logits, threshold, criterion, outputs, exact_decisions=threshold not in (0.0, 1.0))
        leaving_counts.add(logits.shape[0] - int(outputs[3]))
    return leaving_counts


def assert_thresholds_split(leaving_counts, shape):
    """-inf sends everyone out, +inf no one; some threshold splits a real batch (with C == 1 every
    confidence is 1, so nothing can split it)."""
    assert {0, shape[0]} <= leaving_counts
    if shape[0] >= 7 and shape[1] > 1:
        assert len(leaving_counts) > 2


SENTINEL_EXIT = -12345


def scatter_case(logits, seed, extra_results=3, strided_results=False):
    """Distinct positions in [0, M), M = N + extra_results, and results poisoned with NaN logits and a
    sentinel exit (as column/row slices of wider buffers when ``strided_results``)."""
    num_rows, num_classes = logits.shape
    num_results = num_rows + extra_results
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(num_results, generator=generator)[:num_rows].to(logits.device)
    if strided_results:
        result_logits = torch.full((num_results, 2 * num_classes), math.nan, dtype=logits.dtype,
                                   device=logits.device)[:, 1::2]
        result_exit = torch.full((2 * num_results,), SENTINEL_EXIT, device=logits.device)[::2]
        positions = torch.stack([positions, positions], dim=1)[:, 0]  # a non-contiguous view
    else:
        result_logits = torch.full((num_results, num_classes), math.nan, dtype=logits.dtype, device=logits.device)
        result_exit = torch.full((num_results,), SENTINEL_EXIT, device=logits.device)
    return positions, result_logits, result_exit


def expected_scatter(logits, threshold, criterion, backend, positions, exit_index, result_logits, result_exit):
    """The backend's own exit_partition, then the scatter written out as a loop over the leaving rows."""
    _, _, order, num_continue = exit_partition(logits, threshold, criterion, backend=backend)
    result_logits, result_exit = result_logits.cpu().clone(), result_exit.cpu().clone()
    for row in order[int(num_continue):].tolist():
        position = int(positions[row])
        result_logits[position] = logits[row].cpu()
        result_exit[position] = exit_index
    return order.cpu(), int(num_continue), result_logits, result_exit


def check_scatter_form(logits, threshold, criterion, backend, seed, exact_decisions=True, strided_results=False):
    positions, result_logits, result_exit = scatter_case(logits, seed, strided_results=strided_results)
    exit_index = 2
    expected = expected_scatter(logits, threshold, criterion, backend, positions, exit_index, result_logits,
                                result_exit)
    order, num_continue = exit_partition_scatter(logits, threshold, criterion, positions, exit_index, result_logits,
                                                 result_exit, backend=backend)
    assert order.dtype == num_continue.dtype == torch.int64 and order.shape == (logits.shape[0],)
    assert num_continue.shape == () and order.device == num_continue.device == logits.device
    assert torch.equal(order.cpu(), expected[0]) and int(num_continue) == expected[1]
    # Bit-exact copies; rows no leaving sample maps to keep their poison.
    torch.testing.assert_close(result_logits.cpu(), expected[2], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(result_exit.cpu(), expected[3])
    if exact_decisions:
        reference = exit_partition_reference(logits.detach().cpu().double(), threshold, criterion)
        assert torch.equal(order.cpu(), reference[2]) and int(num_continue) == int(reference[3])
    return logits.shape[0] - int(num_continue)


def check_scatter_form_all_thresholds(logits, criterion, backend, seed, strided_results=False):
    reference_confidence = exit_partition_reference(logits.detach().cpu().double(), 0.0, criterion)[0]
    leaving_counts = set()
    for threshold in [-math.inf, math.inf, 0.0, 1.0] + separating_thresholds(reference_confidence):
        leaving_counts.add(check_scatter_form(logits, threshold, criterion, backend, seed,
                                              exact_decisions=threshold not in (0.0, 1.0),
                                              strided_results=strided_results))
    return leaving_counts


# ---------------------------------------------------------------------------
# In-process backends.
# ---------------------------------------------------------------------------


BACKENDS = backends("reference", "cpu-extension", "cuda-extension", "triton-gpu")


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(backend_and_device, shape, dtype, criterion):
    backend, device = backend_and_device
    logits = random_logits(shape, dtype, seed_of(shape, dtype, criterion)).to(device)
    assert_thresholds_split(check_all_thresholds(logits, criterion, backend), shape)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_backend_ties(backend_and_device, criterion):
    backend, device = backend_and_device
    generator = torch.Generator().manual_seed(7)
    logits = torch.randint(-2, 3, (300, 6), generator=generator).float().to(device)
    row_maxima = logits.max(dim=1, keepdim=True).values
    assert ((logits == row_maxima).sum(dim=1) > 1).any()
    check_all_thresholds(logits, criterion, backend)
    # Equal rows have equal confidences: a threshold equal to one of them sends
    # every such row out, in increasing order after the continuing ones.
    confidence = exit_partition(logits, 0.0, criterion, backend=backend)[0]
    threshold = float(confidence[0])
    outputs = exit_partition(logits, threshold, criterion, backend=backend)
    check_outputs(logits, threshold, criterion, outputs, exact_decisions=False)
    assert 0 in outputs[2][int(outputs[3]) :].tolist()


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_non_finite_rows(backend_and_device, dtype, criterion):
    backend, device = backend_and_device
    logits = special_logits(dtype).to(device)
    for threshold in (-math.inf, 0.5, math.inf):
        outputs = exit_partition(logits, threshold, criterion, backend=backend)
        check_outputs(logits, threshold, criterion, outputs)
    # NaN confidences never leave, not even at -inf: rows 0, 1, 2 continue.
    confidence, _, order, num_continue = exit_partition(logits, -math.inf, criterion, backend=backend)
    assert confidence[:3].isnan().all() and not confidence[3:].isnan().any()
    assert int(num_continue) == 3 and order.tolist() == list(range(8))
    if criterion == "entropy":
        assert confidence[5].item() == pytest.approx(0.0, abs=1e-6)
        assert confidence[6].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_backend_non_contiguous_logits(backend_and_device, criterion):
    backend, device = backend_and_device
    every_other_column = random_logits((40, 300), torch.float32, seed=3).to(device)[:, ::2]
    transposed = random_logits((100, 40), torch.float16, seed=4).to(device).t()
    every_third_row = random_logits((90, 10), torch.bfloat16, seed=5).to(device)[::3]
    for logits in (every_other_column, transposed, every_third_row):
        assert not logits.is_contiguous()
        check_all_thresholds(logits, criterion, backend)


def test_backend_ignores_autograd_history(backend_and_device):
    backend, device = backend_and_device
    logits = random_logits((6, 5), torch.float32, seed=6).to(device).requires_grad_()
    outputs = exit_partition(logits * 2, 0.5, "entropy", backend=backend)
    check_outputs((logits * 2).detach(), 0.5, "entropy", outputs)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_scatter_form_matches_partition_then_scatter(backend_and_device, shape, dtype, criterion):
    backend, device = backend_and_device
    logits = random_logits(shape, dtype, seed_of(shape, dtype, criterion, "scatter")).to(device)
    assert_thresholds_split(check_scatter_form_all_thresholds(logits, criterion, backend, seed_of(shape, "positions")),
                            shape)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_backend_scatter_form_strided_and_non_finite(backend_and_device, criterion):
    backend, device = backend_and_device
    for seed, logits in enumerate((random_logits((40, 300), torch.float32, seed=3).to(device)[:, ::2],
                                   random_logits((100, 40), torch.float16, seed=4).to(device).t(),
                                   special_logits(torch.bfloat16).to(device))):
        check_scatter_form_all_thresholds(logits, criterion, backend, seed, strided_results=True)


@needs_extension
@settings(max_examples=60, deadline=None)
@given(
    num_rows=st.integers(0, 300),
    num_classes=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    criterion=st.sampled_from(CRITERIA),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    threshold=st.floats(min_value=-0.1, max_value=1.1) | st.sampled_from([-math.inf, math.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_extension_partition_properties(num_rows, num_classes, dtype, criterion, scale, threshold, seed):
    logits = random_logits((num_rows, num_classes), dtype, seed, scale)
    confidence, _, order, num_continue = outputs = exit_partition(logits, threshold, criterion, backend="cpu")
    num_continue = int(num_continue)
    # A permutation: every sample exactly once.
    assert sorted(order.tolist()) == list(range(num_rows))
    continuing, leaving = order[:num_continue], order[num_continue:]
    # Stable: increasing within each group.
    assert (continuing.diff() > 0).all() and (leaving.diff() > 0).all()
    assert (confidence[leaving] >= threshold).all()
    assert not (confidence[continuing] >= threshold).any()
    check_outputs(logits, threshold, criterion, outputs, exact_decisions=False)


# ---------------------------------------------------------------------------
# Triton on CPU tensors under the interpreter (subprocess).
# ---------------------------------------------------------------------------

def _triton_cases():
    cases = {}
    for criterion in CRITERIA:
        for shape in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                logits = random_logits(shape, dtype, seed_of(shape, dtype, criterion, "triton"))
                reference = exit_partition_reference(logits.double(), 0.0, criterion)[0]
                for threshold in [-math.inf, math.inf] + separating_thresholds(reference)[1:2]:
                    cases[f"{criterion}-{shape}-{dtype}-{threshold}"] = (logits, threshold, criterion)
        cases[f"{criterion}-float64"] = (random_logits((9, 1000), torch.float64, seed=100), 0.3, criterion)
        cases[f"{criterion}-special"] = (special_logits(torch.float32), 0.5, criterion)
        cases[f"{criterion}-special-everyone"] = (special_logits(torch.float16), -math.inf, criterion)
        cases[f"{criterion}-strided"] = (random_logits((40, 300), torch.float32, seed=3)[:, ::2], 0.1, criterion)
        cases[f"{criterion}-transposed"] = (random_logits((100, 40), torch.float16, seed=4).t(), 0.5, criterion)
    cases["opcheck"] = (random_logits((8, 10), torch.float32, seed=10), 0.4, "max_softmax")
    return cases


def check_triton_opcheck(device):
    logits = _triton_cases()["opcheck"][0].to(device)
    for criterion in CRITERIA:
        torch.library.opcheck(torch.ops.ranet_fast.exit_partition_triton.default, (logits, 0.4, criterion))


def check_triton_compiles_fullgraph(device):
    logits = _triton_cases()["opcheck"][0].to(device)
    compiled, graph_ops = compile_recording_ops(lambda x: exit_partition(x, 0.4, "entropy", backend="triton"))
    expected = exit_partition(logits, 0.4, "entropy", backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(compiled(logits), expected))
    assert "ranet_fast.exit_partition_triton" in graph_ops, graph_ops


def check_triton_scatter_opcheck(device):
    logits = _triton_cases()["opcheck"][0].to(device)
    for criterion in CRITERIA:
        positions, result_logits, result_exit = scatter_case(logits, seed=1)
        torch.library.opcheck(torch.ops.ranet_fast.exit_partition_scatter_triton.default,
                              (logits, 0.4, criterion, positions, 1, result_logits, result_exit))


def triton_interpreter_checks():
    checks = {f"case/{name}": lambda device, logits=logits, threshold=threshold, criterion=criterion: check_outputs(
        logits, threshold, criterion, exit_partition(logits.to(device), threshold, criterion, backend="triton"))
        for name, (logits, threshold, criterion) in _triton_cases().items()}
    scatter_checks = {
        f"scatter/{name}": lambda device, logits=logits, threshold=threshold, criterion=criterion: check_scatter_form(
            logits.to(device), threshold, criterion, "triton", seed=5, exact_decisions=not math.isinf(threshold),
            strided_results=logits.shape[0] % 2 == 1)
        for name, (logits, threshold, criterion) in _triton_cases().items() if "special" not in name}
    scatter_checks.update({
        f"scatter/special-{criterion}": lambda device, criterion=criterion: check_scatter_form_all_thresholds(
            special_logits(torch.float32).to(device), criterion, "triton", seed=6)
        for criterion in CRITERIA})
    return {**checks, **scatter_checks, "opcheck": check_triton_opcheck, "scatter-opcheck": check_triton_scatter_opcheck,
            "compiles-fullgraph": check_triton_compiles_fullgraph}


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)


# ---------------------------------------------------------------------------
# torch.library integration of the compiled op.
# ---------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize(
    "logits",
    [
        random_logits((8, 10), torch.float32, seed=11),
        random_logits((0, 3), torch.bfloat16, seed=12),
        random_logits((7, 20), torch.float16, seed=13)[:, ::3],
        random_logits((5, 1), torch.float64, seed=14),
    ],
    ids=["float32", "empty-bfloat16", "strided-float16", "float64-one-class"],
)
def test_compiled_op_passes_opcheck(logits, criterion):
    torch.library.opcheck(torch.ops.ranet_fast.exit_partition.default, (logits, 0.3, criterion))


# Without a GPU the reason is the GPU, whatever the build (the decorator nearest the test is checked first).
@pytest.mark.skipif(not _extension.extension_built_with_cuda(), reason="extension built without CUDA")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
def test_cuda_op_passes_opcheck():
    logits = random_logits((8, 10), torch.float16, seed=15).cuda()
    for criterion in CRITERIA:
        torch.library.opcheck(torch.ops.ranet_fast.exit_partition.default, (logits, 0.3, criterion))


@needs_extension
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("num_rows", [0, 1, 9])
def test_compiled_scatter_form_passes_opcheck(num_rows, criterion):
    logits = random_logits((num_rows, 10), torch.float32, seed=num_rows)
    positions, result_logits, result_exit = scatter_case(logits, seed=2)
    torch.library.opcheck(torch.ops.ranet_fast.exit_partition_scatter.default,
                          (logits, 0.3, criterion, positions, 1, result_logits, result_exit))


@pytest.mark.skipif(not _extension.extension_built_with_cuda(), reason="extension built without CUDA")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
def test_cuda_scatter_form_passes_opcheck():
    logits = random_logits((8, 10), torch.float16, seed=15).cuda()
    for criterion in CRITERIA:
        positions, result_logits, result_exit = scatter_case(logits, seed=3)
        torch.library.opcheck(torch.ops.ranet_fast.exit_partition_scatter.default,
                              (logits, 0.3, criterion, positions, 1, result_logits, result_exit))


@needs_extension
def test_compiled_scatter_form_under_torch_compile_fullgraph():
    def decide(logits, threshold, positions, result_logits, result_exit):
        order, num_continue = exit_partition_scatter(logits, threshold, "max_softmax", positions, 1, result_logits,
                                                     result_exit)
        return order, num_continue + 0

    compiled, graph_ops = compile_recording_ops(decide)
    logits = random_logits((12, 10), torch.float32, seed=31)
    eager_results, compiled_results = scatter_case(logits, seed=4), scatter_case(logits, seed=4)
    for got, expected in zip(compiled(logits, 0.4, *compiled_results), decide(logits, 0.4, *eager_results)):
        assert torch.equal(got, expected)
    torch.testing.assert_close(compiled_results[1], eager_results[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(compiled_results[2], eager_results[2])
    assert any(op.startswith("ranet_fast.exit_partition") and "scatter" in op for op in graph_ops), graph_ops


@needs_extension
def test_cpu_scatter_form_refuses_a_bad_position_before_writing():
    logits = random_logits((6, 4), torch.float32, seed=32)
    positions, result_logits, result_exit = scatter_case(logits, seed=5)
    positions[4] = result_logits.shape[0]  # one past the last result row
    with pytest.raises(RuntimeError, match=r"positions\[4\] = 9 is out of range for M = 9"):
        exit_partition_scatter(logits, -math.inf, "max_softmax", positions, 1, result_logits, result_exit,
                               backend="cpu")
    assert result_logits.isnan().all() and (result_exit == SENTINEL_EXIT).all()


@needs_extension
def test_compiled_scatter_form_rejects_bad_input_itself():
    logits = torch.randn(3, 4)
    positions, result_logits, result_exit = scatter_case(logits, seed=6)
    op = torch.ops.ranet_fast.exit_partition_scatter
    with pytest.raises(RuntimeError, match=r"result_logits of shape \[M, 4\]"):
        op(logits, 0.5, "entropy", positions, 0, result_logits[:, :3], result_exit)
    with pytest.raises(RuntimeError, match=r"result_logits of the logits' dtype"):
        op(logits, 0.5, "entropy", positions, 0, result_logits.double(), result_exit)
    with pytest.raises(RuntimeError, match=r"positions of shape \[N\] = \[3\]"):
        op(logits, 0.5, "entropy", positions[:2], 0, result_logits, result_exit)
    with pytest.raises(RuntimeError, match=r"result_exit to be int64"):
        op(logits, 0.5, "entropy", positions, 0, result_logits, result_exit.int())
    with pytest.raises(RuntimeError, match=r"exit_index >= 0"):
        op(logits, 0.5, "entropy", positions, -1, result_logits, result_exit)
    with pytest.raises(RuntimeError, match=r"overlap"):
        op(logits, 0.5, "entropy", positions, 0, result_logits[:1].expand(6, 4), result_exit)
    with pytest.raises(RuntimeError, match=r"unknown criterion 'margin'"):
        op(logits, 0.5, "margin", positions, 0, result_logits, result_exit)


@needs_extension
def test_compiled_op_under_torch_compile_fullgraph():
    def decide(logits, threshold):
        confidence, prediction, order, num_continue = exit_partition(logits, threshold, "entropy")
        return confidence, prediction, order, num_continue + 0

    compiled, graph_ops = compile_recording_ops(decide, dynamic=True)
    for num_rows, threshold in ((5, 0.3), (12, 0.6)):
        logits = random_logits((num_rows, 10), torch.float32, seed=num_rows)
        for got, expected in zip(compiled(logits, threshold), decide(logits, threshold)):
            assert torch.equal(got, expected)
    assert any(op.startswith("ranet_fast.exit_partition") for op in graph_ops)


@needs_extension
def test_compiled_op_rejects_bad_input_itself():
    # Direct torch.ops calls bypass the Python validation; the kernel must still refuse.
    with pytest.raises(RuntimeError, match=r"exit_partition expects logits of shape \[N, C\]"):
        torch.ops.ranet_fast.exit_partition(torch.randn(3), 0.5, "entropy")
    with pytest.raises(RuntimeError, match=r"C >= 1"):
        torch.ops.ranet_fast.exit_partition(torch.randn(3, 0), 0.5, "entropy")
    with pytest.raises(RuntimeError, match=r"float16, bfloat16, float32 or float64"):
        torch.ops.ranet_fast.exit_partition(torch.ones(3, 4, dtype=torch.int32), 0.5, "entropy")
    with pytest.raises(RuntimeError, match=r"unknown criterion 'margin'"):
        torch.ops.ranet_fast.exit_partition(torch.randn(3, 4), 0.5, "margin")


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_raises_clear_error(backend):
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"exit_partition expects logits of shape \[N, C\]; got a 1-D tensor"):
        exit_partition(torch.randn(10), 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"exit_partition needs at least one class \(C >= 1\)"):
        exit_partition(torch.randn(4, 0), 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"exit_partition supports float16, bfloat16, float32 and float64 logits"):
        exit_partition(torch.ones(4, 3, dtype=torch.int64), 0.5, backend=backend)
    with pytest.raises(TypeError, match=r"expects a torch.Tensor of logits, got list"):
        exit_partition([[1.0, 2.0]], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"threshold is NaN"):
        exit_partition(logits, math.nan, backend=backend)
    with pytest.raises(TypeError, match=r"threshold to be a Python float, got Tensor"):
        exit_partition(logits, torch.tensor(0.5), backend=backend)
    with pytest.raises(TypeError, match=r"threshold to be a Python float, got bool"):
        exit_partition(logits, True, backend=backend)
    with pytest.raises(ValueError, match=r"unknown criterion 'margin'; choose one of max_softmax, entropy"):
        exit_partition(logits, 0.5, "margin", backend=backend)


def test_integer_threshold_is_accepted():
    logits = random_logits((20, 5), torch.float32, seed=21)
    for got, expected in zip(exit_partition(logits, 1), exit_partition(logits, 1.0)):
        assert torch.equal(got, expected)


def test_reference_definition_of_entropy():
    # Independent of softmax: H = -sum p log p with p = exp(x) / sum exp(x).
    logits = random_logits((50, 17), torch.float64, seed=22)
    probabilities = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    entropy = -(probabilities * torch.log(probabilities)).sum(dim=1)
    confidence = exit_partition_reference(logits, 0.5, "entropy")[0]
    torch.testing.assert_close(confidence, 1 - entropy / math.log(17), **FLOAT64_TOLERANCE)
    assert ((confidence > 0) & (confidence < 1)).all()


@pytest.mark.parametrize("backend", [None, "reference"])
def test_scatter_form_bad_input_raises_clear_error(backend):
    logits = torch.randn(4, 3)
    positions, result_logits, result_exit = scatter_case(logits, seed=7)

    def call(**changes):
        arguments = dict(logits=logits, threshold=0.5, criterion="max_softmax", positions=positions, exit_index=1,
                         result_logits=result_logits, result_exit=result_exit)
        exit_partition_scatter(**{**arguments, **changes}, backend=backend)

    with pytest.raises(ValueError, match=r"exit_partition_scatter expects logits of shape \[N, C\]"):
        call(logits=torch.randn(4))
    with pytest.raises(ValueError, match=r"threshold is NaN"):
        call(threshold=math.nan)
    with pytest.raises(TypeError, match=r"exit_partition_scatter expects positions to be a torch.Tensor, got list"):
        call(positions=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"result_logits of shape \[M, C\] with C = 3"):
        call(result_logits=result_logits[:, :2])
    with pytest.raises(TypeError, match=r"result_logits of the logits' dtype torch.float32"):
        call(result_logits=result_logits.double())
    with pytest.raises(ValueError, match=r"positions of shape \[N\] = \[4\]"):
        call(positions=positions[:3])
    with pytest.raises(TypeError, match=r"result_exit to be int64"):
        call(result_exit=result_exit.int())
    with pytest.raises(TypeError, match=r"exit_index to be an int, got bool"):
        call(exit_index=True)
    with pytest.raises(ValueError, match=r"exit_index >= 0, got -1"):
        call(exit_index=-1)
    with pytest.raises(ValueError, match=r"on the logits' device cpu; result_exit is on meta"):
        call(result_exit=result_exit.to("meta"))
    with pytest.raises(ValueError, match=r"result_logits has elements that share memory"):
        call(result_logits=result_logits[:1].expand(7, 3))
    # Nothing was written by any refused call.
    assert result_logits.isnan().all() and (result_exit == SENTINEL_EXIT).all()
