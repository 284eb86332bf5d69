"""The throughput suite: ranet_fast against the eager model and torch.compile, one command.

    python -m benchmarks suite --configs cifar-c1 --batch 64 256 --workloads anytime early-exit train-step \\
        --json benchmarks/results/suite-cpu.json --plot benchmarks/results/suite-cpu
    ranet-bench suite --device cuda --dtype bf16 --channels-last --configs cifar-c1 cifar-c3 --batch 256 1024

Models are RANets from the repository's configurations (``--override KEY=VALUE`` changes a flag,
e.g. ``nChannels=4`` for a narrow model) with random weights from a fixed seed; throughput does
not depend on what the weights learned. Contenders, each built from the same weights:

* ``eager``: the RANet without fast layers, i.e. the official computation;
* ``ranet_fast``: ``ranet_fast.convert``-ed (fused layers);
* ``optimize``: ``ranet_fast.inference.optimize(model, x, cuda_graphs=False)``, the inference mode;
* ``optimize-graphs`` (CUDA only): the same with the CUDA-graph capture;
* ``compile`` / ``compile-max-autotune``: ``torch.compile`` of the eager model (default mode /
  ``mode="max-autotune"``), ``dynamic=False``.

Workloads: ``anytime`` (eval forward, all exits, under ``torch.no_grad``; optimize uses
``torch.inference_mode`` itself), ``early-exit`` (``ranet_fast.inference.early_exit`` at the
``--budgets`` values of the official schedule's p, thresholds calibrated with the eager model on
``--val-images`` other random images, and with every threshold +inf: the full network through the
engine; torch.compile is left out there: the engine runs stage by stage on shrinking batches, so
a compiled model would recompile for every batch size) and ``train-step`` (train mode: forward,
the sum of the exits' cross-entropy losses, backward, SGD step with the official momentum and
weight decay; the model is cast to ``--dtype``, no autocast; optimize is inference-only and left
out).

Figures per contender: images/s from the median of ``--repeats`` timed samples after
``--warmup`` calls (repeats interleave the contenders, so that a slow spell of a shared machine
hits all alike; a sample is as many calls as fill ``--min-time`` seconds; CUDA events on a GPU,
``time.perf_counter`` on a CPU); the ratio to eager and to the best torch.compile contender of the
same case; peak memory of one call above what was allocated before it (GPU:
``torch.cuda.max_memory_allocated``; CPU: the peak of the running sum of the CPU allocations and
frees torch.profiler records during the call, i.e. tensors from torch's allocator, not oneDNN's
scratch memory or the Python heap); first-call latency (building the contender — conversion,
``optimize``, graph capture, ``torch.compile`` — plus its first call; compilation caches are
switched off unless ``--compile-cache``); on a GPU the host-side kernel launches per call
(CUDA runtime/driver launch calls, a graph launch counting as one) and the GPU kernels that ran,
from torch.profiler. Before timing, every contender's result is checked against eager's (logits,
exits or the first step's loss): a fast wrong answer is no result. For ``ranet_fast``, each row's
``dispatch`` counts the measured dispatch's choices in one call: each fast layer's path
(``layer:<class>:fused|eager``) and each op's backend (``op:<op>:<backend>``).

Output: a table on the terminal, ``--json`` (environment, options, one row per contender and
case) and ``--plot DIR`` (PNG: images/s by batch size per contender for anytime and train-step;
budget in MFLOPs per image against images/s for early exit).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import ranet_fast
from ranet_fast import dispatch
from ranet_fast.inference import calibrate_thresholds, early_exit, exit_flops, optimize
from ranet_fast.models import PAPER_CONFIGS, RANet, ranet_config
from ranet_fast.models.configs import IMAGE_SIZES

from .common import (DTYPES, allow_recompiles, benchmark_parser, git_commit, provenance, seconds_per_call, synchronize,
                     write_json)

WORKLOADS = ("anytime", "early-exit", "train-step")
CONTENDERS = ("eager", "ranet_fast", "optimize", "optimize-graphs", "compile", "compile-max-autotune")
COMPILED = {"compile": "default", "compile-max-autotune": "max-autotune"}
# Which contenders each workload can run (see the module docstring for why the others are out).
APPLICABLE = {
    "anytime": set(CONTENDERS),
    "early-exit": {"eager", "ranet_fast", "optimize", "optimize-graphs"},
    "train-step": {"eager", "ranet_fast", "compile", "compile-max-autotune"},
}
DEFAULT_BUDGETS = (0.25, 0.5, 1.0, 1.5)
# The official trainer's SGD settings (lr does not change the work, only the weights' drift).
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
# Host-side CUDA calls that put work on the GPU: kernel launches (runtime and driver API, which
# Triton uses), graph launches, and the copies and fills the caching allocator's users issue.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")


# ---------------------------------------------------------------------------
# Measuring one callable
# ---------------------------------------------------------------------------


def peak_memory(fn, device: torch.device) -> tuple[int, int | None]:
    """(peak bytes allocated during one call above those allocated before it, absolute peak or None)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak - before, peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, None


