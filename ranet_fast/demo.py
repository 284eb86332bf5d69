"""``python -m ranet_fast.demo``: the README's first command once the set-up is done.

Trains a small RANet (the layout of the paper's CIFAR Model-C-1 at reduced width) on the
synthetic data set with the standard trainer, which then evaluates anytime and budgeted
inference, writes ``results.json`` and ``accuracy_vs_flops.png`` and prints its summary. The demo
adds what the synthetic set was built to show: under a budget, easy images (large shapes) leave
at the early, coarse exits and hard ones (small shapes, fine textures) travel on.

Any trainer flag may be appended and wins over the demo's defaults, e.g. ``--epochs 2`` or
``--device cuda``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from ranet_fast.checkpoint import load_official_checkpoint
from ranet_fast.data import get_dataloaders
from ranet_fast.inference import evaluate_thresholds, exit_confidence
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(DEMO_FLAGS + list(sys.argv[1:] if argv is None else argv))
    apply_gpu_flag(args)
    results = run(args)
    print("\nwhere images leave under a budget")
    print(exits_by_difficulty(args, results))
    print(f"\nplot: {results['plot']}\nresults: {results['results_json']}")


if __name__ == "__main__":
    main()
