"""Real early exit vs the plain forward: is the time FLOPs promise saved, and what does an exit cost?

    python -m benchmarks early_exit --json benchmarks/results/early_exit-cpu.json   # the sweep
    python -m benchmarks early_exit --quick                                          # a smoke test
    python -m benchmarks early_exit --configs cifar-c1 --batch 256 --device cuda --dtype bf16 \
        --host-syncs per_exit once

The sweep covers the demo's model (``ranet_fast.demo``), C-1, C-3 and ImageNet-1 at 160x160 (the
smallest side its exits accept), each at batch 1, 16, 64 and 256 (ImageNet-1: 1, 16, 64; at 256
one forward takes most of a minute on 2 CPU cores), and budgets p (the official schedule's
parameter). Each model is ``ranet_fast.convert``-ed with random weights from a fixed seed, in eval
mode; thresholds are calibrated on other random images. Contenders, timed side by side in one
run, medians of ``--repeats`` interleaved measurements (torch.utils.benchmark, which synchronises
CUDA):

* ``forward``: the model's plain forward (every exit), what the engine must beat;
* ``full``: the engine with every threshold +inf (nobody leaves before the last exit);
* ``early exit @ p``: the engine with the calibrated thresholds (per ``--host-syncs`` mode);
* ``engine only``: the engine on a model that replays the outputs recorded from a run at p = 1
  (and from the ``full`` run) instantly: the engine's own time per exit (decision, scatter,
  host read, compaction copies, Python) without any network computation.

The FLOPs-predicted speed-up is full FLOPs / FLOPs actually spent per image (official op_counter
counts); the realised speed-up is forward time / early-exit time; their ratio says how much of the
saving on paper becomes wall-clock time (the project's target: at least 0.9, and at batch 1 never
more than 5% slower than the forward). Throughput depends on how many samples leave where, which
the calibration fixes, not on what the weights learned.
"""

from __future__ import annotations

import math
import statistics
import sys

import torch

import ranet_fast
from ranet_fast.demo import demo_model_args
from ranet_fast.inference import calibrate_thresholds, early_exit, exit_flops
from ranet_fast.models import RANet, ranet_config

from .common import (DTYPES, MEMORY_FORMATS, add_run_arguments, benchmark_parser, geometric_mean, git_commit,
                     interleaved_medians, provenance, write_json)

# Model -> (image side, batches of the sweep).
MODELS = {"demo": (32, (1, 16, 64, 256)), "cifar-c1": (32, (1, 16, 64, 256)), "cifar-c3": (32, (1, 16, 64, 256)),
          "imagenet-1": (160, (1, 16, 64))}
DEFAULT_BUDGETS = (0.5, 1.0, 2.0)
# The budget whose run the engine-only contender replays.
REPLAYED_BUDGET = 1.0
QUICK = ["--configs", "demo", "--batch", "1", "8", "--budgets", "0.5", "2.0", "--val-images", "16",
         "--repeats", "1", "--min-run-time", "0.001"]


def build_model(config: str, device: torch.device, dtype: torch.dtype, channels_last: bool):
    torch.manual_seed(0)
    model = RANet(demo_model_args() if config == "demo" else ranet_config(config)).eval()
    ranet_fast.convert(model)
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class Replay:
    """A staged model whose stages return, instantly, what ``model``'s stages computed in one
    engine run on ``x`` with ``thresholds``; the engine on it does everything but the network."""

    training = False

    def __init__(self, model, x: torch.Tensor, thresholds):
        self.num_exits = model.num_exits
        self.recording = model
        self.start = None
        self.stages = []
        self.stages_run = sum(1 for n in early_exit(self, x, thresholds, count_flops_spent=False).stage_batch_sizes
                              if n > 0)
        self.recording = None

    def early_exit_start(self, x):
        if self.recording is not None:
            self.start = self.recording.early_exit_start(x)
        return self.start

    def early_exit_stage(self, exit_index: int, state):
        if self.recording is not None:
            self.stages.append(self.recording.early_exit_stage(exit_index, state))
        return self.stages[exit_index]


