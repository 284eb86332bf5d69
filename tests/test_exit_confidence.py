"""exit_confidence: every available backend against the float64 reference.

The Triton kernel is checked on CPU tensors under the Triton interpreter in a
subprocess: Triton fixes interpreter mode when a kernel is defined, so setting
TRITON_INTERPRET=1 in this process would depend on import order and would also
switch every other test's Triton kernels to the interpreter.
"""

import dataclasses
import importlib
import sys
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranet_fast import _extension
from ranet_fast.ops import exit_confidence, exit_confidence_reference
from ranet_fast.ops._registry import FUNCTIONAL
from triton_interpreter import each_check_under_interpreter
from cuda_testing import NO_CUDA_GPU
from op_testing import backends, compile_recording_ops, needs_extension, run_as_bare_install

HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + HALF_DTYPES
SHAPES = [(0, 10), (1, 1), (1, 10), (7, 1), (64, 10), (33, 100), (16, 1000), (3, 2500)]

# Every backend accumulates in float32 (float64 for float64 logits) from the same
# input values the reference sees, so half inputs need no looser tolerance:
# only the accumulation differs from the float64 reference.
FLOAT32_ACCUMULATION = dict(rtol=1e-5, atol=1e-7)
FLOAT64_ACCUMULATION = dict(rtol=1e-12, atol=1e-15)

# The package attribute ranet_fast.ops.exit_confidence is the function; the module
# is needed to spy on the fallback it calls.
exit_confidence_module = importlib.import_module("ranet_fast.ops.exit_confidence")



