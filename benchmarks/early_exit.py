"""Real early exit vs full-network inference: does skipping computation save the time FLOPs promise?

    python -m benchmarks early_exit --configs cifar-c1 cifar-c3 --batch 64 1024 \
        --json benchmarks/results/early_exit-cpu.json
    python -m benchmarks early_exit --configs imagenet-1 --batch 64 --device cuda --dtype bf16

For each configuration and batch size a RANet (random weights from a fixed seed, eval mode,
``ranet_fast.convert``-ed unless ``--eager``) gets exit thresholds calibrated on a separate
validation batch for several budgets (the official schedule's ``p``), then classifies a test batch
with ``ranet_fast.inference.early_exit``. Contenders, timed side by side in one run, medians of
``--repeats`` measurements (torch.utils.benchmark, which synchronises CUDA):

* ``full``: the same engine with every threshold +inf (every sample runs every stage; the engine's
  exit decisions run, its compaction never does);
* ``forward``: the model's plain forward (all exits), for scale;
* ``early exit @ p``: the engine with the calibrated thresholds.

The FLOPs-predicted speed-up is full FLOPs / FLOPs actually spent per image (official op_counter
counts); the realised speed-up is full time / early-exit time; their ratio says how much of the
saving on paper becomes wall-clock time (the project's target: at least 0.9). Throughput does not
depend on what the weights learned, only on how many samples leave where, which the calibration
fixes, so random weights measure the same thing a trained model would.
"""

from __future__ import annotations

import math

import torch

import ranet_fast
from ranet_fast.inference import calibrate_thresholds, early_exit, exit_flops
from ranet_fast.models import RANet, ranet_config
from ranet_fast.models.configs import IMAGE_SIZES

from .common import (DTYPES, MEMORY_FORMATS, add_run_arguments, benchmark_parser, geometric_mean, git_commit,
                     interleaved_medians, provenance, write_json)

DEFAULT_BUDGETS = (0.25, 0.5, 1.0, 1.5)


def build_model(config: str, device: torch.device, dtype: torch.dtype, channels_last: bool, fast: bool):
    torch.manual_seed(0)
    model = RANet(ranet_config(config)).eval()
    if fast:
        ranet_fast.convert(model)
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def run_config(config: str, batch: int, options, device, dtype) -> dict:
    channels_last = options.layout == "channels_last"
    model = build_model(config, device, dtype, channels_last, not options.eager)
    size = IMAGE_SIZES[ranet_config(config).data]
    generator = torch.Generator().manual_seed(1)

    def batch_of_images(n):
        images = torch.randn(n, 3, size, size, generator=generator)
        return images.to(device=device, dtype=dtype).contiguous(memory_format=MEMORY_FORMATS[options.layout])

    flops = exit_flops(model, (size, size))
    with torch.no_grad():
        # Calibration logits from a separate batch of the same size, in chunks of the test batch.
        val_images = batch_of_images(max(options.val_images, batch))
        val_logits = torch.cat([torch.stack(model(chunk)).float().cpu()
                                for chunk in val_images.split(batch)], dim=1)
    x = batch_of_images(batch)
    never = [math.inf] * model.num_exits
    budgets = [(p, calibrate_thresholds(val_logits, flops, p=p).thresholds) for p in options.budgets]
    results = [early_exit(model, x, thresholds) for _, thresholds in budgets]  # also the warm-up
    contenders = {"forward": lambda: model(x),
                  "full": lambda: early_exit(model, x, never, count_flops_spent=False)}
    for index, (_, thresholds) in enumerate(budgets):
        contenders[index] = lambda thresholds=thresholds: early_exit(model, x, thresholds, count_flops_spent=False)
    with torch.no_grad():
        seconds = interleaved_medians(contenders, options.repeats, options.min_run_time)
    row = {"config": config, "batch": batch, "flops_per_exit": flops, "forward_s": seconds["forward"],
           "full_s": seconds["full"], "budgets": []}
    for index, ((p, _), result) in enumerate(zip(budgets, results)):
        predicted = flops[-1] / result.flops_per_image
        realised = seconds["full"] / seconds[index]
        row["budgets"].append({
            "p": p, "exit_counts": result.exit_counts, "flops_per_image": result.flops_per_image,
            "early_exit_s": seconds[index], "images_per_s": batch / seconds[index],
            "predicted_speedup": predicted, "realised_speedup": realised,
            "realised_over_predicted": realised / predicted,
        })
    return row


def main(argv=None) -> dict:
    parser = benchmark_parser(__spec__.name, __doc__)
    parser.add_argument("--configs", nargs="+", default=["cifar-c1", "cifar-c3", "imagenet-1"])
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 1024])
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                        help="values of the official schedule's p (exit fractions ~ p^k)")
    parser.add_argument("--val-images", type=int, default=1024, help="validation images for the calibration")
    parser.add_argument("--eager", action="store_true", help="the official layers (no ranet_fast.convert)")
    add_run_arguments(parser, repeats=3, min_run_time=0.5)
    options = parser.parse_args(argv)
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    commit = git_commit()  # now: the checkout may move while a long run goes on

    print(f"{'config':<11} {'batch':>5} {'p':>5} {'MFLOPs/img':>10} {'img/s':>10} {'predicted':>9} "
          f"{'realised':>9} {'ratio':>6}  exits")
    rows = []
    for config in options.configs:
        for batch in options.batch:
            row = run_config(config, batch, options, device, dtype)
            rows.append(row)
            print(f"{config:<11} {batch:>5} {'full':>5} {row['flops_per_exit'][-1] / 1e6:>10.2f} "
                  f"{batch / row['full_s']:>10.1f} {1:>8.2f}x {1:>8.2f}x {'':>6}  "
                  f"(plain forward {batch / row['forward_s']:.1f} img/s)", flush=True)
            for budget in row["budgets"]:
                print(f"{'':<11} {'':>5} {budget['p']:>5.2f} {budget['flops_per_image'] / 1e6:>10.2f} "
                      f"{budget['images_per_s']:>10.1f} {budget['predicted_speedup']:>8.2f}x "
                      f"{budget['realised_speedup']:>8.2f}x {budget['realised_over_predicted']:>6.2f}  "
                      f"{budget['exit_counts']}", flush=True)
    ratios = [b["realised_over_predicted"] for row in rows for b in row["budgets"]]
    summary = {"realised_over_predicted_min": min(ratios),
               "realised_over_predicted_geomean": geometric_mean(ratios)}
    print("realised / FLOPs-predicted speed-up: "
          f"min {summary['realised_over_predicted_min']:.2f}, geometric mean "
          f"{summary['realised_over_predicted_geomean']:.2f} (target >= 0.9)")
    result = {**provenance("early_exit", commit), "device": str(device), "dtype": options.dtype,
              "layout": options.layout, "fast_layers": not options.eager,
              "summary": summary, "rows": rows}
    write_json(options.json, result)
    return result


if __name__ == "__main__":
    main()
