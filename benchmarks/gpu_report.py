"""The GPU tables of docs/gpu.md, rendered from the committed results of the GPU check.

Reads every ``benchmarks/results/gpu/gpu_check-N.json`` (one per call of scripts/gpu_check.sh, in
name order; a later file's stage replaces an earlier one's only when the later one has results).
``python -m benchmarks.figures`` writes what ``render`` returns into the page, and
tests/test_figures.py keeps the page equal to it, so no GPU figure is typed by hand.
"""

from __future__ import annotations

import glob
import json
import os

from .common import geometric_mean
from .gpu_check import tests_from_log
from .roofline import H200_BF16_FLOPS, H200_COPY_BYTES, floors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu")


def load_runs(directory: str = RESULTS) -> list[tuple[str, dict]]:
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "gpu_check-*.json"))):
        record = json.load(open(path))
        tests = record["stages"].get("tests")
        # Calls made before the check counted a stopped run's tests itself: count them from the
        # committed log (log-N.txt beside gpu_check-N.json), between the stage's own markers.
        log = path.replace("gpu_check-", "log-").replace(".json", ".txt")
        if tests and "tests" not in tests and os.path.exists(log):
            text = open(log).read()
            segment = text.split("== tests:", 1)[1].split("\n== tests:", 1)[0] if "== tests:" in text else ""
            tests["tests"] = tests_from_log(segment)
        # Named as committed, so that a copy elsewhere (a test's) renders the same text.
        runs.append((f"benchmarks/results/gpu/{os.path.basename(path)}", record))
    return runs


def latest_stages(runs) -> dict[str, tuple[str, dict, dict]]:
    """stage name -> (file, run record, stage entry), the last run that brought results for it."""
    chosen = {}
    for path, record in runs:
        for name, entry in record["stages"].items():
            if name not in chosen or entry.get("result") or entry.get("tests") or "sanitizer_errors" in entry:
                chosen[name] = (path, record, entry)
    return chosen


def _environment_line(path: str, record: dict) -> str:
    environment = record["environment"]
    date = record.get("date") or ""
    return (f"`{path}`: {', '.join(environment['gpus']) or 'no GPU'} ({environment.get('nvidia_smi') or ''}), "
            f"torch {environment['torch']}, triton {environment['triton']}, commit "
            f"{(record.get('commit') or 'unknown')[:10]}{', ' + date if date else ''}")


def tests_section(entry) -> list[str]:
    counts = entry.get("tests")
    if not counts:
        return [f"GPU tests: {entry['status']} ({entry.get('reason', 'no counts')})."]
    lines = [f"GPU tests (`pytest -m gpu`): {counts['passed']} passed, {counts['failures'] + counts['errors']} "
             f"failed, {counts['skipped']} skipped in {entry['seconds']:.0f} s ({entry['status']})."]
    if counts["failed_tests"]:
        functions: dict[str, int] = {}
        for node in counts["failed_tests"]:
            name = node.split("[")[0].replace("tests/", "")
            functions[name] = functions.get(name, 0) + 1
        lines.append("Failed: " + "; ".join(f"`{name}` ({n})" for name, n in functions.items()) + ".")
    return lines


def ops_section(entry) -> list[str]:
    result = entry.get("result")
    if not result:
        return []
    ceilings = result["ceilings"]
    lines = [f"Every op on every backend against eager (`benchmarks/op_backends.py`, batch "
             f"{result['options']['batch']}, {result['options']['layout']}, the "
             f"{result['options']['max_shapes']} heaviest shapes of each configuration). Ceilings measured in the "
             f"same run: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, {ceilings['matmul_dtype']} matmul "
             f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s. Geometric means over the cases; "
             "per call = as a caller sees it (host overhead included); GPU time = the call captured in a CUDA "
             "graph and replayed; x floor = GPU time over max(FLOPs / matmul rate, minimal bytes / copy bandwidth):",
             "", "| op | dtype | cases | backend | per call vs eager | GPU time vs eager | x floor | fastest per call in |",
             "|---|---|---|---|---|---|---|---|"]
    for key, summary in result["summary"].items():
        op, dtype = key.rsplit(" ", 1)
        for name in summary["geomean_x_floor"]:
            wall = summary["geomean_vs_eager"].get(name)
            device = summary.get("geomean_device_vs_eager", {}).get(name)
            lines.append(f"| {op} | {dtype} | {summary['cases']} | {name} | {wall:.2f}x | "
                         f"{'-' if device is None or device != device else f'{device:.2f}x'} | "
                         f"{summary['geomean_x_floor'][name]:.1f} | {summary['fastest_counts'][name]} |")
    failures = [(r["op"], r["config"], name, error) for r in result["rows"] for name, error in r["errors"].items()]
    if failures:
        lines += ["", "Backends that failed a case: " + "; ".join(f"{op} {config} {name}: {error[:80]}"
                                                               for op, config, name, error in failures[:6])]
    return lines