def launches(fn, device: torch.device) -> dict | None:
    """Host-side launch calls and GPU kernels of one call (GPU only), from torch.profiler."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    return {"launch_calls": sum(1 for e in events if e.name in LAUNCH_CALLS),
            "gpu_kernels": sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)}


# ---------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def compile_caches(enabled: bool):
    """Inductor's on-disk caches on or off (off: the first-call latency is a real compilation)."""
    import torch._inductor.config as inductor_config

    names = [name for name in ("fx_graph_cache", "autotune_local_cache") if hasattr(inductor_config, name)]
    with inductor_config.patch({name: enabled for name in names}):
        yield


def build_model(config: str, overrides: dict, device, dtype, channels_last: bool) -> RANet:
    torch.manual_seed(0)
    model = RANet(ranet_config(config, **overrides)).to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_inference(name: str, base: RANet, x: torch.Tensor):
    """(the model the workload calls, whether the call runs under no_grad) for an eval contender."""
    if name == "eager":
        return copy.deepcopy(base).eval(), True
    if name == "ranet_fast":
        return ranet_fast.convert(copy.deepcopy(base)).eval(), True
    if name in ("optimize", "optimize-graphs"):
        return optimize(base, x, cuda_graphs=name == "optimize-graphs"), False
    return torch.compile(copy.deepcopy(base).eval(), mode=COMPILED[name], dynamic=False), True


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, expected))


def tolerance(dtype: torch.dtype) -> float:
    # fp32: TF32 convolutions on a GPU and other summation orders (1e-5 on a CPU, measured < 3e-6).
    return {torch.float32: 1e-2, torch.float64: 1e-8}.get(dtype, 1e-1)


# ---------------------------------------------------------------------------
# Workloads: each returns {case name: callable} per contender plus its check
# ---------------------------------------------------------------------------


class Case:
    """One timed thing of one contender (a workload at one batch size, budget, ...)."""

    def __init__(self, contender: str, fn, info: dict):
        self.contender, self.fn, self.info = contender, fn, info
        self.samples: list[float] = []
        self.calls = 1


def anytime_cases(names, base, x, options, device):
    cases, checks = [], {}
    with torch.no_grad():
        expected = copy.deepcopy(base).eval()(x)
    for name in names:
        begin = time.perf_counter()
        model, no_grad = make_inference(name, base, x)

        def call(model=model, no_grad=no_grad):
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                return model(x)

        got = call()
        synchronize(device)
        first = time.perf_counter() - begin
        error = relative_error(got, expected)
        checks[name] = error
        cases.append(Case(name, call, {"first_call_s": first, "max_relative_error": error,
                                       **dispatch_choices(name, call)}))
    return cases, checks


