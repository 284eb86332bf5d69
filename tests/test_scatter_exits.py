"""scatter_exits: every available backend against a plain-Python oracle.

The result buffers start poisoned (NaN logits, a sentinel exit index), so a row
that should stay untouched but was written, or one that should be written but
was not, shows. The oracle is a Python loop over the slots (the definition),
and the PyTorch reference is one of the backends checked against it.
"""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranet_fast import _extension
from ranet_fast.ops import exit_partition, scatter_exits
from triton_interpreter import each_check_under_interpreter
from cuda_testing import NO_CUDA_GPU
from op_testing import backends, compile_recording_ops, needs_extension, run_as_bare_install

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SENTINEL_EXIT = -12345


def make_case(num_rows, num_classes, num_results, dtype, seed, threshold=0.5, criterion="max_softmax"):
    """Live logits, their partition, distinct positions in [0, M) and poisoned results."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, num_classes, generator=generator, dtype=torch.float64) * 3).to(dtype)
    _, _, order, num_continue = exit_partition(logits, threshold, criterion, backend="reference")
    positions = torch.randperm(num_results, generator=generator)[:num_rows]
    result_logits = torch.full((num_results, num_classes), float("nan"), dtype=dtype)
    result_exit = torch.full((num_results,), SENTINEL_EXIT, dtype=torch.int64)
    return result_logits, result_exit, logits, order, num_continue, positions


def oracle(result_logits, result_exit, logits, order, num_continue, positions, exit_index):
    result_logits, result_exit = result_logits.clone(), result_exit.clone()
    for slot in range(int(num_continue), logits.shape[0]):
        row = int(order[slot])
        position = int(positions[row])
        result_logits[position] = logits[row]
        result_exit[position] = exit_index
    return result_logits, result_exit


def run_and_check(backend, device, case, exit_index=3):
    expected_logits, expected_exit = oracle(*case, exit_index)
    case = [tensor.to(device) for tensor in case]
    result_logits, result_exit = case[0], case[1]
    assert scatter_exits(*case, exit_index, backend=backend) is None
    # Bit-exact: a copy, and untouched rows keep their NaNs.
    assert torch.equal(result_exit.cpu(), expected_exit)
    torch.testing.assert_close(result_logits.cpu(), expected_logits, rtol=0, atol=0, equal_nan=True)
    return expected_exit


BACKENDS = backends("reference", "cpu-extension", "cuda-extension", "triton-gpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_rows, num_classes, num_results",
    [(0, 10, 5), (1, 1, 1), (1, 10, 4), (64, 10, 100), (33, 100, 33), (16, 1000, 40), (5000, 10, 6000)],
    ids=str,
)
@pytest.mark.parametrize("threshold", [float("-inf"), 0.5, float("inf")], ids=["all-leave", "some-leave", "none-leave"])
def test_backend_matches_oracle(backend_and_device, num_rows, num_classes, num_results, dtype, threshold):
    backend, device = backend_and_device
    case = make_case(num_rows, num_classes, num_results, dtype, seed=num_rows * 31 + num_classes, threshold=threshold)
    expected_exit = run_and_check(backend, device, case)
    written = int((expected_exit == 3).sum())
    num_continue = int(case[4])
    assert written == num_rows - num_continue
    if threshold == float("-inf"):
        assert written == num_rows
    elif threshold == float("inf"):
        assert written == 0
    elif num_rows >= 33 and num_classes < 1000:
        assert 0 < written < num_rows


def test_backend_strided_buffers(backend_and_device):
    backend, device = backend_and_device
    result_logits, result_exit, logits, order, num_continue, positions = make_case(50, 12, 70, torch.float32, seed=1)
    # Transposed result storage, every other column of a wider logits tensor,
    # a strided result_exit view and strided index vectors.
    strided_cases = [
        (
            result_logits.t().contiguous().t(),
            torch.full((140,), SENTINEL_EXIT)[::2],
            torch.cat([logits, logits.flip(1)], dim=1)[:, ::2],
            torch.stack([order, order], dim=1)[:, 0],
            num_continue,
            torch.stack([positions, positions], dim=1)[:, 1],
        ),
        (result_logits, result_exit, logits.t().contiguous().t(), order, num_continue, positions),
    ]
    for case in strided_cases:
        assert not all(tensor.is_contiguous() for tensor in case[:4])
        run_and_check(backend, device, list(case), exit_index=0)


def test_backend_consecutive_exits_fill_every_row(backend_and_device):
    # The engine's loop: partition, scatter, keep the continuing samples, next exit.
    backend, device = backend_and_device
    num_samples, num_classes, num_exits = 300, 10, 4
    generator = torch.Generator().manual_seed(2)
    all_logits = torch.randn(num_exits, num_samples, num_classes, generator=generator).mul(3).to(device)
    result_logits = torch.full((num_samples, num_classes), float("nan"), device=device)
    result_exit = torch.full((num_samples,), SENTINEL_EXIT, device=device)
    positions = torch.arange(num_samples, device=device)
    for exit_index in range(num_exits):
        logits = all_logits[exit_index, positions]
        threshold = 0.6 if exit_index < num_exits - 1 else float("-inf")
        _, _, order, num_continue = exit_partition(logits, threshold, backend=backend)
        scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, exit_index, backend=backend)
        positions = positions[order[: int(num_continue)]]
    assert positions.numel() == 0
    assert set(result_exit.tolist()) == set(range(num_exits))
    expected = all_logits[result_exit, torch.arange(num_samples, device=device)]
    assert torch.equal(result_logits, expected)


@needs_extension
@settings(max_examples=60, deadline=None)
@given(
    num_rows=st.integers(0, 200),
    extra_results=st.integers(0, 50),
    num_classes=st.integers(1, 30),
    dtype=st.sampled_from(DTYPES),
    threshold=st.floats(min_value=0.0, max_value=1.0),
    exit_index=st.integers(0, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_extension_writes_each_leaving_sample_once(
    num_rows, extra_results, num_classes, dtype, threshold, exit_index, seed
):
    case = make_case(num_rows, num_classes, num_rows + extra_results, dtype, seed, threshold)
    _, _, logits, order, num_continue, positions = case
    expected_exit = run_and_check("cpu", "cpu", case, exit_index)
    leaving = order[int(num_continue) :]
    # Exactly the leaving samples' positions are written, each once.
    written_positions = (expected_exit == exit_index).nonzero().flatten()
    assert sorted(written_positions.tolist()) == sorted(positions[leaving].tolist())
    assert len(written_positions) == len(leaving)


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_raises_clear_error(backend):
    good = make_case(6, 4, 8, torch.float32, seed=3)

    def call(index, value, exit_index=1):
        arguments = list(good)
        if index is not None:
            arguments[index] = value
        scatter_exits(*arguments, exit_index, backend=backend)

    with pytest.raises(ValueError, match=r"result_logits of shape \[M, C\] with C = 4 .*got shape \(8, 5\)"):
        call(0, torch.zeros(8, 5))
    with pytest.raises(TypeError, match=r"result_logits of the logits' dtype torch.float32; got torch.float16"):
        call(0, torch.zeros(8, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"result_exit of shape \[M\] = \[8\]; got shape \(7,\)"):
        call(1, torch.zeros(7, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"result_exit to be int64, got torch.int32"):
        call(1, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"logits of shape \[N, C\]; got shape \(24,\)"):
        call(2, torch.zeros(24))
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 and float64 logits; got torch.int64"):
        call(2, torch.zeros(6, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"order of shape \[N\] = \[6\]; got shape \(5,\)"):
        call(3, torch.arange(5))
    with pytest.raises(TypeError, match=r"order to be int64, got torch.int32"):
        call(3, torch.arange(6, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"num_continue to be a 0-dim int64 tensor .*got shape \(1,\)"):
        call(4, torch.tensor([2]))
    with pytest.raises(TypeError, match=r"num_continue to be a torch.Tensor, got int"):
        call(4, 2)
    with pytest.raises(ValueError, match=r"positions of shape \[N\] = \[6\]; got shape \(6, 1\)"):
        call(5, torch.zeros(6, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"exit_index >= 0, got -1"):
        call(None, None, exit_index=-1)
    with pytest.raises(TypeError, match=r"exit_index to be an int, got float"):
        call(None, None, exit_index=1.0)
    with pytest.raises(ValueError, match=r"on the logits' device cpu; positions is on meta"):
        call(5, torch.empty(6, dtype=torch.int64, device="meta"))


@needs_extension
def test_compiled_op_rejects_bad_input_itself():
    # Direct torch.ops calls bypass the Python validation; the kernel must still refuse.
    result_logits, result_exit, logits, order, num_continue, positions = make_case(6, 4, 8, torch.float32, seed=4)
    op = torch.ops.ranet_fast.scatter_exits
    with pytest.raises(RuntimeError, match=r"result_logits of shape \[M, 4\]"):
        op(torch.zeros(8, 5), result_exit, logits, order, num_continue, positions, 1)
    with pytest.raises(RuntimeError, match=r"positions to be int64"):
        op(result_logits, result_exit, logits, order, num_continue, positions.int(), 1)
    with pytest.raises(RuntimeError, match=r"exit_index >= 0"):
        op(result_logits, result_exit, logits, order, num_continue, positions, -2)
    # Index values: checked before anything is written.
    with pytest.raises(RuntimeError, match=r"num_continue \(7\) must lie in \[0, N\]"):
        op(result_logits, result_exit, logits, order, torch.tensor(7), positions, 1)
    with pytest.raises(RuntimeError, match=r"order\[5\] = 6 is out of range for N = 6"):
        op(result_logits, result_exit, logits, torch.tensor([0, 1, 2, 3, 4, 6]), torch.tensor(0), positions, 1)
    with pytest.raises(RuntimeError, match=r"positions\[0\] = 8 is out of range for M = 8"):
        bad_positions = positions.clone()
        bad_positions[0] = 8
        op(result_logits, result_exit, logits, order, torch.tensor(0), bad_positions, 1)
    assert (result_exit == SENTINEL_EXIT).all() and result_logits.isnan().all()


# ---------------------------------------------------------------------------
# torch.library integration.
# ---------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_op_passes_opcheck(dtype):
    for num_rows in (0, 9):
        case = make_case(num_rows, 5, 12, dtype, seed=5)
        torch.library.opcheck(torch.ops.ranet_fast.scatter_exits.default, (*case, 2))


# Without a GPU the reason is the GPU, whatever the build (the decorator nearest the test is checked first).
@pytest.mark.skipif(not _extension.extension_built_with_cuda(), reason="extension built without CUDA")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
def test_cuda_op_passes_opcheck():
    case = [tensor.cuda() for tensor in make_case(9, 5, 12, torch.float16, seed=6)]
    torch.library.opcheck(torch.ops.ranet_fast.scatter_exits.default, (*case, 2))


@needs_extension
def test_exit_step_under_torch_compile_fullgraph():
    def exit_step(result_logits, result_exit, logits, positions):
        confidence, prediction, order, num_continue = exit_partition(logits, 0.5, "max_softmax")
        scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, 2)
        return order, num_continue

    compiled, graph_ops = compile_recording_ops(exit_step)
    case = make_case(40, 10, 50, torch.float32, seed=7)
    eager_buffers = [case[0].clone(), case[1].clone()]
    compiled_order, compiled_num_continue = compiled(*case[:3], case[5])
    eager_order, eager_num_continue = exit_step(*eager_buffers, case[2], case[5])
    assert torch.equal(compiled_order, eager_order) and torch.equal(compiled_num_continue, eager_num_continue)
    assert torch.equal(case[1], eager_buffers[1])
    torch.testing.assert_close(case[0], eager_buffers[0], rtol=0, atol=0, equal_nan=True)
    assert (case[1] == 2).any()
    assert any(op.startswith("ranet_fast.scatter_exits") for op in graph_ops)


# ---------------------------------------------------------------------------
# Triton on CPU tensors under the interpreter (subprocess).
# ---------------------------------------------------------------------------

def _triton_cases():
    cases = {}
    for dtype in DTYPES:
        for num_rows, num_classes, num_results in [(0, 10, 5), (1, 1, 1), (64, 10, 100), (16, 1000, 40)]:
            for threshold in (float("-inf"), 0.5):
                case = make_case(num_rows, num_classes, num_results, dtype, seed=num_rows + num_classes, threshold=threshold)
                cases[f"{dtype}-{num_rows}x{num_classes}-{threshold}"] = (case, 4)
    # The interpreter runs each of the N programs in Python: one large batch only.
    cases["large-batch"] = (make_case(2000, 3, 2500, torch.float32, seed=10), 4)
    # More classes than one program's column block (1024): two programs along the column axis of
    # the grid, the second ragged (three of the six rows leave).
    cases["many-classes"] = (make_case(6, 1500, 9, torch.bfloat16, seed=11, threshold=0.12), 5)
    result_logits, result_exit, logits, order, num_continue, positions = make_case(50, 12, 70, torch.float32, seed=8)
    strided = (
        result_logits.t().contiguous().t(),
        torch.full((140,), SENTINEL_EXIT)[::2],
        torch.cat([logits, logits], dim=1)[:, ::2],
        order,
        num_continue,
        positions,
    )
    cases["strided"] = (strided, 7)
    cases["opcheck"] = (make_case(9, 5, 12, torch.float32, seed=9), 2)
    return cases


def check_triton_case(arguments, exit_index):
    expected_logits, expected_exit = oracle(*arguments, exit_index)
    result_logits, result_exit = arguments[0].clone(), arguments[1].clone()
    scatter_exits(result_logits, result_exit, *arguments[2:], exit_index, backend="triton")
    assert torch.equal(result_exit, expected_exit)
    torch.testing.assert_close(result_logits, expected_logits, rtol=0, atol=0, equal_nan=True)


def check_triton_opcheck(device):
    arguments, exit_index = _triton_cases()["opcheck"]
    torch.library.opcheck(torch.ops.ranet_fast.scatter_exits_triton.default, (*arguments, exit_index))


def check_triton_compiles_fullgraph(device):
    arguments, _ = _triton_cases()["opcheck"]
    compiled, graph_ops = compile_recording_ops(lambda *a: scatter_exits(*a, 1, backend="triton"))
    result_logits, result_exit = arguments[0].clone(), arguments[1].clone()
    compiled(result_logits, result_exit, *arguments[2:])
    assert (result_exit == 1).any()
    assert "ranet_fast.scatter_exits_triton" in graph_ops, graph_ops


def triton_interpreter_checks():
    """The cases are CPU tensors: the interpreter's device."""
    checks = {f"case/{name}": lambda device, case=case: check_triton_case(*case)
              for name, case in _triton_cases().items()}
    return {**checks, "opcheck": check_triton_opcheck, "compiles-fullgraph": check_triton_compiles_fullgraph}


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)


_NO_EXTENSION_SCRIPT = """
    import torch
    from ranet_fast import _extension
    from ranet_fast.ops import exit_partition, scatter_exits

    assert not _extension.extension_loaded()
    logits = torch.randn(20, 6) * 3
    result_logits = torch.full((30, 6), float("nan"))
    result_exit = torch.full((30,), -1)
    positions = torch.arange(20) + 5
    _, _, order, num_continue = exit_partition(logits, 0.5, "entropy")
    scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, 1)
    leaving = order[int(num_continue):]
    assert torch.equal(result_logits[positions[leaving]], logits[leaving])
    assert int((result_exit == 1).sum()) == leaving.numel()
    print("fallback ok")
"""


def test_without_extension_or_triton_falls_back_to_reference():
    run_as_bare_install(_NO_EXTENSION_SCRIPT)
