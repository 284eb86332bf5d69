"""The Triton backend of fused_conv2d (kernels/fused_conv2d.py) against the float64 reference.

The checks are tests/test_fused_conv2d.py's, run with backend="triton". On CPU they run under
the Triton interpreter in a subprocess: Triton fixes interpreter mode when a kernel module is
imported, so setting TRITON_INTERPRET=1 here would depend on import order and switch every other
test's kernels too. The subprocess runs every check once and reports each one's outcome; on a GPU
the same checks run in process (compiled kernels, bfloat16 dots on tensor cores).
"""

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

import test_fused_conv2d as checks
from ranet_fast import _extension
from cuda_testing import NO_CUDA_GPU
from triton_interpreter import int64_indices

TESTS_DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def _forward_checks():
    # Every case in float32 and float64; the half types on a few (the interpreter is slow).
    named = {}
    for name, case in checks.CASES.items():
        for dtype in (torch.float32, torch.float64):
            named[f"forward-{name}-{dtype}"] = (checks.check_forward, case, dtype)
    for name in ("3x3-down-odd", "1x1-prologue", "wide"):
        for dtype in (torch.float16, torch.bfloat16):
            named[f"forward-{name}-{dtype}"] = (checks.check_forward, checks.CASES[name], dtype)
    return named


def named_checks():
    """name -> (check function, extra arguments after (backend, device))."""
    named = _forward_checks()
    for layout in checks.INPUT_LAYOUTS:
        named[f"input-{layout}"] = (checks.check_input_layout, layout, "3x3-prologue-down")
    named["input-prefix_nchw-1x1"] = (checks.check_input_layout, "prefix_nchw", "1x1-bottleneck")
    for layout in checks.OUT_LAYOUTS:
        named[f"out-{layout}"] = (checks.check_out_slice, layout, "3x3-down-odd")
    named["dense-block-float32"] = (checks.check_dense_block_in_place, torch.float32)
    named["dense-block-bfloat16"] = (checks.check_dense_block_in_place, torch.bfloat16)
    for batch in (0, 1):
        named[f"batch-{batch}"] = (checks.check_small_batches, batch)
    named["gradients"] = (checks.check_gradients, "3x3-prologue-down")
    named["gradcheck"] = (checks.check_gradcheck,)
    named["opcheck"] = (check_opcheck,)
    named["compile-fullgraph"] = (check_compile_fullgraph,)
    named["forward-multi-tile-bfloat16"] = (checks.check_forward, checks.CASES["multi-tile"], torch.bfloat16)
    named["out-slice-multi-tile"] = (checks.check_out_slice, "slice", "multi-tile")
    # The 64-bit index variant, forced on small tensors.
    int64_checks = {
        "forward-3x3-down-odd": (checks.check_forward, checks.CASES["3x3-down-odd"], torch.float32),
        "input-prefix_channels_last": (checks.check_input_layout, "prefix_channels_last", "3x3-prologue-down"),
        "out-strided": (checks.check_out_slice, "strided", "3x3-down-odd"),
        "out-slice-multi-tile-bfloat16": (checks.check_out_slice, "channels_last", "multi-tile", torch.bfloat16),
    }
    for name, (function, *arguments) in int64_checks.items():
        named[f"int64-index-{name}"] = (check_with_int64_indices, function, *arguments)
    return named


def check_with_int64_indices(backend, device, function, *arguments):
    from ranet_fast.kernels import fused_conv2d as kernels

    with int64_indices(kernels, "_fused_conv2d_kernel"):
        function(backend, device, *arguments)


def check_opcheck(backend, device):
    functional, out_arguments = checks.opcheck_arguments(device)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_triton.default, functional)
    torch.library.opcheck(torch.ops.ranet_fast.fused_conv2d_triton_out.default, out_arguments)


def check_compile_fullgraph(backend, device):
    from ranet_fast.ops import fused_conv2d

    graph_ops = []

    def recording_backend(graph_module, example_inputs):
        graph_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def layer(x, weight, scale):
        return fused_conv2d(x, weight, padding=1, epilogue_scale=scale, relu=True, backend=backend) * 2

    x, weight, vectors = checks.CASES["3x3-normal"].tensors(torch.float32, device, 8)
    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
    assert torch.equal(compiled(x, weight, vectors["epilogue_scale"]), layer(x, weight, vectors["epilogue_scale"]))
    assert any(op.removesuffix(".default") == "ranet_fast.fused_conv2d_triton" for op in graph_ops), graph_ops


def run_all(device):
    """Runs every check; returns name -> "ok" or the traceback."""
    report = {}
    for name, (function, *arguments) in named_checks().items():
        try:
            function("triton", device, *arguments)
            report[name] = "ok"
        except Exception:
            report[name] = traceback.format_exc()
    return report


@pytest.fixture(scope="module")
def interpreter_report():
    if _extension.triton_import_error() is not None:
        pytest.skip(_extension.triton_import_error())
    environment = dict(os.environ, TRITON_INTERPRET="1")
    environment.pop("RANET_FAST_BACKEND", None)
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {TESTS_DIRECTORY!r})\n"
        "import test_fused_conv2d_triton as t\n"
        "print(json.dumps(t.run_all('cpu')))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                               timeout=600, cwd=TESTS_DIRECTORY)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(named_checks()))
def test_triton_under_interpreter(interpreter_report, name):
    assert interpreter_report[name] == "ok", interpreter_report[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_GPU)
@pytest.mark.parametrize("name", list(named_checks()))
def test_triton_on_gpu(name):
    function, *arguments = named_checks()[name]
    function("triton", "cuda", *arguments)
