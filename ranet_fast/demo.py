"""``python -m ranet_fast.demo``: the README's first command once the set-up is done.

Trains a small RANet (the layout of the paper's CIFAR Model-C-1 at reduced width) on the
synthetic data set with the standard trainer, which then evaluates anytime and budgeted
inference, writes ``results.json`` and ``accuracy_vs_flops.png`` and prints its summary. The demo
adds what the synthetic set was built to show: under a budget, easy images (large shapes) leave
at the early, coarse exits and hard ones (small shapes, fine textures) travel on.

Last it runs real early exit (:func:`ranet_fast.inference.early_exit`) on the same test images,
with the same thresholds and model as the simulated budget table beside it, prints both
accuracies and how many images the two send out at a different exit or classify differently,
and times it against the plain forward (medians of interleaved repeats). The figures go to
``early_exit.json`` in the save folder (budgets, predicted and realised speed-ups, accuracies,
batch size, threads, commit), with the provenance fields benchmarks/figures.py asks of a results
file.

Any trainer flag may be appended and wins over the demo's defaults, e.g. ``--epochs 2`` or
``--device cuda``; ``--early-exit-images N`` sets the number of test images of the real-exit run.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from typing import Sequence

import torch

from ranet_fast.benchmarks.common import git_commit
from ranet_fast.checkpoint import load_official_checkpoint, write_file_atomic
from ranet_fast.data import get_dataloaders
from ranet_fast.env import environment_info
from ranet_fast.inference import early_exit, evaluate_thresholds, exit_confidence
from ranet_fast.models import RANet
from ranet_fast.train.__main__ import run
from ranet_fast.train.args import parse_args
from ranet_fast.train.evaluate import collect_logits
from ranet_fast.train.runtime import apply_gpu_flag

DEMO_FLAGS = [
    "--arch", "RANet", "--data", "synthetic", "--save", "demo_output",
    "--scale-list", "1-2-3", "--grFactor", "4-2-1", "--bnFactor", "4-2-1",
    "--step", "2", "--stepmode", "even", "--nChannels", "8", "--growthRate", "4",
    # The paper's recipe (SGD, lr 0.1, 300 epochs) needs far more steps than a demo has; over a
    # few epochs Adam with a cosine schedule gets a small RANet well past chance.
    "--epochs", "5", "--optimizer", "adam", "--lr", "0.002", "--lr-type", "cosine",
    "-b", "64", "-j", "2", "-p", "40",
]


# The budgets of the demo's real-exit table (a subset of the 39 of the simulated table, so that the
# timed repeats take seconds, not minutes) and the interleaved repeats of each timing.
REAL_EXIT_BUDGETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
REAL_EXIT_REPEATS = 5
EARLY_EXIT_JSON = "early_exit.json"


def demo_model_args():
    """The argparse namespace of the demo's model (for building it without training, e.g. to time it)."""
    return parse_args(DEMO_FLAGS)


def exits_by_difficulty(args, results: dict) -> str:
    """Mean exit (1-based) of easy and hard test images at the budget whose expected FLOPs are
    closest to half of the full network's."""
    model = RANet(args)
    load_official_checkpoint(model, results["checkpoint"])
    test_loader = get_dataloaders(args)[2]
    logits, targets = collect_logits(model, test_loader, device=torch.device("cpu"))
    half = results["flops"][-1] / 2
    budget = min(results["dynamic"], key=lambda row: abs(row["expected_flops"] - half))
    pairs = [exit_confidence(exit_logits) for exit_logits in logits]
    confidence = torch.stack([c for c, _ in pairs])
    prediction = torch.stack([p for _, p in pairs])
    thresholds = torch.tensor([float(t) for t in budget["thresholds"]])  # JSON holds "inf" as text
    chosen = evaluate_thresholds(confidence, prediction, targets, thresholds, results["flops"])
    exit_number = chosen.exit_index.double() + 1
    hard = test_loader.dataset.difficulty.bool()
    correct = prediction.gather(0, chosen.exit_index.view(1, -1)).squeeze(0) == targets
    lines = [f"budget p={budget['p']:.2f}: {budget['expected_flops'] / 1e6:.2f} MFLOPs per image on "
             f"average (full network {results['flops'][-1] / 1e6:.2f}), test top-1 {chosen.accuracy:.2f} %"]
    for name, mask in (("easy", ~hard), ("hard", hard)):
        lines.append(f"  {name} images ({int(mask.sum())}): mean exit {exit_number[mask].mean():.2f} of "
                     f"{len(results['flops'])}, top-1 {correct[mask].double().mean() * 100:.2f} %")
    return "\n".join(lines)