def suite_section(entry, title: str) -> list[str]:
    result = entry.get("result")
    if not result or not result.get("rows"):
        return []
    dtype = result["dtype"]
    lines = [f"{title} ({dtype}, {result['layout']}, medians of {result['options']['repeats']} interleaved samples; "
             "floor: `benchmarks/roofline.py` at 790 TFLOP/s and 4.3 TB/s):", "",
             "| config | batch | contender | images/s | vs eager | vs torch.compile | x floor | peak MiB | launches |",
             "|---|---|---|---|---|---|---|---|---|"]
    import torch

    for row in result["rows"]:
        floor = floors(row["config"], row["batch"], getattr(torch, {"bf16": "bfloat16", "fp16": "float16",
                                                                    "fp32": "float32"}[dtype]),
                       H200_BF16_FLOPS, H200_COPY_BYTES)
        key = "train_step_floor_fused_s" if row["workload"] == "train-step" else "forward_floor_fused_s"
        compiled = f"{row['vs_best_compile']:.2f}x" if row.get("vs_best_compile") else "-"
        launched = row["launches"]["launch_calls"] if row.get("launches") else "-"
        lines.append(f"| {row['config']} | {row['batch']} | {row['contender']} | {row['images_per_s']:.0f} | "
                     f"{row['vs_eager']:.2f}x | {compiled} | {row['seconds_per_call'] / floor[key]:.1f} | "
                     f"{row['peak_memory_bytes'] / 2**20:.0f} | {launched} |")
    return lines


def early_exit_section(entry) -> list[str]:
    result = entry.get("result")
    if not result or not result.get("rows"):
        return []
    lines = ["Real early exit (`benchmarks/early_exit.py`, converted model, thresholds calibrated on other random "
             "images; realised = full-network time / early-exit time, predicted = full FLOPs / FLOPs spent):", "",
             "| config | batch | p | MFLOPs/image | images/s | predicted | realised | realised / predicted |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for budget in row["budgets"]:
            lines.append(f"| {row['config']} | {row['batch']} | {budget['p']} | {budget['flops_per_image'] / 1e6:.1f} | "
                         f"{budget['images_per_s']:.0f} | {budget['predicted_speedup']:.2f}x | "
                         f"{budget['realised_speedup']:.2f}x | {budget['realised_over_predicted']:.2f} |")
    ratios = [b["realised_over_predicted"] for row in result["rows"] for b in row["budgets"]]
    lines += ["", f"Realised / predicted over all budgets: {min(ratios):.2f} to {max(ratios):.2f} "
                  f"(geometric mean {geometric_mean(ratios):.2f})."]
    return lines


def render(runs) -> str:
    if not runs:
        return "No GPU results yet."
    stages = latest_stages(runs)
    files = sorted({path for path, _, _ in stages.values()})
    lines = ["Measured by `scripts/gpu_check.sh` on a lent GPU; each figure below is rendered from these files "
             "by `python -m benchmarks.figures`:", ""]
    lines += [f"- {_environment_line(path, record)}" for path, record in runs if path in files]
    lines.append("")
    lines.append("| stage | status | seconds | file |")
    lines.append("|---|---|---|---|")
    for name, (path, _, entry) in stages.items():
        seconds = f"{entry['seconds']:.0f}" if "seconds" in entry else "-"
        status = entry["status"] + (f" ({entry['reason']})" if entry.get("reason") else "")
        lines.append(f"| {name} | {status} | {seconds} | `{os.path.basename(path)}` |")
    lines.append("")
    sections = []
    if "tests" in stages:
        sections.append(tests_section(stages["tests"][2]))
    if "sanitizer" in stages and "sanitizer_errors" in stages["sanitizer"][2]:
        entry = stages["sanitizer"][2]
        sections.append([f"compute-sanitizer memcheck: {entry['sanitizer_errors']} errors in "
                         f"{entry['sanitized_processes']} processes ({entry['status']})."])
    if "ops" in stages:
        sections.append(ops_section(stages["ops"][2]))
    for name, title in (("anytime", "Anytime inference (all exits)"), ("compile", "Against torch.compile"),
                        ("train", "Training step (forward, the exits' summed cross-entropy, backward, SGD)")):
        if name in stages:
            sections.append(suite_section(stages[name][2], title))
    if "early-exit" in stages:
        sections.append(early_exit_section(stages["early-exit"][2]))
    for section in sections:
        if section:
            lines += section + [""]
    return "\n".join(lines).rstrip() + "\n"

