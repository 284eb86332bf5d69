"""Every Triton kernel compiles for sm_90 (H100/H200) without a GPU, spills nothing, and its
half-precision dots run on tensor cores.

Each kernel module lists the variants its launcher can compile on CUDA tensors
(``specializations()``, see kernels/specializations.py): pointer element types, constexpr values
(tiles, flags, accumulation and index types), warps, 32- or 64-bit integer scalars, and integer
arguments specialised to 1. Their full product is thousands of compiles at about a second of CPU
each, so the test compiles a pairwise covering of each module's list: every value of every one of
those dimensions, and every pair of values of any two, appears in some compiled variant (each tile
with each dtype, each dtype with each index width, each flag with each of those, ...). The
covering is computed from the lists, so a new tile, flag or dtype in a launcher is compiled without
touching this file.

For each compiled variant:
- ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` succeeds (the interpreter
  accepts code the compiler refuses, such as a method call on an argument specialised to 1);
- ptxas (run by Triton with -v) reports no spill stores or loads, and the cuobjdump shipped in
  Triton's package reports no local memory in the cubin; the registers and stack frame it reports
  go to the report (a small stack frame without spills is the subroutine of a 64-bit division);
- a kernel that calls tl.dot, compiled for bfloat16 or float16 data, has a warpgroup (``wgmma``)
  or warp (``mma``) tensor-core instruction on that type in its PTX: the dots are native, not
  upcast to float32 (the upcast is for Triton's interpreter only, which computes bfloat16 dots
  wrongly); compiled for float32 data its PTX has a TF32 instruction exactly when the variant asks
  for TF32 (``Specialization.tf32``: fused_conv2d's float32 dots follow cuDNN's conv precision
  flag), and none otherwise (IEEE float32 products).

Compiles run in a pool of two fresh processes, each compile with an empty Triton cache of its
own, so nothing from an earlier compile or run is reused. RANET_FAST_SM90_REPORT=path writes every variant's
registers, stack bytes, tensor-core instructions and compile time as JSON.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torch

from ranet_fast import _extension

KERNEL_MODULES = ("exit_confidence", "exit_partition", "scatter_exits", "gather_rows", "fused_conv2d",
                  "upsample_concat", "batch_norm_relu")
WORKERS = 2
# A half-precision tensor-core product in PTX: wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
# or mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32.
_TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.\S*\.(bf16|f16)\b")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _module(name: str):
    return importlib.import_module(f"ranet_fast.kernels.{name}")


def _features(specialization) -> set:
    """The dimensions of a variant, as (kernel, dimension, value): a module's kernels are covered apart."""
    kernel = specialization.kernel.fn.__name__
    features = {("pointers", tuple(sorted(str(dtype) for dtype in specialization.pointers.values()))),
                ("num_warps", specialization.num_warps), ("wide", specialization.wide),
                ("ones", specialization.ones if specialization.ones_case is None else specialization.ones_case)}
    features.update((name, str(value)) for name, value in specialization.constexprs.items())
    return {(kernel, *feature) for feature in features}


def _pairs(specialization) -> set:
    return set(itertools.combinations(sorted(_features(specialization)), 2))


def _weight(specialization) -> int:
    """How many register bits a variant's types suggest: wider data, indices and integers first."""
    bits = sum(torch.tensor([], dtype=dtype).element_size() * 8 for dtype in specialization.pointers.values())
    wide_index = any(str(value) in ("int64", "triton.language.int64") for value in specialization.constexprs.values())
    return bits + 64 * wide_index + 32 * specialization.wide


def pairwise_covering(specializations) -> list[int]:
    """Indices of a subset in which every pair of values of any two dimensions of a kernel's variants
    occurs together (greedy: the variant covering the most new pairs, the heaviest types first among
    equals, so that spills show up).

    The lists run to tens of thousands of variants (fused_conv2d's activations and tiles), so the
    pairs are numbered and the greedy steps run on arrays: row i of ``pairs`` holds the numbers of
    variant i's pairs, padded with a number that counts as covered."""
    feature_numbers: dict = {}
    rows = [sorted(feature_numbers.setdefault(feature, len(feature_numbers)) for feature in _features(specialization))
            for specialization in specializations]
    padding = len(feature_numbers)  # the largest number, so it is always the second of a pair
    features = np.full((len(rows), max(map(len, rows))), padding, dtype=np.int64)
    for index, row in enumerate(rows):
        features[index, :len(row)] = row
    first, second = np.triu_indices(features.shape[1], 1)
    codes, pairs = np.unique(features[:, first] * (padding + 1) + features[:, second], return_inverse=True)
    pairs = pairs.reshape(len(rows), -1)
    uncovered = codes % (padding + 1) != padding
    weights = np.array([_weight(specialization) for specialization in specializations])
    order = -np.arange(len(rows))  # among equal gains and weights, the first variant
    chosen = []
    while uncovered.any():
        gains = uncovered[pairs].sum(axis=1)
        best = int(np.lexsort((order, weights, gains))[-1])
        chosen.append(best)
        uncovered[pairs[best]] = False
    return sorted(chosen)


