"""The GPU check's stages, in order of value, under one deadline (scripts/gpu_check.sh calls this).

    python -m benchmarks.gpu_check --out gpu_results --deadline 500 [--dry-run] [--stages tests ops ...]

A GPU is lent rarely and briefly (15 minutes of device time, at most 10 minutes a call), so its
calls must bring back everything: correctness first
(the GPU tests at real sizes), then the figures (every op on every backend against eager with its
roofline floor, anytime inference, the training step, real early exit), then the memory checker and
torch.compile, which cost most per figure. Each stage runs as a subprocess; it starts only if its
estimate fits in the time left before the deadline, runs with the time left as its limit, and its
log and results are written under ``--out`` as soon as it ends, so a call cut short still returns
what finished. ``--dry-run`` runs every stage on the CPU at tiny sizes: a rehearsal that catches a
typo before a GPU's minutes are spent (tests/test_gpu_check.py runs it).

Estimates are from the first H200 calls (2026-12-04: build 32-43 s, the GPU tests ~110 s on 12
workers, the op benchmark ~60 s per op, most of it Triton compiling per shape). All stages need
about 12 minutes, more than one call may take: in a 15-minute lease use two calls,
``--stages tests ops sanitizer`` (deadline 520) and ``--stages anytime train early-exit compile``.

Files under ``--out`` (at most 8, no sub-folders): ``summary.md`` (the table printed last),
``gpu_check.json`` (environment, every stage's status, timing and results), ``log.txt`` (every
stage's output), ``failures.txt`` (each failing test with its traceback, written as it fails),
``sanitizer.log`` (compute-sanitizer's own report) and whatever the caller adds
(scripts/gpu_check.sh: ``build.log``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

from .common import geometric_mean

# The tests stage runs every test marked gpu (tests/conftest.py marks each one skipped for want of
# a GPU). compute-sanitizer runs a small subset (each sanitised CUDA launch is slow): one case per op.
SANITIZED_TESTS = ["tests/test_gpu_realistic.py::test_gather_rows_real_state",
                   "tests/test_gpu_realistic.py::test_exit_ops_real_sizes",
                   "tests/test_gpu_realistic.py::test_upsample_concat_real_shapes",
                   "tests/test_gpu_realistic.py::test_batch_norm_ops_real_shapes",
                   "tests/test_gpu_realistic.py::test_fused_conv2d_real_shapes"]
# Under the sanitizer: the smallest parametrisations only (bf16, NCHW and the channel slice).
SANITIZED_SELECT = "real_state or (bfloat16 and (exit_ops or (nchw and (256x144 or 256-16))))"


@dataclasses.dataclass
class Stage:
    name: str
    what: str
    estimate_s: float  # on an H200, including start-up; the deadline check uses it
    command: list[str]
    limit_s: float | None = None  # stopped after this long even if the deadline is further off
    environment: dict = dataclasses.field(default_factory=dict)
    result_json: str | None = None  # a file the command writes, folded into gpu_check.json
    junit_xml: str | None = None


def python() -> list[str]:
    return [sys.executable]


def stages(options, scratch: str) -> list[Stage]:
    dry = options.dry_run
    device = "cpu" if dry else "cuda"
    result = lambda name: os.path.join(scratch, f"{name}.json")  # noqa: E731 - a path per stage
    suite = python() + ["-m", "benchmarks", "suite", "--device", device]
    if dry:
        # A narrow C-1 on two images: every code path of the suite, seconds on a CPU.
        suite += ["--override", "nChannels=4", "growthRate=4", "--batch", "2", "--repeats", "1", "--warmup", "0",
                  "--min-time", "0.001", "--dtype", "fp32", "--val-images", "8"]
    else:
        suite += ["--dtype", "bf16", "--channels-last", "--repeats", "3", "--min-time", "0.1"]
    gpu_contenders = ["eager", "ranet_fast", "optimize", "optimize-graphs"]
    cpu_contenders = ["eager", "ranet_fast", "optimize"]
    contenders = cpu_contenders if dry else gpu_contenders
    test_environment = {"RANET_FAST_REALISTIC_DEVICE": "cpu"} if dry else {}
    xdist = [] if dry or not _has_module("xdist") else ["-n", str(min(12, os.cpu_count() or 1))]
    # A hung kernel must cost one test, not the call.
    per_test_timeout = ["--timeout", "60"] if _has_module("pytest_timeout") else []
    pytest = python() + ["-m", "pytest", "-rs", "--tb=short", "-p", "no:cacheprovider"]
    failure_log = {"RANET_FAST_FAILURE_LOG": os.path.abspath(os.path.join(options.out, "failures.txt"))}
    return [
        Stage("tests", "GPU tests: every op at real sizes vs float64, and every op/layer test's CUDA cases", 150,
              pytest + xdist + per_test_timeout + ["-v", "--junitxml", os.path.join(scratch, "tests.xml"), "-m", "gpu",
                                                   "tests"],
              # The figures of the later stages are worth more than the last of 1,300 tests.
              limit_s=options.tests_limit, environment={**test_environment, **failure_log},
              junit_xml=os.path.join(scratch, "tests.xml")),
        Stage("ops", "every op on every backend vs eager, with roofline floors (C-1, C-3, ImageNet-1)", 150,
              python() + ["-m", "benchmarks", "op_backends", "--device", device, "--json", result("ops")]
              + (["--dtypes", "fp32", "--configs", "cifar-c1", "--batch", "2", "--max-shapes", "1", "--repeats", "1",
                  "--min-run-time", "0.001", "--small-ceilings"] if dry else
                 ["--dtypes", "bf16", "--configs", "cifar-c1", "cifar-c3", "imagenet-1", "--batch", "256",
                  "--max-shapes", "3"]),
              result_json=result("ops")),
        Stage("anytime", "C-1 and C-3 anytime inference: eager, ranet_fast, optimize (+ CUDA graphs)", 80,
              suite + ["--workloads", "anytime", "--configs", "cifar-c1"] + ([] if dry else ["cifar-c3"])
              + ([] if dry else ["--batch", "256", "1024"]) + ["--contenders", *contenders, "--json", result("anytime")],
              result_json=result("anytime")),
        Stage("train", "C-3 training step: eager vs ranet_fast, images/s and peak memory", 45,
              suite + ["--workloads", "train-step", "--configs", "cifar-c1" if dry else "cifar-c3"]
              + ([] if dry else ["--batch", "64", "256"]) + ["--contenders", "eager", "ranet_fast",
                                                             "--json", result("train")],
              result_json=result("train")),
        Stage("early-exit", "real early exit: realised vs FLOPs-predicted speed-up (C-1, C-3)", 60,
              python() + ["-m", "benchmarks", "early_exit", "--device", device, "--json", result("early-exit")]
              + (["--configs", "cifar-c1", "--batch", "4", "--val-images", "8", "--repeats", "1",
                  "--min-run-time", "0.001", "--budgets", "0.5"] if dry else
                 # host_syncs="once" (one device-to-host read per batch) against the per-exit engine.
                 ["--configs", "cifar-c1", "cifar-c3", "--batch", "16", "256", "--dtype", "bf16",
                  "--layout", "channels_last", "--min-run-time", "0.2", "--host-syncs", "per_exit", "once"]),
              result_json=result("early-exit")),
        Stage("sanitizer", "compute-sanitizer memcheck on one real-size case per op", 90,
              sanitizer_command(options, pytest) if not dry else
              pytest + ["--collect-only", *SANITIZED_TESTS, "-k", SANITIZED_SELECT],
              environment={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", **test_environment}),
        Stage("compile", "anytime inference vs torch.compile of the eager model (C-1, C-3 at batch 256)", 150,
              suite + ["--workloads", "anytime", "--configs", "cifar-c1"] + ([] if dry else ["cifar-c3"])
              + ([] if dry else ["--batch", "256"]) + ["--contenders", "eager", "optimize", "compile",
                                                       "--json", result("compile")],
              # Inductor compiles RANet for minutes on a CPU: the rehearsal runs the stage's own code
              # with torch.compile a no-op.
              environment={"TORCHDYNAMO_DISABLE": "1"} if dry else {}, result_json=result("compile")),
    ]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(_glob("/usr/local/cuda-*"))):
        candidate = os.path.join(root, "bin", "compute-sanitizer")
        if root and os.access(candidate, os.X_OK):
            return candidate
    return None


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern)


def sanitizer_command(options, pytest: list[str]) -> list[str]:
    sanitizer = find_sanitizer() or "compute-sanitizer"
    return [sanitizer, "--tool", "memcheck", "--target-processes", "all", "--log-file",
            os.path.join(options.out, "sanitizer.log"), "--print-limit", "50", *pytest, *SANITIZED_TESTS,
            "-k", SANITIZED_SELECT]


# ---------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------


class Check:
    def __init__(self, options):
        self.options = options
        self.started = options.start_time or time.time()
        self.deadline = self.started + options.deadline
        os.makedirs(options.out, exist_ok=True)
        self.log_path = os.path.join(options.out, "log.txt")
        self.record = {"dry_run": options.dry_run, "deadline_s": options.deadline, "started": self.started,
                       "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "commit": os.environ.get("RANET_FAST_COMMIT") or _git_commit(),
                       "environment": _environment(), "stages": {}}

    def remaining(self) -> float:
        return self.deadline - time.time()

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(text + "\n")

    def save(self) -> None:
        path = os.path.join(self.options.out, "gpu_check.json")
        with open(path + ".tmp", "w") as handle:
            json.dump(self.record, handle, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def run(self, stage: Stage) -> dict:
        remaining = self.remaining()
        entry = {"what": stage.what, "estimate_s": stage.estimate_s, "command": " ".join(stage.command)}
        if stage.estimate_s * self.options.estimate_scale > remaining:
            entry.update(status="skipped", reason=f"estimate {stage.estimate_s * self.options.estimate_scale:.0f} s "
                                                  f"> {max(remaining, 0):.0f} s left before the deadline")
            self.log(f"== {stage.name}: SKIPPED ({entry['reason']})")
            return entry
        self.log(f"== {stage.name}: {stage.what} ({remaining:.0f} s left)\n$ {entry['command']}")
        log_start = os.path.getsize(self.log_path)
        begin = time.time()
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **stage.environment)
        try:
            with open(self.log_path, "a") as handle:
                # A session of its own, so that the deadline stops its children too (pytest's
                # workers, compile workers), not only the process started here.
                process = subprocess.Popen(stage.command, stdout=handle, stderr=subprocess.STDOUT, env=environment,
                                           start_new_session=True)
                try:
                    limit = remaining if stage.limit_s is None else min(remaining, stage.limit_s)
                    entry["returncode"] = process.wait(timeout=max(1.0, limit))
                    entry["status"] = "passed" if entry["returncode"] == 0 else "failed"
                except subprocess.TimeoutExpired:
                    # SIGINT first: pytest then writes its report and the benchmarks their output.
                    os.killpg(process.pid, signal.SIGINT)
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                    entry.update(status="timed out", reason=f"stopped after {limit:.0f} s (its limit or the deadline)")
        except OSError as error:
            entry.update(status="failed", reason=f"could not start: {error}")
        entry["seconds"] = time.time() - begin
        if stage.result_json and os.path.exists(stage.result_json):
            with open(stage.result_json) as handle:
                entry["result"] = json.load(handle)
        if stage.junit_xml and os.path.exists(stage.junit_xml):
            entry["tests"] = junit_counts(stage.junit_xml)
        elif stage.junit_xml:
            with open(self.log_path) as handle:
                handle.seek(log_start)
                entry["tests"] = tests_from_log(handle.read())
        if stage.name == "sanitizer" and not self.options.dry_run:
            entry.update(sanitizer_outcome(os.path.join(self.options.out, "sanitizer.log"), entry))
        self.log(f"== {stage.name}: {entry['status'].upper()} in {entry['seconds']:.0f} s")
        return entry

    def run_all(self, selected: list[str] | None) -> int:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            for stage in stages(self.options, scratch):
                if selected and stage.name not in selected:
                    continue
                self.record["stages"][stage.name] = self.run(stage)
                self.save()
        summary = summary_table(self.record)
        with open(os.path.join(self.options.out, "summary.md"), "w") as handle:
            handle.write(summary + "\n")
        self.log(summary)
        failed = [name for name, entry in self.record["stages"].items() if entry["status"] in ("failed", "timed out")]
        return 1 if failed else 0


TEST_OUTCOMES = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")


def tests_from_log(text: str) -> dict:
    """Counts of the outcome lines pytest -v printed: what a stopped run (no JUnit file) still tells."""
    counts = dict.fromkeys(TEST_OUTCOMES, 0)
    failed = []
    for line in text.splitlines():
        words = line.split()
        outcome = next((word for word in words if word in TEST_OUTCOMES), None)
        if outcome is None:
            continue
        # "[gw3] [ 12%] PASSED tests/x.py::test[id]" (xdist) or "tests/x.py::test[id] PASSED [ 12%]";
        # parametrisation ids may hold spaces.
        before, after = line.split(outcome, 1)
        node = after.strip() if "::" in after else before.strip()
        if "::" not in node:
            continue
        counts[outcome] += 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(node)
    return {"tests": sum(counts.values()), "passed": counts["PASSED"], "failures": counts["FAILED"],
            "errors": counts["ERROR"], "skipped": counts["SKIPPED"], "failed_tests": failed[:100],
            "source": "pytest -v lines of a stopped run"}


def junit_counts(path: str) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('classname')}::{case.get('name')}" for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts["failed_tests"] = failed[:100]
    return counts


def sanitizer_outcome(log_path: str, entry: dict) -> dict:
    """memcheck's error count, or 'not supported' where the runtime refuses the sanitizer."""
    text = open(log_path).read() if os.path.exists(log_path) else ""
    if "Device not supported" in text or "Target application terminated before first instrumented API call" in text:
        return {"status": "not supported", "reason": "compute-sanitizer refused this device/runtime"}
    errors = [int(line.split()[3]) for line in text.splitlines() if "ERROR SUMMARY:" in line
              and line.split()[3].isdigit()]
    outcome = {"sanitizer_errors": sum(errors), "sanitized_processes": len(errors)}
    if entry.get("status") == "passed" and (sum(errors) or not errors):
        outcome["status"] = "failed"
    return outcome


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _environment() -> dict:
    from ranet_fast.env import environment_info

    info = environment_info()
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