def early_exit_cases(names, base, x, options, device):
    size = x.shape[-1]
    eager = copy.deepcopy(base).eval()
    flops = exit_flops(eager, (size, size))
    generator = torch.Generator().manual_seed(1)
    batch = x.shape[0]
    val = torch.randn(max(options.val_images, batch), *x.shape[1:], generator=generator)
    val = val.to(device=device, dtype=x.dtype).contiguous(memory_format=_format(x))
    with torch.no_grad():
        val_logits = torch.cat([torch.stack(eager(chunk)).float().cpu() for chunk in val.split(batch)], dim=1)
    budgets = [(p, calibrate_thresholds(val_logits, flops, p=p).thresholds) for p in options.budgets]
    budgets.append((None, [math.inf] * eager.num_exits))  # the full network through the engine
    expected = {p: early_exit(eager, x, thresholds, flops=flops) for p, thresholds in budgets}
    cases, checks = [], {}
    for name in names:
        begin = time.perf_counter()
        model, _ = make_inference(name, base, x)
        results = {p: early_exit(model, x, thresholds, flops=flops) for p, thresholds in budgets}
        synchronize(device)
        first = (time.perf_counter() - begin) / len(budgets)
        agree = min(float((results[p].exit_index == expected[p].exit_index).float().mean()) for p, _ in budgets)
        checks[name] = 1.0 - agree
        for p, thresholds in budgets:
            result = results[p]
            cases.append(Case(name, lambda model=model, t=thresholds: early_exit(model, x, t, count_flops_spent=False),
                              {"p": p, "first_call_s": first if p == budgets[0][0] else None,
                               "exit_counts": result.exit_counts, "flops_per_image": result.flops_per_image,
                               "mflops_per_image": result.flops_per_image / 1e6,
                               "exits_differing_from_eager": float((result.exit_index != expected[p].exit_index)
                                                                   .float().mean())}))
    return cases, checks


