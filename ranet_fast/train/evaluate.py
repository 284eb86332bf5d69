"""Anytime and budgeted-batch (dynamic) evaluation of a trained multi-exit network.

* anytime: top-1/top-5 of every exit on the test split with the exit's cumulative FLOPs
  (official ``AnytimeResults.txt``);
* dynamic: ``ranet_fast.inference.dynamic_evaluation`` fits exit thresholds on the validation
  split's logits for 39 budgets and applies them to the test split (official ``dynamic.txt``:
  one ``accuracy<TAB>expected FLOPs`` line per budget).

Both are computed from one forward pass per split whose logits are kept in memory (as the
official code does), and reported as text, as ``results.json`` and as one plot
``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ranet_fast.checkpoint import write_file_atomic

from .loop import Progress, _as_list, _autocast, _to_device

RESULTS_JSON = "results.json"
PLOT_PNG = "accuracy_vs_flops.png"
ANYTIME_TXT = "AnytimeResults.txt"
DYNAMIC_TXT = "dynamic.txt"


@torch.no_grad()
def collect_logits(model: nn.Module, loader: DataLoader, *, device: torch.device, amp: str = "none",
                   channels_last: bool = False, progress: Progress | None = None,
                   desc: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's float32 logits over ``loader`` on the CPU: ``([K, N, C], targets [N])``."""
    model.eval()
    per_batch: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    bar = progress.bar(loader, len(loader), desc) if progress is not None else loader
    for images, target in bar:
        images, _ = _to_device(images, target, device, channels_last)
        with _autocast(device, amp):
            outputs = _as_list(model(images))
        per_batch.append(torch.stack([output.float() for output in outputs]).cpu())
        targets.append(target.cpu())
    if progress is not None:
        bar.close()
    if not per_batch:
        raise RuntimeError(f"cannot evaluate: the {desc} loader produced no batches")
    return torch.cat(per_batch, dim=1), torch.cat(targets).long()


def anytime_results(logits: torch.Tensor, targets: torch.Tensor, flops: Sequence[int]) -> list[dict]:
    """Per exit: ``{'exit' (1-based), 'flops', 'top1', 'top5'}`` with accuracies in percent."""
    num_exits, num_samples, num_classes = logits.shape
    if len(flops) != num_exits:
        raise ValueError(f"{len(flops)} FLOPs figures for {num_exits} exits")
    top = logits.topk(min(5, num_classes), dim=2).indices  # [K, N, k]
    hits = top.eq(targets.view(1, -1, 1))
    top1 = hits[:, :, 0].double().mean(dim=1) * 100.0
    top5 = hits.any(dim=2).double().mean(dim=1) * 100.0
    return [{"exit": k + 1, "flops": int(flops[k]), "top1": top1[k].item(), "top5": top5[k].item()}
            for k in range(num_exits)]


def dynamic_results(val_logits: torch.Tensor, val_targets: torch.Tensor, test_logits: torch.Tensor,
                    test_targets: torch.Tensor, flops: Sequence[int]) -> list[dict]:
    """Budgeted batch classification over the 39 official budgets (see ranet_fast.inference)."""
    from ranet_fast.inference import dynamic_evaluation

    return dynamic_evaluation(val_logits, val_targets, test_logits, test_targets, list(flops))