# ---------------------------------------------------------------------------
# The table printed last
# ---------------------------------------------------------------------------


def headline(name: str, entry: dict) -> str:
    """One line of the stage's most important figures."""
    result = entry.get("result") or {}
    if name == "tests" and "tests" in entry:
        counts = entry["tests"]
        text = f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
        return text + ("; first failures: " + ", ".join(counts["failed_tests"][:3]) if counts["failed_tests"] else "")
    if name == "ops" and "summary" in result:
        ceilings = result["ceilings"]
        parts = [f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul "
                 f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s"]
        for key, summary in result["summary"].items():
            vs_eager = ", ".join(f"{n} {v:.2f}x" for n, v in summary["geomean_vs_eager"].items() if n != "eager")
            parts.append(f"{key}: vs eager {vs_eager}; eager {summary['geomean_x_floor'].get('eager', float('nan')):.1f}"
                         f"x floor")
        return " | ".join(parts)
    if name in ("anytime", "train", "compile") and "rows" in result:
        lines = []
        for row in result["rows"]:
            if row["contender"] == "eager":
                continue
            line = f"{row['config']} b{row['batch']} {row['contender']} {row['vs_eager']:.2f}x eager"
            if row.get("vs_best_compile"):
                line += f", {row['vs_best_compile']:.2f}x compile"
            lines.append(line)
        return "; ".join(lines)
    if name == "early-exit" and "rows" in result:
        ratios = [b["realised_over_predicted"] for row in result["rows"] for b in row["budgets"]]
        return (f"realised/predicted speed-up {min(ratios):.2f}..{max(ratios):.2f} "
                f"(geomean {geometric_mean(ratios):.2f}) over {len(ratios)} budgets" if ratios else "")
    if name == "sanitizer" and "sanitizer_errors" in entry:
        return f"{entry['sanitizer_errors']} errors in {entry['sanitized_processes']} processes"
    return entry.get("reason", "")


def summary_table(record: dict) -> str:
    environment = record["environment"]
    lines = [f"# GPU check ({'dry run on the CPU' if record['dry_run'] else ', '.join(environment['gpus'])})", "",
             f"torch {environment['torch']}, triton {environment['triton']}, commit {record['commit']}, "
             f"deadline {record['deadline_s']:.0f} s", "", "| stage | status | seconds | headline |",
             "|---|---|---|---|"]
    for name, entry in record["stages"].items():
        seconds = f"{entry['seconds']:.0f}" if "seconds" in entry else "-"
        lines.append(f"| {name} | {entry['status']} | {seconds} | {headline(name, entry)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_results", help="results folder (default gpu_results)")
    parser.add_argument("--deadline", type=float, default=500.0, help="seconds from --start-time (default 500)")
    parser.add_argument("--start-time", type=float, help="epoch seconds the deadline counts from (default: now)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
    parser.add_argument("--stages", nargs="+", help="run only these stages (default: all, in order of value)")
    parser.add_argument("--tests-limit", type=float, default=200, help="seconds the tests stage may take at most")
    parser.add_argument("--estimate-scale", type=float, default=1.0,
                        help="multiply the stages' time estimates (0 runs every stage whatever the deadline)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    names = [stage.name for stage in stages(options, "")]
    unknown = sorted(set(options.stages or []) - set(names))
    if unknown:
        raise SystemExit(f"gpu_check: unknown stage(s) {unknown}; the stages are {names}")
    if options.dry_run and options.estimate_scale == 1.0:
        options.estimate_scale = 0.0  # a rehearsal runs every stage: the estimates are a GPU's
    return Check(options).run_all(options.stages)


if __name__ == "__main__":
    sys.exit(main())
