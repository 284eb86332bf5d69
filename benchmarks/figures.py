"""Every published figure, rendered from the committed result files.

    python -m benchmarks.figures            # rewrite the tables in README.md and docs/*.md
    python -m benchmarks.figures --check    # exit 1, naming each page and table that differs

A page marks a generated table with two lines, ``<!-- figures:NAME:begin -->`` and
``<!-- figures:NAME:end -->``; everything between them is what ``FIGURES[NAME]`` renders from its
result files under ``benchmarks/results/``. tests/test_figures.py keeps every page equal to what
this renders, so no figure in the documentation is typed by hand.

A table is only rendered from a file that says where its figures came from (``missing_provenance``):
date, commit, torch and Triton versions, the device, and for a CPU measurement the torch thread
count (a ratio measured at one thread says little about two).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
from typing import Callable

from . import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = os.path.join(ROOT, "docs")
PAGES = ("README.md", "docs/*.md")
MARKER = re.compile(r"<!-- figures:(?P<name>[\w-]+):begin -->\n(?P<body>.*?)<!-- figures:(?P=name):end -->",
                    re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Figure:
    files: tuple[str, ...]  # paths relative to the results directory; a glob for the GPU check's calls
    render: Callable[[str], str]  # results directory -> the Markdown between the markers


def _load(results: str, name: str) -> dict:
    with open(os.path.join(results, name)) as handle:
        return json.load(handle)


def missing_provenance(record: dict) -> list[str]:
    """The provenance fields a result file lacks; an empty list when it says where it came from."""
    environment = record.get("environment") or {}
    missing = [field for field in ("date", "commit") if not record.get(field)]
    missing += [f"environment.{name}" for name in ("torch", "triton") if not environment.get(name)]
    on_gpu = bool(environment.get("gpus"))
    if not (on_gpu or record.get("device") or record.get("device_name")):
        missing.append("device")
    if not on_gpu and not record.get("torch_threads"):
        missing.append("torch_threads")
    return missing


def _source_line(name: str, record: dict) -> str:
    environment = record["environment"]
    device = record.get("device_name") or record["device"]
    if "torch_threads" in record and "torch threads" not in device:
        device += f", {record['torch_threads']} torch threads"
    commit = record["commit"][:10] + ("-dirty" if record["commit"].endswith("-dirty") else "")
    return (f"`benchmarks/results/{name}`: {device}, torch {environment['torch']}, "
            f"triton {environment['triton']}, commit {commit}, {record['date']}")


def render_suite_cpu(results: str) -> str:
    """C-1's anytime forward, early exit and training step: images/s of each contender and its ratio to eager."""
    name = "suite-cpu-c1-fp32-train-path.json"
    record = _load(results, name)
    options = record["options"]
    contenders = [c for c in options["contenders"] if c != "eager"]
    by_workload: dict[str, dict[str, dict]] = {}
    for row in record["rows"]:
        workload = row["workload"].replace("-", " ")
        if row["workload"] == "early-exit":
            workload += f", p = {row['p']}" if row["p"] is not None else ", full network"
        by_workload.setdefault(workload, {})[row["contender"]] = row
    lines = [f"RANet C-1, {record['dtype']}, {record['layout'].upper()}, batch {options['batch'][0]}, random weights, "
             f"images/s (medians of {options['repeats']} interleaved samples) and the ratio to eager; early exit at "
             "budget parameter p, thresholds calibrated on other random images.", "",
             "| workload | eager | " + " | ".join(contenders) + " |", "|---|---|" + "---|" * len(contenders)]
    for workload, rows in by_workload.items():
        cells = [f"{rows[c]['images_per_s']:.0f} ({rows[c]['vs_eager']:.2f}x)" if c in rows else "-"
                 for c in contenders]
        lines.append(f"| {workload} | {rows['eager']['images_per_s']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Source: " + _source_line(name, record) + "."]
    return "\n".join(lines) + "\n"