@torch.no_grad()
def measure_early_exit(model: nn.Module, test_loader: DataLoader, dynamic: list[dict], *, device: torch.device,
                       max_images: int, amp: str = "none", channels_last: bool = False,
                       progress: Progress | None = None) -> dict:
    """Real early exit (``ranet_fast.inference.early_exit``) at every budget of ``dynamic``.

    Runs on the first ``max_images`` test images, collected on the device first so that only the
    network is timed, in batches of the loader's size: once with every threshold +inf (the full
    network through the same engine) and once per budget with its thresholds. Returns the full
    network's figures and, in ``budgets`` (in the order of ``dynamic``), each budget's images/s,
    measured speed-up over the full network, FLOPs-predicted speed-up, exit counts and top-1 of the
    real run (equal to the simulation's on the same images except where a confidence is within
    rounding of a threshold).
    """
    from ranet_fast.inference import early_exit

    model.eval()
    batches, targets, seen = [], [], 0
    for images, target in test_loader:
        images, target = _to_device(images[:max_images - seen], target[:max_images - seen], device, channels_last)
        batches.append(images)
        targets.append(target.cpu())
        seen += images.shape[0]
        if seen >= max_images:
            break
    targets = torch.cat(targets).long()

    def run(thresholds) -> tuple[float, torch.Tensor, torch.Tensor, float]:
        predictions, exits, spent = [], [], 0.0
        start = time.perf_counter()
        for images in batches:
            with _autocast(device, amp):
                result = early_exit(model, images, thresholds)
            predictions.append(result.logits.argmax(dim=1))
            exits.append(result.exit_index)
            spent += result.flops
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, torch.cat(predictions).cpu(), torch.cat(exits).cpu(), spent / seen

    num_exits = len(dynamic[0]["thresholds"])
    run([math.inf] * num_exits)  # warm-up: allocator, oneDNN primitives, CUDA kernels
    full_seconds, _, _, full_flops = run([math.inf] * num_exits)
    budgets = []
    bar = progress.bar(dynamic, len(dynamic), "real early exit") if progress is not None else dynamic
    for row in bar:
        seconds, predictions, exits, flops = run([float(t) for t in row["thresholds"]])
        budgets.append({
            "p": row["p"], "images_per_s": seen / seconds, "flops_per_image": flops,
            "speedup": full_seconds / seconds, "flops_predicted_speedup": full_flops / flops,
            "top1": float((predictions == targets).double().mean() * 100.0),
            "exit_counts": torch.bincount(exits, minlength=num_exits).tolist(),
        })
    if progress is not None:
        bar.close()
    return {"images": seen, "full_network_images_per_s": seen / full_seconds, "full_network_flops": full_flops,
            "budgets": budgets}


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy values and namespaces as JSON values. Non-finite floats (thresholds of
    +inf, "nobody leaves here", and the last exit's -inf, "everyone left leaves") become the
    strings "inf" / "-inf" (``float()`` reads them back) so the file stays strict JSON."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "__dict__"):
        return to_jsonable(vars(value))
    return str(value)


def format_anytime(anytime: list[dict]) -> str:
    """The official ``AnytimeResults.txt`` text."""
    lines = ["AnytimeResults"]
    lines += [f" @{row['exit']}** flops {row['flops'] / 1e6:.2f}M prec@1 {row['top1']:.3f} "
              f"prec@5 {row['top5']:.3f}" for row in anytime]
    return "\n".join(lines) + "\n"


def format_dynamic(dynamic: list[dict]) -> str:
    """The official ``dynamic.txt`` text: test accuracy and expected FLOPs per budget."""
    return "".join(f"{float(row['test_accuracy'])}\t{float(row['expected_flops'])}\n" for row in dynamic)


def plot_accuracy_vs_flops(path: str, anytime: list[dict] | None, dynamic: list[dict] | None,
                           title: str) -> str:
    """One PNG with the anytime exits (points) and the dynamic budget curve; returns ``path``."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot alone

    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    axes = figure.add_subplot()
    if dynamic:
        points = sorted((float(row["expected_flops"]) / 1e6, float(row["test_accuracy"])) for row in dynamic)
        axes.plot([x for x, _ in points], [y for _, y in points], "-", color="tab:blue",
                  label="dynamic (budgeted batch)")
    if anytime:
        xs = [row["flops"] / 1e6 for row in anytime]
        ys = [row["top1"] for row in anytime]
        axes.plot(xs, ys, "o--", color="tab:orange", label="anytime (each exit)")
        for row, x, y in zip(anytime, xs, ys):
            axes.annotate(str(row["exit"]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    axes.set_xlabel("FLOPs per image (millions of multiply-adds)")
    axes.set_ylabel("top-1 accuracy on the test split (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    write_file_atomic(path, buffer.getvalue())
    return path


def format_summary(results: dict) -> str:
    """A plain-text table of the results for the terminal."""
    lines = []
    if results.get("anytime"):
        lines.append("anytime (test split)")
        lines.append(f"{'exit':>5} {'MFLOPs':>10} {'top-1 %':>9} {'top-5 %':>9}")
        lines += [f"{row['exit']:>5} {row['flops'] / 1e6:>10.2f} {row['top1']:>9.3f} {row['top5']:>9.3f}"
                  for row in results["anytime"]]
    if results.get("dynamic"):
        lines.append("dynamic (thresholds from the validation split, applied to the test split)")
        real = results.get("early_exit")
        header = f"{'budget p':>8} {'MFLOPs':>10} {'test top-1 %':>13} {'val top-1 %':>12}"
        if real:
            header += (f" | real early exit on {real['images']} test images: {'img/s':>9} {'speed-up':>8} "
                       f"{'FLOPs-predicted':>15} {'top-1 %':>8}")
        lines.append(header)
        for index, row in enumerate(results["dynamic"]):
            line = (f"{float(row['p']):>8.2f} {float(row['expected_flops']) / 1e6:>10.2f} "
                    f"{float(row['test_accuracy']):>13.3f} {float(row['val_accuracy']):>12.3f}")
            if real:
                measured = real["budgets"][index]
                line += (f" | {'':>{len(str(real['images'])) + 31}}{measured['images_per_s']:>9.1f} "
                         f"{measured['speedup']:>7.2f}x {measured['flops_predicted_speedup']:>14.2f}x "
                         f"{measured['top1']:>8.3f}")
            lines.append(line)
        if real:
            lines.append(f"full network through the same engine: {real['full_network_images_per_s']:.1f} img/s")
    for name in ("results_json", "plot"):
        if results.get(name):
            lines.append(f"{name.replace('_', ' ')}: {results[name]}")
    return "\n".join(lines)


def evaluate(model: nn.Module, *, mode: str, val_loader: DataLoader, test_loader: DataLoader,
             flops: Sequence[int], params: int, args, device: torch.device, save_dir: str,
             progress: Progress | None = None, checkpoint: str | None = None) -> dict:
    """Run ``mode`` ('anytime', 'dynamic' or 'both'), write the reports into ``save_dir`` and
    return the results (also written to ``results.json``) with the paths of the files."""
    if mode not in ("anytime", "dynamic", "both"):
        raise ValueError(f"unknown evaluation mode {mode!r}")
    options = dict(device=device, amp=args.amp, channels_last=args.channels_last, progress=progress)
    test_logits, test_targets = collect_logits(model, test_loader, desc="test logits", **options)
    results: dict[str, Any] = {
        "data": args.data, "checkpoint": checkpoint, "mode": mode, "num_exits": test_logits.shape[0],
        "flops": [int(f) for f in flops], "params": int(params), "anytime": None, "dynamic": None,
        "early_exit": None,
    }
    os.makedirs(save_dir, exist_ok=True)
    if mode in ("anytime", "both"):
        results["anytime"] = anytime_results(test_logits, test_targets, flops)
        write_file_atomic(os.path.join(save_dir, ANYTIME_TXT), format_anytime(results["anytime"]))
    if mode in ("dynamic", "both"):
        # Without --use-valid the official validation split is the test split: reuse its logits.
        if val_loader is test_loader or val_loader.dataset is test_loader.dataset:
            val_logits, val_targets = test_logits, test_targets
        else:
            val_logits, val_targets = collect_logits(model, val_loader, desc="val logits", **options)
        dynamic = dynamic_results(val_logits, val_targets, test_logits, test_targets, flops)
        max_images = getattr(args, "early_exit_images", 0)
        if max_images > 0 and hasattr(model, "early_exit_stage"):
            results["early_exit"] = measure_early_exit(
                model, test_loader, dynamic, device=device, max_images=max_images, amp=args.amp,
                channels_last=args.channels_last, progress=progress)
        results["dynamic"] = to_jsonable(dynamic)
        if results["early_exit"] is not None:
            results["early_exit"] = to_jsonable(results["early_exit"])
        write_file_atomic(os.path.join(save_dir, DYNAMIC_TXT), format_dynamic(results["dynamic"]))

    title = f"{args.arch} on {args.data}: accuracy vs FLOPs"
    results["plot"] = plot_accuracy_vs_flops(os.path.join(save_dir, PLOT_PNG), results["anytime"],
                                             results["dynamic"], title)
    results["results_json"] = os.path.join(save_dir, RESULTS_JSON)
    results["args"] = to_jsonable(vars(args))
    write_file_atomic(results["results_json"], json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
    return results
