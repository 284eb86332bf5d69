"""What every benchmark shares: the command-line options, timing, the run's provenance and the JSON file.

Every benchmark module has ``main(argv) -> dict``; ``python -m benchmarks NAME`` (installed:
``ranet-bench NAME``) runs it. The per-op and model-level benchmarks take the options of
``add_run_arguments``, time their contenders with ``interleaved_medians`` and start their result
record with ``provenance``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess

import torch
from torch.utils import benchmark as tbench

from ranet_fast import _extension
from ranet_fast.dispatch import seconds_per_call  # noqa: F401 (the benchmarks time with it too)
from ranet_fast.env import environment_info
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.configs import IMAGE_SIZES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def add_run_arguments(parser: argparse.ArgumentParser, repeats: int = 5, min_run_time: float = 0.2,
                      layout: bool = True) -> None:
    """The options every side-by-side benchmark takes: where and how it runs, and where the JSON goes.

    ``layout``: whether the benchmark has image tensors, whose memory format --layout chooses.
    """
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    if layout:
        parser.add_argument("--layout", choices=list(MEMORY_FORMATS), default="nchw")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--min-run-time", type=float, default=min_run_time, help="seconds per measurement")
    parser.add_argument("--json", help="write the results (with the environment) to this file")


def distinct_shapes(configs, shapes_of, max_shapes: int | None = None):
    """(config, shape) for every shape ``shapes_of(config)`` records, each shape once, at most ``max_shapes``.

    Configurations share many layer shapes; each is timed once, under the first that has it.
    """
    seen = set()
    for config in configs:
        for shape in shapes_of(config):
            if shape in seen or len(seen) == max_shapes:
                continue
            seen.add(shape)
            yield config, shape


def add_model_arguments(parser: argparse.ArgumentParser, configs, batch, compile_option: bool = True,
                        max_shapes_option: bool = False) -> None:
    """The options of the benchmarks that time RANet's own layer shapes: which models, which batches."""
    parser.add_argument("--configs", nargs="+", default=list(configs), help="RANet configurations")
    parser.add_argument("--batch", nargs="+", type=int, default=list(batch))
    if compile_option:
        parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    if max_shapes_option:
        parser.add_argument("--max-shapes", type=int, help="time only the first this many distinct shapes")


def benchmark_parser(module_name: str, docstring: str) -> argparse.ArgumentParser:
    """An argument parser named as the CLI calls the benchmark (``python -m benchmarks NAME``).

    ``module_name``: the module's ``__spec__.name``, which (unlike ``__name__``) stays the module's
    own under ``python -m benchmarks.NAME``.
    """
    return argparse.ArgumentParser(prog=f"python -m benchmarks {module_name.rpartition('.')[2]}",
                                   description=docstring, formatter_class=argparse.RawDescriptionHelpFormatter)


def interleaved_samples(contenders: dict, repeats: int, min_run_time: float) -> dict:
    """Seconds per call of each contender in each of ``repeats`` rounds, each round timing all in turn.

    Interleaving the contenders makes a slow spell of a shared machine hit every one of them alike;
    every other round runs them in reverse order, so that none always comes first (after another
    contender has filled the caches with its own data) or last.
    Each measurement is torch.utils.benchmark's blocked_autorange (which synchronises CUDA).
    """
    timers = {name: tbench.Timer(stmt="fn()", globals={"fn": fn}) for name, fn in contenders.items()}
    samples: dict = {name: [] for name in contenders}
    for round_index in range(repeats):
        order = list(timers.items())
        for name, timer in order if round_index % 2 == 0 else reversed(order):
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return samples


def interleaved_medians(contenders: dict, repeats: int, min_run_time: float) -> dict:
    """Median seconds per call of each contender over the rounds of :func:`interleaved_samples`."""
    return {name: statistics.median(values)
            for name, values in interleaved_samples(contenders, repeats, min_run_time).items()}