def render_early_exit_cpu(results: str) -> str:
    """Realised against FLOPs-predicted speed-up of real early exit, per model, batch and budget,
    and the engine's own cost per exit (python -m benchmarks early_exit)."""
    name = "early_exit-cpu.json"
    record = _load(results, name)
    budgets = [budget["p"] for budget in record["rows"][0]["budgets"]]
    lines = ["Per cell: FLOPs-predicted speed-up / realised speed-up (realised / predicted). Engine: the "
             "early-exit bookkeeping per exit (decision, result writes, compaction), in microseconds, when "
             "nobody leaves and at p = 1.", "",
             "| model | batch | full network, images/s | engine, us per exit | "
             + " | ".join(f"p = {p:g}" for p in budgets) + " |",
             "|---|---|---|---|" + "---|" * len(budgets)]
    for row in record["rows"]:
        engine = row["engine_us_per_exit"]
        cells = [f"{b['predicted_speedup']:.2f}x / {b['realised_speedup']:.2f}x ({b['realised_over_predicted']:.2f})"
                 for b in row["budgets"]]
        lines.append(f"| {row['config']} ({row['image_size']} px) | {row['batch']} | {row['batch'] / row['full_s']:.1f} | "
                     f"{engine['nobody_leaves']:.0f} / {engine['p=1']:.0f} | " + " | ".join(cells) + " |")
    summary = record["summary"]
    lines += ["", f"Source: {_source_line(name, record)}; realised / predicted: minimum "
              f"{summary['realised_over_predicted_min']:.2f}, geometric mean "
              f"{summary['realised_over_predicted_geomean']:.2f}; batch 1 against the full network: minimum "
              f"{summary['batch1_speedup_min']:.2f}x."]
    return "\n".join(lines) + "\n"


def render_demo_early_exit(results: str) -> str:
    """The demo's real early exit beside its simulation, on the same test images (ranet_fast.demo)."""
    name = "demo-early_exit-cpu.json"
    record = _load(results, name)
    lines = [f"The demo's trained model, {record['images']} synthetic test images in one batch, the thresholds of "
             f"its simulated budget table; times are medians of {record['repeats']} interleaved runs against "
             "the plain forward of the batch.", "",
             "| budget p | top-1 % simulated | top-1 % real | images at another exit | MFLOPs/image | "
             "FLOPs-predicted speed-up | realised speed-up | realised / predicted |",
             "|---|---|---|---|---|---|---|---|"]
    for budget in record["budgets"]:
        lines.append(f"| {budget['p']:.2f} | {budget['simulated_top1']:.2f} | {budget['real_top1']:.2f} | "
                     f"{budget['images_exiting_elsewhere']} | {budget['real_flops_per_image'] / 1e6:.2f} | "
                     f"{budget['predicted_speedup']:.2f}x | {budget['realised_speedup']:.2f}x | "
                     f"{budget['realised_over_predicted']:.2f} |")
    lines += ["", "Source: " + _source_line(name, record) + "."]
    return "\n".join(lines) + "\n"


def render_gpu(results: str) -> str:
    """What the GPU check (scripts/gpu_check.sh) measured, call by call."""
    return gpu_report.render(gpu_report.load_runs(os.path.join(results, "gpu")))


FIGURES = {
    "suite-cpu": Figure(("suite-cpu-c1-fp32-train-path.json",), render_suite_cpu),
    "early-exit-cpu": Figure(("early_exit-cpu.json",), render_early_exit_cpu),
    "demo-early-exit": Figure(("demo-early_exit-cpu.json",), render_demo_early_exit),
    "gpu": Figure(("gpu/gpu_check-*.json",), render_gpu),
}


def source_files(figure: Figure, results: str = RESULTS) -> list[str]:
    return sorted(path for pattern in figure.files for path in glob.glob(os.path.join(results, pattern)))


def pages(root: str = ROOT) -> list[str]:
    return sorted(path for pattern in PAGES for path in glob.glob(os.path.join(root, pattern)))


def render_page(text: str, results: str = RESULTS) -> str:
    """The page with every marked table replaced by what its result files render."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in FIGURES:
            raise KeyError(f"no figure named {name!r} in benchmarks/figures.py (known: {', '.join(FIGURES)})")
        return f"<!-- figures:{name}:begin -->\n{FIGURES[name].render(results)}<!-- figures:{name}:end -->"

    return MARKER.sub(replace, text)


def differences(text: str, results: str = RESULTS) -> list[str]:
    """The names of the marked tables whose text is not what their result files render."""
    rendered = dict((m["name"], m["body"]) for m in MARKER.finditer(render_page(text, results)))
    return [m["name"] for m in MARKER.finditer(text) if m["body"] != rendered[m["name"]]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's tables differ from the results")
    parser.add_argument("--results", default=RESULTS, help="the results directory (default: the committed one)")
    options = parser.parse_args(argv)
    problems = []
    for name, figure in FIGURES.items():
        for path in source_files(figure, options.results):
            missing = missing_provenance(_load(options.results, os.path.relpath(path, options.results)))
            if missing:
                problems.append(f"{os.path.relpath(path, ROOT)} (figure {name}) lacks {', '.join(missing)}")
    for page in pages():
        text = open(page).read()
        if options.check:
            problems += [f"{os.path.relpath(page, ROOT)}: table {name!r} differs from "
                         f"{', '.join(FIGURES[name].files)}" for name in differences(text, options.results)]
        else:
            with open(page, "w") as handle:
                handle.write(render_page(text, options.results))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems and options.check:
        print("run: python -m benchmarks.figures", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