def run_config(config: str, batch: int, options, device, dtype) -> dict:
    channels_last = options.layout == "channels_last"
    model = build_model(config, device, dtype, channels_last)
    size = MODELS[config][0]
    generator = torch.Generator().manual_seed(1)

    def batch_of_images(n):
        images = torch.randn(n, 3, size, size, generator=generator)
        return images.to(device=device, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[options.layout])

    flops = exit_flops(model, (size, size))
    with torch.no_grad():
        val_images = batch_of_images(options.val_images)
        val_logits = torch.cat([torch.stack(model(chunk)).float().cpu() for chunk in val_images.split(256)], dim=1)
    x = batch_of_images(batch)
    never = [math.inf] * model.num_exits
    budgets = [(p, calibrate_thresholds(val_logits, flops, p=p).thresholds) for p in options.budgets]
    results = [early_exit(model, x, thresholds) for _, thresholds in budgets]  # also the warm-up
    replayed = dict(budgets).get(REPLAYED_BUDGET, budgets[len(budgets) // 2][1])
    replays = {"full": (Replay(model, x, never), never), "budget": (Replay(model, x, replayed), replayed)}
    contenders = {"forward": lambda: model(x),
                  "full": lambda: early_exit(model, x, never, count_flops_spent=False)}
    for name, (replay, thresholds) in replays.items():
        contenders[("engine only", name)] = lambda replay=replay, thresholds=thresholds: early_exit(
            replay, x, thresholds, count_flops_spent=False)
    for mode in options.host_syncs:
        for p, thresholds in budgets:
            contenders[(mode, p)] = lambda thresholds=thresholds, mode=mode: early_exit(
                model, x, thresholds, count_flops_spent=False, host_syncs=mode)
    with torch.no_grad():
        seconds = interleaved_medians(contenders, options.repeats, options.min_run_time)
    row = {"config": config, "image_size": size, "batch": batch, "flops_per_exit": flops,
           "forward_s": seconds["forward"], "full_s": seconds["full"],
           "engine_us_per_exit": {
               "nobody_leaves": seconds[("engine only", "full")] / replays["full"][0].stages_run * 1e6,
               f"p={REPLAYED_BUDGET:g}": seconds[("engine only", "budget")] / replays["budget"][0].stages_run * 1e6},
           "budgets": []}
    for (p, _), result in zip(budgets, results):
        predicted = flops[-1] / result.flops_per_image
        entry = {"p": p, "exit_counts": result.exit_counts, "flops_per_image": result.flops_per_image,
                 "predicted_speedup": predicted}
        for mode in options.host_syncs:
            realised = seconds["forward"] / seconds[(mode, p)]
            suffix = "" if mode == "per_exit" else f"_{mode}"
            entry.update({f"early_exit_s{suffix}": seconds[(mode, p)], f"images_per_s{suffix}": batch / seconds[(mode, p)],
                          f"realised_speedup{suffix}": realised, f"realised_over_predicted{suffix}": realised / predicted})
        row["budgets"].append(entry)
    return row


def summarise(rows: list[dict]) -> dict:
    batched = [b["realised_over_predicted"] for row in rows if row["batch"] > 1 for b in row["budgets"]]
    single = [b["realised_speedup"] for row in rows if row["batch"] == 1 for b in row["budgets"]]
    overhead = [us for row in rows for us in row["engine_us_per_exit"].values()]
    summary = {"realised_over_predicted_min": min(batched, default=None),
               "realised_over_predicted_geomean": geometric_mean(batched) if batched else None,
               "batch1_speedup_min": min(single, default=None),
               "engine_us_per_exit_median": statistics.median(overhead)}
    return summary


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--configs", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: each model's in MODELS)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                        help="values of the official schedule's p (exit fractions ~ p^k)")
    parser.add_argument("--val-images", type=int, default=512, help="random images the thresholds are calibrated on")
    parser.add_argument("--host-syncs", nargs="+", choices=["per_exit", "once"], default=["per_exit"],
                        help="engine modes timed (early_exit's host_syncs; 'once' needs CUDA); the first is "
                             "the one the ratios use")
    parser.add_argument("--quick", action="store_true", help="a smoke test in seconds: " + " ".join(QUICK))
    add_run_arguments(parser, repeats=3, min_run_time=0.2)
    options = parser.parse_args(argv)
    if options.quick:  # the quick settings, then whatever the command line gave
        options = parser.parse_args([*QUICK, *(sys.argv[1:] if argv is None else argv)])
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    if "once" in options.host_syncs and device.type != "cuda":
        parser.error("--host-syncs once needs --device cuda: early_exit offers it only there")
    if options.host_syncs[0] != "per_exit":
        parser.error("--host-syncs must list per_exit first: the ratios and the summary use it")
    commit = git_commit()  # now: the checkout may move while a long run goes on

    print(f"{'config':<11} {'batch':>5} {'p':>5} {'MFLOPs/img':>10} {'img/s':>10} {'predicted':>9} "
          f"{'realised':>9} {'ratio':>6}  exits")
    rows = []
    for config in options.configs:
        for batch in options.batch or MODELS[config][1]:
            row = run_config(config, batch, options, device, dtype)
            rows.append(row)
            overhead = ", ".join(f"{name} {us:.0f} us" for name, us in row["engine_us_per_exit"].items())
            print(f"{config:<11} {batch:>5} {'fwd':>5} {row['flops_per_exit'][-1] / 1e6:>10.2f} "
                  f"{batch / row['forward_s']:>10.1f} {1:>8.2f}x {1:>8.2f}x {'':>6}  "
                  f"(engine with nobody leaving {row['forward_s'] / row['full_s']:.3f}x; engine per exit: {overhead})",
                  flush=True)
            for budget in row["budgets"]:
                extra = "".join(f" | {mode}: {budget[f'realised_speedup_{mode}']:.2f}x"
                                for mode in options.host_syncs[1:])
                print(f"{'':<11} {'':>5} {budget['p']:>5.2f} {budget['flops_per_image'] / 1e6:>10.2f} "
                      f"{budget['images_per_s']:>10.1f} {budget['predicted_speedup']:>8.2f}x "
                      f"{budget['realised_speedup']:>8.2f}x {budget['realised_over_predicted']:>6.2f}  "
                      f"{budget['exit_counts']}{extra}", flush=True)
    summary = summarise(rows)
    print("; ".join(f"{name.replace('_', ' ')} {value:.2f}" for name, value in summary.items() if value is not None)
          + " (targets: realised / predicted >= 0.9 at batch > 1, batch 1 speed-up >= 0.95)")
    result = {**provenance("early_exit", commit), "device": str(device), "dtype": options.dtype,
              "layout": options.layout, "fast_layers": True, "repeats": options.repeats,
              "host_syncs": options.host_syncs, "summary": summary, "rows": rows}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
