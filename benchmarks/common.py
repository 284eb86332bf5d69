"""What every benchmark script shares: dtype names, timing, the run's provenance and the JSON file."""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import time

import torch
from torch.utils import benchmark as tbench

from ranet_fast.env import environment_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_seconds(fn, repeats: int, min_run_time: float) -> float:
    """Median over ``repeats`` torch.utils.benchmark measurements (each synchronises CUDA)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
    return statistics.median(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, calls: int, device: torch.device) -> float:
    """Mean seconds of ``calls`` back-to-back calls: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def git_commit() -> str | None:
    """The checkout's commit (with '-dirty' for uncommitted changes), or None outside git."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def provenance(benchmark: str, commit: str | None = None) -> dict:
    """The fields every result file starts with: what ran, when, on which commit and software stack.

    Pass ``commit`` when it was read at the start of a long run (the checkout may move meanwhile).
    """
    return {"benchmark": benchmark, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git_commit() if commit is None else commit, "environment": environment_info()}


def write_json(path: str | None, result: dict) -> None:
    if path:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