def train_cases(names, base, x, options, device):
    generator = torch.Generator().manual_seed(2)
    targets = torch.randint(0, base.classifier[0].linear.out_features, (x.shape[0],), generator=generator).to(device)
    cases, checks, first_losses = [], {}, {}
    for name in ["eager"] + [n for n in names if n != "eager"]:
        begin = time.perf_counter()
        model = copy.deepcopy(base).train()
        if name == "ranet_fast":
            ranet_fast.convert(model)
        optimizer = torch.optim.SGD(model.parameters(), **SGD)
        run = torch.compile(model, mode=COMPILED[name], dynamic=False) if name in COMPILED else model

        def step(run=run, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss = sum(F.cross_entropy(logits, targets) for logits in run(x))
            loss.backward()
            optimizer.step()
            return loss.detach()

        loss = float(step())
        synchronize(device)
        first = time.perf_counter() - begin
        first_losses[name] = loss
        error = abs(loss - first_losses["eager"]) / abs(first_losses["eager"])
        if name in names:
            checks[name] = error
            cases.append(Case(name, step, {"first_call_s": first, "first_loss": loss,
                                           "first_loss_relative_error": error, **dispatch_choices(name, step)}))
    return cases, checks


def dispatch_choices(name: str, call) -> dict:
    """For the ranet_fast contender: what the measured dispatch chose in one more call (after the first,
    which measured), as {"dispatch": {"layer:<class>:<path>" or "op:<op>:<backend>": calls}}."""
    if name != "ranet_fast":
        return {}
    with dispatch.recording() as record:
        call()
    counts: dict[str, int] = {}
    for kind, key, choice in record:
        counts[f"{kind}:{key[0]}:{choice}"] = counts.get(f"{kind}:{key[0]}:{choice}", 0) + 1
    return {"dispatch": dict(sorted(counts.items()))}


WORKLOAD_CASES = {"anytime": anytime_cases, "early-exit": early_exit_cases, "train-step": train_cases}


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


# ---------------------------------------------------------------------------
# One configuration and batch size
# ---------------------------------------------------------------------------


def run_workload(workload: str, config: str, batch: int, options, device, dtype) -> list[dict]:
    names = [n for n in options.contenders if n in APPLICABLE[workload]]
    if not names:
        return []
    torch._dynamo.reset()  # compiled contenders of earlier cases are gone; each compiles afresh
    base = build_model(config, options.override, device, dtype, options.channels_last)
    size = IMAGE_SIZES[base_data(config, options.override)]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    x = x.to(device=device, dtype=dtype)
    if options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with compile_caches(options.compile_cache):
        cases, checks = WORKLOAD_CASES[workload](names, base, x, options, device)
    limit = 0.01 if workload == "early-exit" else tolerance(dtype)  # early exit: share of exits that differ
    wrong = {name: error for name, error in checks.items() if not error <= limit}
    if wrong:
        raise RuntimeError(f"{workload} {config} batch {batch}: results differ from eager beyond {limit}: {wrong}")

    for case in cases:  # warm-up, and how many calls fill one sample
        for _ in range(options.warmup):
            case.fn()
        single = seconds_per_call(case.fn, 1, device)
        case.calls = max(1, min(1000, math.ceil(options.min_time / max(single, 1e-9))))
    for _ in range(options.repeats):
        for case in cases:
            case.samples.append(seconds_per_call(case.fn, case.calls, device))
    rows = []
    for case in cases:
        extra, total = peak_memory(case.fn, device)
        seconds = statistics.median(case.samples)
        rows.append({"workload": workload, "config": config, "batch": batch, "contender": case.contender,
                     **case.info, "seconds_per_call": seconds, "samples_s": case.samples, "calls_per_sample": case.calls,
                     "images_per_s": batch / seconds, "peak_memory_bytes": extra, "peak_memory_total_bytes": total,
                     "launches": launches(case.fn, device)})
    add_ratios(rows)
    return rows


def base_data(config: str, overrides: dict) -> str:
    return overrides.get("data", PAPER_CONFIGS[config]["data"])


def add_ratios(rows: list[dict]) -> None:
    """Each row's images/s relative to eager's and to the best torch.compile contender's of the same case."""
    def key(row):
        return row["workload"], row["config"], row["batch"], row.get("p")

    cases: dict[tuple, dict[str, float]] = {}
    for row in rows:
        cases.setdefault(key(row), {})[row["contender"]] = row["images_per_s"]
    for row in rows:
        speeds = cases[key(row)]
        compiled = [speeds[name] for name in COMPILED if name in speeds]
        row["vs_eager"] = row["images_per_s"] / speeds["eager"] if "eager" in speeds else None
        row["vs_best_compile"] = row["images_per_s"] / max(compiled) if compiled else None


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def print_rows(rows: list[dict]) -> None:
    print(f"{'workload':<10} {'config':<10} {'batch':>5} {'p':>5} {'contender':<21} {'img/s':>9} {'vs eager':>8} "
          f"{'vs comp':>8} {'peak MiB':>9} {'1st call':>9} {'launches':>9}")
    for row in rows:
        p = row.get("p", "")
        p = "full" if p is None else (f"{p:.2f}" if p != "" else "")
        first = f"{row['first_call_s']:.2f}s" if row.get("first_call_s") is not None else ""
        launched = str(row["launches"]["launch_calls"]) if row["launches"] else "-"
        print(f"{row['workload']:<10} {row['config']:<10} {row['batch']:>5} {p:>5} {row['contender']:<21} "
              f"{row['images_per_s']:>9.1f} {_ratio(row['vs_eager']):>8} {_ratio(row['vs_best_compile']):>8} "
              f"{row['peak_memory_bytes'] / 2**20:>9.1f} {first:>9} {launched:>9}", flush=True)


def save_figure(plt, figure, axes, path: str) -> str:
    """Adds the legend and grid every figure has, writes ``path`` and closes the figure."""
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot(rows: list[dict], directory: str) -> list[str]:
    """PNG figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    for workload in ("anytime", "train-step"):
        for config in sorted({r["config"] for r in rows if r["workload"] == workload}):
            selected = [r for r in rows if r["workload"] == workload and r["config"] == config]
            figure, axes = plt.subplots(figsize=(6, 4))
            for contender in dict.fromkeys(r["contender"] for r in selected):
                points = sorted((r["batch"], r["images_per_s"]) for r in selected if r["contender"] == contender)
                axes.plot(*zip(*points), marker="o", label=contender)
            axes.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images/s",
                     title=f"{config} {workload}")
            paths.append(save_figure(plt, figure, axes, os.path.join(directory, f"{workload}-{config}.png")))
    early = [r for r in rows if r["workload"] == "early-exit"]
    for config, batch in sorted({(r["config"], r["batch"]) for r in early}):
        selected = [r for r in early if r["config"] == config and r["batch"] == batch]
        figure, axes = plt.subplots(figsize=(6, 4))
        for contender in dict.fromkeys(r["contender"] for r in selected):
            points = sorted((r["mflops_per_image"], r["images_per_s"]) for r in selected if r["contender"] == contender)
            axes.plot(*zip(*points), marker="o", label=contender)
        axes.set(yscale="log", xlabel="MFLOPs per image spent (budget)", ylabel="images/s",
                 title=f"{config} real early exit, batch {batch}")
        paths.append(save_figure(plt, figure, axes, os.path.join(directory, f"early-exit-{config}-b{batch}.png")))
    return paths


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--override expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def parse_args(argv=None):
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--configs", nargs="+", default=["cifar-c1"], choices=list(PAPER_CONFIGS))
    parser.add_argument("--override", nargs="*", type=parse_override, default=[], metavar="KEY=VALUE",
                        help="change a configuration flag, e.g. nChannels=4 growthRate=4 step=2 (a narrow model)")
    parser.add_argument("--batch", nargs="+", type=int, default=[64])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS),
                        help="default: all that the device runs")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                        help="early exit: values of the official schedule's p (exit fractions ~ p^k)")
    parser.add_argument("--val-images", type=int, default=512, help="early exit: random images for the calibration")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="calls before timing (after the first call)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="keep inductor's on-disk caches (the first-call latency may then skip compilation)")
    parser.add_argument("--json", help="write the results (with the environment) to this file")
    parser.add_argument("--plot", metavar="DIR", help="write PNG figures into this directory")
    options = parser.parse_args(argv)
    options.override = dict(options.override)
    if options.contenders is None:
        options.contenders = [n for n in CONTENDERS if n != "optimize-graphs" or options.device == "cuda"]
    if "optimize-graphs" in options.contenders and options.device != "cuda":
        parser.error("the optimize-graphs contender needs --device cuda")
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    if options.repeats < 1 or options.warmup < 0 or min(options.batch) < 1:
        parser.error("--repeats and --batch must be at least 1, --warmup at least 0")
    return options


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    allow_recompiles()  # each configuration and batch size compiles anew
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    commit = git_commit()  # now: the checkout may move while a long run goes on
    rows = []
    for workload in options.workloads:
        for config in options.configs:
            for batch in options.batch:
                new = run_workload(workload, config, batch, options, device, dtype)
                print_rows(new)
                rows.extend(new)
                # Written after every case, so a run stopped by a deadline keeps what it measured.
                write_json(options.json, result_record(options, commit, device, rows, complete=False))
    result = result_record(options, commit, device, rows, complete=True)
    if options.plot:
        result["plots"] = plot(rows, options.plot)
    write_json(options.json, result)
    return result


def result_record(options, commit, device, rows, complete: bool) -> dict:
    return {**provenance("suite", commit), "complete": complete, "device": str(device), "device_name": device_name(device),
              "dtype": options.dtype,
              "layout": "channels_last" if options.channels_last else "nchw",
              "memory_method": ("torch.cuda.max_memory_allocated during one call minus memory_allocated before it"
                                if device.type == "cuda" else
                                "peak of the running sum of torch.profiler's CPU allocation events during one call "
                                "(torch's allocator only)"),
              "options": {k: v for k, v in vars(options).items() if k not in ("json", "plot")},
              "rows": rows}