def paired_ratio(samples: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator``'s time over ``denominator``'s in the same round.

    Pairing by round cancels what a round shares (a slow spell of the machine), which the ratio of
    two separate medians does not.
    """
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator], strict=True))


def backends_here(device: torch.device, triton_module: str | None = None) -> list[str]:
    """The op backends that can run on ``device`` here, fastest kind first ("reference" always can).

    ``triton_module``: the module of ranet_fast.kernels the op's Triton backend needs.
    """
    return [name for name in _extension.BACKENDS if _extension.backend_status(name, device, triton_module)[0]]


def run_logits_op(benchmark: str, docstring: str, argv, triton_module: str, op_case, add_arguments=None,
                  contenders=None) -> dict:
    """The main() of an exit op's benchmark: every backend that runs here against the op's reference.

    Inputs are random [N, C] logits for each N of --rows (the samples still running at an exit)
    and C of --classes (the classes of CIFAR-10, CIFAR-100 and ImageNet heads), scaled so that
    the confidences spread over (0, 1) for every C. ``op_case(logits, options)`` returns
    ``(call, check)``: ``call(backend)`` runs the op once and returns its outputs, ``check(got,
    expected)`` raises when a backend's outputs differ from the reference backend's: a fast wrong
    answer is no result. ``add_arguments(parser)`` adds the benchmark's own options;
    ``contenders(backends, options)``, where given, names what is timed instead of the backends (each
    name one that ``call`` accepts; "reference" among them).
    """
    parser = benchmark_parser(benchmark, docstring)
    parser.add_argument("--rows", nargs="+", type=int, default=[64, 1024, 16384], help="N, samples at the exit")
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000], help="C, classes of the head")
    add_run_arguments(parser, layout=False)
    if add_arguments is not None:
        add_arguments(parser)
    options = parser.parse_args(argv)
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    backends = backends_here(device, triton_module)
    if contenders is not None:
        backends = contenders(backends, options)
    print(f"{'N':>6} {'C':>5} " + " ".join(f"{name:>12}" for name in backends) + "  speed-up vs reference")
    rows = []
    for num_rows in options.rows:
        for num_classes in options.classes:
            logits = (torch.randn(num_rows, num_classes, generator=torch.Generator().manual_seed(0)) * 4).to(
                device, dtype)
            call, check = op_case(logits, options)
            expected = call("reference")
            for backend in backends:
                check(call(backend), expected)  # also the warm-up (Triton compilation)
            seconds = interleaved_medians({backend: (lambda backend=backend: call(backend)) for backend in backends},
                                          options.repeats, options.min_run_time)
            speedups = {name: seconds["reference"] / value for name, value in seconds.items() if name != "reference"}
            rows.append({"num_rows": num_rows, "num_classes": num_classes, "seconds": seconds,
                         "speedup_vs_reference": speedups})
            print(f"{num_rows:>6} {num_classes:>5} " + " ".join(f"{seconds[n] * 1e6:>10.1f}us" for n in backends)
                  + "  " + ", ".join(f"{name} {value:.2f}x" for name, value in speedups.items()), flush=True)
    result = {**provenance(benchmark), "device": str(device), "dtype": options.dtype, "backends": backends,
              "options": {name: value for name, value in vars(options).items() if name != "json"}, "rows": rows}
    write_json(options.json, result)
    return result


def allow_recompiles() -> None:
    """Raises dynamo's recompile limit for benchmarks that compile one function for many shapes.

    Every shape is its own specialisation (``dynamic=False``); past the limit (8 by default) a
    compiled contender would silently run eager.
    """
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, 4096)


def forward_with_hooks(config: str, hooks, train: bool = False, batch: int = 1) -> None:
    """One forward of a fresh RANet ``config`` on ``batch`` blank images, with forward hooks attached.

    ``hooks(model)`` returns the (module, hook) pairs to attach: the per-op benchmarks record the
    shapes of RANet's own layers this way. Train mode needs ``batch`` > 1 (a BatchNorm needs more
    than one value per channel).
    """
    args = ranet_config(config)
    model = RANet(args).train(train)
    handles = [module.register_forward_hook(hook) for module, hook in hooks(model)]
    size = IMAGE_SIZES[args.data]
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()


def median_seconds(fn, repeats: int, min_run_time: float) -> float:
    """Median over ``repeats`` torch.utils.benchmark measurements (each synchronises CUDA)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
    return statistics.median(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            "commit": git_commit() if commit is None else commit, "torch_threads": torch.get_num_threads(),
            "environment": environment_info()}


def write_json(path: str | None, result: dict) -> None:
    if path:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