def _worker_start(cache_root: str) -> None:
    # Every compile gets a fresh cache under cache_root: nothing from an earlier compile or run is reused.
    os.environ["RANET_FAST_SM90_CACHE_ROOT"] = cache_root
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def compile_for_sm90(module_name: str, index: int) -> dict:
    """Compiles variant ``index`` of a module's list for sm_90; returns what the checks need."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    specialization = _module(module_name).specializations()[index]
    # An empty cache for every compile: two variants that differ only in what Triton ignores (the
    # width of an integer specialised to 1) must both run ptxas, whose report the checks read.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=os.environ["RANET_FAST_SM90_CACHE_ROOT"])
    started = time.perf_counter()
    source = ASTSource(fn=specialization.kernel, signature=specialization.signature(),
                       constexprs=specialization.constants(), attrs=specialization.attributes())
    ptxas_log = io.StringIO()
    try:
        # Triton runs ptxas -v and, with TRITON_DUMP_PTXAS_LOG=1 (set in _worker_start), prints its report.
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=specialization.options())
    except Exception as error:  # reported as the test failure, with the variant's name
        return {"label": specialization.label(), "error": f"{type(error).__name__}: {error}"}
    seconds = time.perf_counter() - started
    spills = _SPILLS.search(ptxas_log.getvalue())
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    registers, stack, shared, local = map(int, _RESOURCES.search(usage).groups())
    ptx = compiled.asm["ptx"]
    data_types = {str(dtype) for dtype in specialization.pointers.values()}
    return {
        "label": specialization.label(),
        "kernel": specialization.kernel.fn.__name__,
        "registers": registers,
        "stack_bytes": stack,
        "local_bytes": local,
        "spill_bytes": None if spills is None else int(spills.group(1)) + int(spills.group(2)),
        "shared_bytes": shared,
        "uses_dot": "tl.dot(" in specialization.kernel.src,
        "half_data": bool(data_types & {"torch.bfloat16", "torch.float16"}),
        "float32_data": "torch.float32" in data_types and not data_types & {"torch.bfloat16", "torch.float16"},
        "tensor_core": sorted({match.group(0) for match in _TENSOR_CORE.finditer(ptx)}),
        "tf32": "tf32" in ptx,
        "tf32_requested": specialization.tf32,
        "seconds": round(seconds, 2),
    }


def _require_compiler():
    if _extension.triton_import_error() is not None:
        pytest.skip(_extension.triton_import_error())
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as error:
        pytest.skip(f"Triton without its CUDA backend: {error}")


@pytest.fixture(scope="module")
def compiled():
    """module name -> list of compile results of its pairwise covering."""
    _require_compiler()
    jobs = []
    for name in KERNEL_MODULES:
        specializations = _module(name).specializations()
        jobs += [(name, index) for index in pairwise_covering(specializations)]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as cache_root, concurrent.futures.ProcessPoolExecutor(
            WORKERS, mp_context=context, initializer=_worker_start, initargs=(cache_root,)) as pool:
        started = time.perf_counter()
        results = list(pool.map(compile_for_sm90, *zip(*jobs)))
        wall = time.perf_counter() - started
    by_module = {name: [] for name in KERNEL_MODULES}
    for (name, _), result in zip(jobs, results):
        by_module[name].append(result)
    report_path = os.environ.get("RANET_FAST_SM90_REPORT")
    if report_path:
        with open(report_path, "w") as report:
            json.dump({"wall_seconds": round(wall, 1), "modules": by_module}, report, indent=1)
    return by_module


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_variant_compiles_for_sm90_without_spilling(compiled, name):
    results = compiled[name]
    assert results
    errors = [f"{result['label']}: {result['error']}" for result in results if "error" in result]
    assert not errors, "\n".join(errors)
    unreported = [result["label"] for result in results if result["spill_bytes"] is None]
    assert not unreported, "no ptxas spill report for:\n" + "\n".join(unreported)
    spilling = [f"{result['label']}: {result['registers']} registers, {result['spill_bytes']} bytes of spill "
                f"stores and loads, {result['local_bytes']} bytes of local memory" for result in results
                if (result["spill_bytes"] or result["local_bytes"])]
    assert not spilling, "\n".join(spilling)


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_dots_use_tensor_cores_in_half_precision_and_the_asked_float32_precision(compiled, name):
    for result in compiled[name]:
        if result["uses_dot"] and result["half_data"]:
            assert result["tensor_core"], f"{result['label']}: no bf16/f16 wgmma or mma in the PTX"
        if result["uses_dot"] and result["float32_data"]:
            assert result["tf32"] == result["tf32_requested"], (
                f"{result['label']}: TF32 {'asked for but absent' if result['tf32_requested'] else 'used unasked'}")


def test_fused_conv2d_half_dots_are_checked(compiled):
    """The tensor-core check above has something to check: the half-precision conv variants."""
    checked = [result for result in compiled["fused_conv2d"] if result["uses_dot"] and result["half_data"]]
    assert {result["label"].split("[")[1].split("]")[0] for result in checked} >= {"bf16,fp32", "fp16,fp32"}
    float32 = [result for result in compiled["fused_conv2d"] if result["float32_data"]]
    assert {result["tf32_requested"] for result in float32} == {False, True}


def test_pairwise_covering():
    """The covering of each list holds every pair of values that the list holds."""
    _require_compiler()
    for name in KERNEL_MODULES:
        specializations = _module(name).specializations()
        assert len(specializations) == len({specialization.label() for specialization in specializations}), name
        chosen = pairwise_covering(specializations)
        every_pair = set().union(*map(_pairs, specializations))
        assert set().union(*(_pairs(specializations[index]) for index in chosen)) == every_pair, name
        assert len(chosen) <= len(specializations)