def random_logits(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def tied_logits(shape, dtype, seed):
    """Small integers: most rows hold their maximum several times."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=generator).to(dtype)


def special_logits(dtype):
    """Rows with NaN, +-inf and ties, whose expected outputs follow torch.softmax/argmax."""
    nan, inf = float("nan"), float("inf")
    return torch.tensor(
        [
            [1.0, nan, 3.0, nan],  # first NaN wins the argmax; confidence NaN
            [-inf, -inf, -inf, -inf],  # softmax of all -inf is NaN; argmax 0
            [inf, 1.0, inf, 2.0],  # infinite maximum: NaN confidence, first +inf
            [2.0, 5.0, 5.0, 1.0],  # tie: first index
            [-inf, 3.0, -inf, 0.0],  # -inf entries contribute nothing
            [-inf, -inf, 3.0, 0.0],  # ... also several before the maximum (-inf - -inf is NaN)
            [7.0, 7.0, 7.0, 7.0],  # all equal: confidence 1/C, index 0
        ],
        dtype=dtype,
    )


def assert_matches_reference(logits, confidence, prediction):
    """Compares a backend's outputs with the float64 reference on the same values."""
    expected_confidence, expected_prediction = exit_confidence_reference(logits.cpu().double())
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert confidence.dtype == expected_dtype
    assert prediction.dtype == torch.int64
    assert confidence.shape == prediction.shape == (logits.shape[0],)
    assert confidence.device == prediction.device == logits.device
    tolerance = FLOAT64_ACCUMULATION if logits.dtype == torch.float64 else FLOAT32_ACCUMULATION
    torch.testing.assert_close(confidence.cpu().double(), expected_confidence, equal_nan=True, **tolerance)
    assert torch.equal(prediction.cpu(), expected_prediction)


def test_reference_matches_its_definition():
    # Independent of softmax: confidence = 1 / sum exp(x - max).
    logits = random_logits((50, 17), torch.float64, seed=1)
    confidence, prediction = exit_confidence_reference(logits)
    maximum = logits.max(dim=1, keepdim=True).values
    torch.testing.assert_close(confidence, 1.0 / torch.exp(logits - maximum).sum(dim=1), **FLOAT64_ACCUMULATION)
    assert torch.equal(logits.gather(1, prediction[:, None]), maximum)
    # Ties resolve to the first index.
    confidence, prediction = exit_confidence_reference(torch.tensor([[1.0, 4.0, 4.0], [0.0, 0.0, 0.0]]))
    assert prediction.tolist() == [1, 0]
    torch.testing.assert_close(confidence[1], torch.tensor(1 / 3))


# ---------------------------------------------------------------------------
# In-process backends: cpu extension, cuda extension, triton on the GPU.
# ---------------------------------------------------------------------------


BACKENDS = backends("cpu-extension", "cuda-extension", "triton-gpu")


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(backend_and_device, shape, dtype):
    backend, device = backend_and_device
    logits = random_logits(shape, dtype, seed=zlib.crc32(f"{shape}{dtype}".encode())).to(device)
    assert_matches_reference(logits, *exit_confidence(logits, backend=backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_ties_take_first_index(backend_and_device, dtype):
    backend, device = backend_and_device
    logits = tied_logits((200, 37), dtype, seed=7).to(device)
    confidence, prediction = exit_confidence(logits, backend=backend)
    assert_matches_reference(logits, confidence, prediction)
    # The data must actually contain ties for this test to mean anything.
    row_maxima = logits.max(dim=1, keepdim=True).values
    assert ((logits == row_maxima).sum(dim=1) > 1).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_non_finite_values_follow_torch(backend_and_device, dtype):
    backend, device = backend_and_device
    logits = special_logits(dtype).to(device)
    assert_matches_reference(logits, *exit_confidence(logits, backend=backend))


def test_backend_non_contiguous_input(backend_and_device):
    backend, device = backend_and_device
    wide = random_logits((40, 300), torch.float32, seed=3).to(device)
    every_other_column = wide[:, ::2]
    transposed = random_logits((100, 40), torch.float16, seed=4).to(device).t()
    for logits in (every_other_column, transposed):
        assert not logits.is_contiguous()
        assert_matches_reference(logits, *exit_confidence(logits, backend=backend))


def test_backend_writes_every_output(backend_and_device):
    # Fill memory of the output sizes with a sentinel and free it, so that a
    # kernel skipping rows would hand back the sentinel from reused memory.
    backend, device = backend_and_device
    num_rows = 4099  # not a multiple of any block size used by the kernels
    sentinel = torch.full((num_rows,), -12345.0, dtype=torch.float32, device=device)
    sentinel_index = torch.full((num_rows,), -12345, dtype=torch.int64, device=device)
    del sentinel, sentinel_index
    logits = random_logits((num_rows, 10), torch.float32, seed=5).to(device)
    confidence, prediction = exit_confidence(logits, backend=backend)
    assert not (confidence == -12345.0).any()
    assert ((prediction >= 0) & (prediction < 10)).all()
    assert_matches_reference(logits, confidence, prediction)


def test_backend_output_never_requires_grad(backend_and_device):
    backend, device = backend_and_device
    logits = random_logits((6, 5), torch.float32, seed=6).to(device).requires_grad_()
    confidence, prediction = exit_confidence(logits, backend=backend)
    assert not confidence.requires_grad and not prediction.requires_grad


@needs_extension
@settings(max_examples=60, deadline=None)
@given(
    num_rows=st.integers(0, 40),
    num_classes=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_extension_random_shapes(num_rows, num_classes, dtype, scale, seed):
    logits = random_logits((num_rows, num_classes), dtype, seed, scale)
    assert_matches_reference(logits, *exit_confidence(logits, backend="cpu"))


# ---------------------------------------------------------------------------
# Triton on CPU tensors under the interpreter (subprocess).
# ---------------------------------------------------------------------------

def _triton_cases():
    cases = {}
    for shape in SHAPES:
        for dtype in DTYPES:
            cases[f"random-{shape}-{dtype}"] = random_logits(shape, dtype, seed=len(cases))
    cases["float64"] = random_logits((9, 1000), torch.float64, seed=100)
    cases["ties"] = tied_logits((200, 37), torch.float32, seed=7)
    cases["ties-bfloat16"] = tied_logits((50, 1500), torch.bfloat16, seed=8)
    cases["special"] = special_logits(torch.float32)
    cases["every-other-column"] = random_logits((40, 300), torch.float32, seed=3)[:, ::2]
    cases["transposed"] = random_logits((100, 40), torch.float16, seed=4).t()
    cases["many-rows"] = random_logits((1025, 10), torch.float32, seed=9)
    cases["opcheck"] = random_logits((8, 10), torch.float32, seed=10)
    return cases


def check_triton_opcheck(device):
    logits = _triton_cases()["opcheck"].to(device)
    torch.library.opcheck(torch.ops.ranet_fast.exit_confidence_triton.default, (logits,))


def check_triton_compiles_fullgraph(device):
    logits = _triton_cases()["opcheck"].to(device)
    compiled, graph_ops = compile_recording_ops(lambda x: exit_confidence(x, backend="triton"))
    assert all(torch.equal(a, b) for a, b in zip(compiled(logits), exit_confidence(logits, backend="triton")))
    assert "ranet_fast.exit_confidence_triton" in graph_ops, graph_ops


def triton_interpreter_checks():
    checks = {f"case/{name}": lambda device, logits=logits: assert_matches_reference(
        logits, *exit_confidence(logits.to(device), backend="triton")) for name, logits in _triton_cases().items()}
    return {**checks, "opcheck": check_triton_opcheck, "compiles-fullgraph": check_triton_compiles_fullgraph}


test_triton_under_interpreter = each_check_under_interpreter(triton_interpreter_checks)


# ---------------------------------------------------------------------------
# torch.library integration of the compiled op.
# ---------------------------------------------------------------------------

@needs_extension
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
def test_compiled_op_passes_opcheck(logits):
    torch.library.opcheck(torch.ops.ranet_fast.exit_confidence.default, (logits,))


# Without a GPU the reason is the GPU, whatever the build (the decorator nearest the test is checked first).
@pytest.mark.skipif(not _extension.extension_built_with_cuda(), reason="extension built without CUDA")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
def test_cuda_op_passes_opcheck():
    logits = random_logits((8, 10), torch.float16, seed=15).cuda()
    torch.library.opcheck(torch.ops.ranet_fast.exit_confidence.default, (logits,))


@needs_extension
def test_compiled_op_under_torch_compile_fullgraph():
    def decide(logits):
        confidence, prediction = exit_confidence(logits)
        return confidence >= 0.5, prediction

    compiled, graph_ops = compile_recording_ops(decide, dynamic=True)
    for num_rows in (5, 12):
        logits = random_logits((num_rows, 10), torch.float32, seed=num_rows)
        for got, expected in zip(compiled(logits), decide(logits)):
            assert torch.equal(got, expected)
    assert "ranet_fast.exit_confidence" in graph_ops, graph_ops

    # Inductor too; without surrounding arithmetic it has no C++ kernel to build,
    # which keeps this test fast.
    inductor_compiled = torch.compile(exit_confidence, fullgraph=True)
    logits = random_logits((16, 100), torch.float32, seed=16)
    for got, expected in zip(inductor_compiled(logits), exit_confidence(logits)):
        assert torch.equal(got, expected)


@needs_extension
def test_compiled_op_rejects_bad_input_itself():
    # Direct torch.ops calls bypass the Python validation; the kernel must still refuse.
    with pytest.raises(RuntimeError, match=r"shape \[N, C\]"):
        torch.ops.ranet_fast.exit_confidence(torch.randn(3))
    with pytest.raises(RuntimeError, match=r"C >= 1"):
        torch.ops.ranet_fast.exit_confidence(torch.randn(3, 0))
    with pytest.raises(RuntimeError, match=r"float16, bfloat16, float32 or float64"):
        torch.ops.ranet_fast.exit_confidence(torch.ones(3, 4, dtype=torch.int32))


# ---------------------------------------------------------------------------
# Validation and backend selection.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference"])
def test_bad_input_raises_clear_error(backend):
    with pytest.raises(ValueError, match=r"shape \[N, C\]; got a 1-D tensor of shape \(10,\)"):
        exit_confidence(torch.randn(10), backend=backend)
    with pytest.raises(ValueError, match=r"got a 3-D tensor of shape \(2, 3, 4\)"):
        exit_confidence(torch.randn(2, 3, 4), backend=backend)
    with pytest.raises(ValueError, match=r"at least one class \(C >= 1\); got logits of shape \(4, 0\)"):
        exit_confidence(torch.randn(4, 0), backend=backend)
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 and float64 logits; got torch.int64"):
        exit_confidence(torch.ones(4, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(TypeError, match=r"expects a torch.Tensor of logits, got list"):
        exit_confidence([[1.0, 2.0]], backend=backend)


def test_reference_backend_works_anywhere_and_needs_no_grad():
    logits = random_logits((6, 4), torch.float16, seed=17).requires_grad_()
    confidence, prediction = exit_confidence(logits, backend="reference")
    assert not confidence.requires_grad
    assert_matches_reference(logits.detach(), confidence, prediction)


def _spy_on_reference(monkeypatch):
    calls = []
    spec = exit_confidence_module.SPEC
    real_reference = spec.forms[FUNCTIONAL].reference

    def spy(logits):
        calls.append(logits.shape)
        return real_reference(logits)

    # The op dispatches through its spec, so the spy replaces the spec's reference.
    spied_form = dataclasses.replace(spec.forms[FUNCTIONAL], reference=spy)
    monkeypatch.setattr(exit_confidence_module, "SPEC", dataclasses.replace(spec, forms={FUNCTIONAL: spied_form}))
    return calls


def test_environment_variable_selects_backend(monkeypatch):
    calls = _spy_on_reference(monkeypatch)
    logits = random_logits((3, 5), torch.float32, seed=18)
    monkeypatch.setenv("RANET_FAST_BACKEND", "reference")
    assert _extension.resolve_backend("op", logits) == "reference"
    assert_matches_reference(logits, *exit_confidence(logits))
    assert calls == [logits.shape]

    monkeypatch.setenv("RANET_FAST_BACKEND", "auto")
    automatic = "cpu" if _extension.extension_loaded() else "reference"
    assert _extension.resolve_backend("op", logits) == automatic
    # The argument wins over the environment.
    monkeypatch.setenv("RANET_FAST_BACKEND", "cuda")
    assert _extension.resolve_backend("op", logits, "reference") == "reference"


def test_automatic_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("RANET_FAST_BACKEND", raising=False)
    calls = _spy_on_reference(monkeypatch)
    logits = random_logits((3, 5), torch.float32, seed=19)
    exit_confidence(logits)
    if _extension.extension_loaded():
        assert _extension.resolve_backend("op", logits) == "cpu"
        assert calls == []
    else:
        assert calls == [logits.shape]


def test_unavailable_backend_raises_and_says_why(monkeypatch):
    monkeypatch.delenv("RANET_FAST_BACKEND", raising=False)
    logits = random_logits((3, 5), torch.float32, seed=20)
    if not _extension.extension_loaded():
        expected_reason = r"_C not loaded"
    elif not _extension.extension_built_with_cuda():
        expected_reason = r"extension built without CUDA"
    else:
        expected_reason = r"the cuda backend runs on CUDA tensors, got a cpu tensor"
    with pytest.raises(_extension.BackendUnavailableError, match=rf"backend 'cuda' is unavailable .*{expected_reason}"):
        exit_confidence(logits, backend="cuda")
    monkeypatch.setenv("RANET_FAST_BACKEND", "cuda")
    with pytest.raises(_extension.BackendUnavailableError, match=expected_reason):
        exit_confidence(logits)


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    kernels = sys.modules.get("ranet_fast.kernels")
    if kernels is not None and kernels.INTERPRETED:
        pytest.skip("ranet_fast.kernels was already imported in interpreter mode by another test")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if _extension.triton_import_error() is not None:
        expected_reason = _extension.triton_import_error()
    else:
        expected_reason = "TRITON_INTERPRET=1"
    with pytest.raises(_extension.BackendUnavailableError, match=expected_reason):
        exit_confidence(torch.randn(2, 3), backend="triton")


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'gpu' \(from the backend argument\); choose one of cuda, triton, cpu, reference"):
        exit_confidence(torch.randn(2, 3), backend="gpu")
    monkeypatch.setenv("RANET_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"'fast' \(from the environment variable RANET_FAST_BACKEND\)"):
        exit_confidence(torch.randn(2, 3))


_NO_EXTENSION_SCRIPT = """
    import torch
    import ranet_fast
    from ranet_fast import _extension
    from ranet_fast.ops import exit_confidence, exit_confidence_reference

    assert not _extension.extension_loaded()
    assert "_C not loaded" in _extension.backend_status("cpu", "cpu")[1]
    logits = torch.randn(6, 11)
    assert _extension.resolve_backend("op", logits) == "reference"
    for got, expected in zip(exit_confidence(logits), exit_confidence_reference(logits)):
        assert torch.equal(got, expected)
    try:
        exit_confidence(logits, backend="cpu")
    except _extension.BackendUnavailableError as error:
        assert "_C not loaded" in str(error), error
    else:
        raise AssertionError("backend='cpu' should be unavailable")
    try:
        exit_confidence(logits, backend="triton")
    except _extension.BackendUnavailableError as error:
        assert "triton not installed" in str(error), error
    else:
        raise AssertionError("backend='triton' should be unavailable")
    from ranet_fast.env import format_report, environment_info
    report = format_report(environment_info())
    assert "_C not loaded" in report and "triton not installed" in report, report
    compiled = torch.compile(exit_confidence, fullgraph=True, backend="eager")
    assert torch.equal(compiled(logits)[1], logits.argmax(dim=1))
    print("fallback ok")
"""


def test_without_extension_or_triton_falls_back_to_reference():
    run_as_bare_install(_NO_EXTENSION_SCRIPT)