def real_early_exit(args, results: dict) -> dict:
    """Real early exit against the simulation on the first ``args.early_exit_images`` test images.

    One batch of all of them (the budgeted batch classification of the paper), the thresholds of
    the simulated table's rows at REAL_EXIT_BUDGETS, the trained model in eval mode on the CPU.
    For each budget: the simulated and the real top-1 and FLOPs per image, the images whose exit
    or prediction differ, and the time of the real run against the plain forward of the batch.
    """
    model = RANet(args).eval()
    load_official_checkpoint(model, results["checkpoint"])
    images, targets, seen = [], [], 0
    for batch, target in get_dataloaders(args)[2]:
        images.append(batch[:args.early_exit_images - seen])
        targets.append(target[:args.early_exit_images - seen])
        seen += images[-1].shape[0]
        if seen >= args.early_exit_images:
            break
    images, targets = torch.cat(images), torch.cat(targets).long()
    with torch.no_grad():
        logits = model(images)
    pairs = [exit_confidence(exit_logits) for exit_logits in logits]
    confidence = torch.stack([c for c, _ in pairs])
    prediction = torch.stack([p for _, p in pairs])
    flops = results["flops"]
    rows = [row for row in results["dynamic"] if any(abs(float(row["p"]) - p) < 1e-9 for p in REAL_EXIT_BUDGETS)]
    contenders = {"forward": lambda: model(images)}
    budgets = []
    for row in rows:
        thresholds = torch.tensor([float(t) for t in row["thresholds"]])  # JSON holds "inf" as text
        simulated = evaluate_thresholds(confidence, prediction, targets, thresholds, flops)
        real = early_exit(model, images, thresholds, flops=flops)
        real_prediction = real.logits.argmax(dim=1)
        simulated_prediction = prediction.gather(0, simulated.exit_index.view(1, -1)).squeeze(0)
        budgets.append({
            "p": float(row["p"]), "thresholds": [float(t) for t in row["thresholds"]],
            "simulated_top1": simulated.accuracy, "real_top1": float((real_prediction == targets).double().mean() * 100),
            "simulated_flops_per_image": simulated.expected_flops, "real_flops_per_image": real.flops_per_image,
            "exit_counts": real.exit_counts,
            "images_exiting_elsewhere": int((real.exit_index != simulated.exit_index).sum()),
            "images_predicted_differently": int((real_prediction != simulated_prediction).sum()),
            "predicted_speedup": flops[-1] / real.flops_per_image,
        })
        contenders[len(budgets) - 1] = lambda thresholds=thresholds: early_exit(model, images, thresholds,
                                                                                count_flops_spent=False)
    samples: dict = {name: [] for name in contenders}
    with torch.no_grad():
        for name, run_once in contenders.items():  # warm-up: allocator, oneDNN primitives
            run_once()
        for _ in range(REAL_EXIT_REPEATS):
            for name, run_once in contenders.items():
                start = time.perf_counter()
                run_once()
                samples[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    for index, budget in enumerate(budgets):
        budget["early_exit_s"] = seconds[index]
        budget["realised_speedup"] = seconds["forward"] / seconds[index]
        budget["realised_over_predicted"] = budget["realised_speedup"] / budget["predicted_speedup"]
    return {"benchmark": "demo_early_exit", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(),
            "device": "cpu", "torch_threads": torch.get_num_threads(), "environment": environment_info(),
            "images": seen, "batch": seen, "repeats": REAL_EXIT_REPEATS, "forward_s": seconds["forward"],
            "flops_per_exit": flops, "budgets": budgets}


def format_real_early_exit(report: dict) -> str:
    lines = [f"real early exit on the same {report['images']} test images, one batch, thresholds of the table "
             f"above ({report['torch_threads']} threads, medians of {report['repeats']} interleaved runs)",
             f"{'budget p':>8} {'top-1 % simulated':>18} {'real':>7} {'exit differs':>12} {'MFLOPs':>7} "
             f"{'predicted':>9} {'realised':>8} {'ratio':>6}"]
    for budget in report["budgets"]:
        lines.append(f"{budget['p']:>8.2f} {budget['simulated_top1']:>18.2f} {budget['real_top1']:>7.2f} "
                     f"{budget['images_exiting_elsewhere']:>12} {budget['real_flops_per_image'] / 1e6:>7.2f} "
                     f"{budget['predicted_speedup']:>8.2f}x {budget['realised_speedup']:>7.2f}x "
                     f"{budget['realised_over_predicted']:>6.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(DEMO_FLAGS + list(sys.argv[1:] if argv is None else argv))
    apply_gpu_flag(args)
    # The trainer's own real-exit timing (one unrepeated run per budget, batches of the loader) is
    # replaced by the demo's, on the same images as the simulation it is printed beside.
    trainer_args = copy.copy(args)
    trainer_args.early_exit_images = 0
    results = run(trainer_args)
    print("\nwhere images leave under a budget")
    print(exits_by_difficulty(args, results))
    if args.early_exit_images > 0:
        report = real_early_exit(args, results)
        path = os.path.join(args.save, EARLY_EXIT_JSON)
        write_file_atomic(path, json.dumps(report, indent=2) + "\n")
        print("\n" + format_real_early_exit(report) + f"\nreal early exit: {path}")
    print(f"\nplot: {results['plot']}\nresults: {results['results_json']}")


if __name__ == "__main__":
    main()
