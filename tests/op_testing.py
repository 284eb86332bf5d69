"""What the op tests share: which backends run here, seeds, tolerances by dtype, graph recording.

The backends an op test runs on are named once here (``backends``) with the reason each one skips;
tests/conftest.py parametrizes every test taking ``backend_and_device`` over its module's
``BACKENDS`` and every test taking ``device`` over the CPU and, where there is one, the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from ranet_fast import _extension
from cuda_testing import NO_CUDA_GPU

HAS_GPU = torch.cuda.is_available()
NO_EXTENSION = f"ranet_fast._C not loaded: {_extension.extension_import_error()}"
needs_extension = pytest.mark.skipif(not _extension.extension_loaded(), reason=NO_EXTENSION)
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason=NO_CUDA_GPU)
_needs_cuda_extension = pytest.mark.skipif(
    not (HAS_GPU and _extension.extension_built_with_cuda()),
    reason=NO_CUDA_GPU if not HAS_GPU else "extension built without CUDA",
)
# Without a GPU the reason must be the GPU (the skip policy in conftest.py), whatever Triton's state.
_needs_triton_on_gpu = pytest.mark.skipif(
    not HAS_GPU or _extension.triton_import_error() is not None,
    reason=NO_CUDA_GPU if not HAS_GPU else str(_extension.triton_import_error()),
)

# id -> ((backend, device), marks): every way an op runs in this process.
_BACKENDS = {
    "reference": (("reference", "cpu"), ()),
    "cpu-extension": (("cpu", "cpu"), (needs_extension,)),
    "cuda-extension": (("cuda", "cuda"), (_needs_cuda_extension,)),
    "reference-cuda": (("reference", "cuda"), (needs_gpu,)),
    "triton-gpu": (("triton", "cuda"), (_needs_triton_on_gpu,)),
}
# The backends whose in-process tests have no Triton twin: Triton runs the same checks under the
# interpreter and on the GPU from the op's *_triton test module.
COMPILED_AND_REFERENCE = ("cpu-extension", "reference", "cuda-extension")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_gpu)]


def backends(*ids: str) -> list:
    """pytest parameters ``(backend, device)`` for the named ways of running an op, with their skips."""
    return [pytest.param(_BACKENDS[name][0], id=name, marks=_BACKENDS[name][1]) for name in ids]


def seed_of(*things) -> int:
    """A seed that differs between test cases and is the same on every run."""
    return zlib.crc32(repr(things).encode())


# Bounds on a result against its float64 reference, by the dtype the op computed in: float32
# accumulation over the few hundred terms of these tests stays within 1e-5 relative; half types
# round the result once (8 bits of mantissa for bfloat16, 11 for float16, so 1e-2 covers both with
# room for the accumulation); float64 leaves only accumulation order, ~1e-15 per term.
TOLERANCE_BY_DTYPE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def compile_recording_ops(function, **compile_options):
    """``(compiled function, graph_ops)``: ``torch.compile(function, fullgraph=True)`` with a backend
    that runs the captured graph eagerly and records each called op in ``graph_ops`` as "ns.op" (Dynamo
    records an op as its packet or as its ".default" overload; the overload is dropped)."""
    graph_ops: set[str] = set()

    def recording_backend(graph_module, example_inputs):
        graph_ops.update(str(node.target).removesuffix(".default") for node in graph_module.graph.nodes
                         if node.op == "call_function")
        return graph_module.forward

    return torch.compile(function, fullgraph=True, backend=recording_backend, **compile_options), graph_ops


_BARE_INSTALL = """
import sys
# A bare install: "import ranet_fast._C" and "import triton" both fail.
sys.modules["ranet_fast._C"] = None
sys.modules["triton"] = None
"""


def run_as_bare_install(script: str) -> None:
    """Runs ``script`` in a fresh interpreter where neither ranet_fast._C nor Triton imports and
    RANET_FAST_BACKEND is unset; it must exit 0 having printed "fallback ok"."""
    environment = dict(os.environ)
    environment.pop("RANET_FAST_BACKEND", None)
    completed = subprocess.run([sys.executable, "-c", _BARE_INSTALL + textwrap.dedent(script)], env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "fallback ok" in completed.stdout
