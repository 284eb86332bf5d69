"""scripts/gpu_check.sh and benchmarks/gpu_check.py: the rehearsal of the GPU check on the CPU.

A GPU is lent for minutes, so its one prepared call must not fail for a reason the CPU could show:
the dry run runs every stage (on tiny sizes, on the CPU) through the same script, and the deadline
handling is checked here with stages that cannot fit or run too long.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["tests", "ops", "anytime", "train", "early-exit", "sanitizer", "compile"]


def test_the_stages_run_in_order_of_value(tmp_path):
    options = gpu_check.parse_args(["--out", str(tmp_path)])
    assert [stage.name for stage in gpu_check.stages(options, str(tmp_path))] == STAGES


def test_dry_run_runs_every_stage_and_keeps_its_files_few(tmp_path):
    out = tmp_path / "results"
    environment = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    environment.pop("RANET_FAST_BACKEND", None)
    completed = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=environment,
                               capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["dry_run"] is True
    assert list(record["stages"]) == STAGES
    assert {name: entry["status"] for name, entry in record["stages"].items()} == {name: "passed" for name in STAGES}
    # Every benchmark stage brought its results back, and the tests stage ran tests.
    for name in ("ops", "anytime", "train", "early-exit", "compile"):
        assert record["stages"][name]["result"]["rows"], name
    counts = record["stages"]["tests"]["tests"]
    assert counts["passed"] > 100 and counts["failures"] == counts["errors"] == 0
    # The device tool returns at most 8 files, no more than two folders down.
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8 and all((out / name).is_file() for name in files), files
    assert {"summary.md", "gpu_check.json", "log.txt"} <= set(files)
    # The table is printed last, so the reply's tail carries it.
    assert completed.stdout.rstrip().endswith((out / "summary.md").read_text().rstrip())


def test_a_stage_that_does_not_fit_before_the_deadline_is_skipped_and_named(tmp_path):
    options = gpu_check.parse_args(["--out", str(tmp_path), "--deadline", "5", "--stages", "ops", "compile"])
    assert gpu_check.Check(options).run_all(options.stages) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in ("ops", "compile"):
        assert record["stages"][name]["status"] == "skipped"
        assert "before the deadline" in record["stages"][name]["reason"]
    assert "| compile | skipped |" in (tmp_path / "summary.md").read_text()


def test_a_stage_running_into_the_deadline_is_stopped_and_the_rest_skipped(tmp_path):
    options = gpu_check.parse_args(["--out", str(tmp_path), "--deadline", "3"])
    check = gpu_check.Check(options)
    slow = gpu_check.Stage("slow", "sleeps past the deadline", 0, [sys.executable, "-c", "import time; time.sleep(60)"])
    begin = time.time()
    entry = check.run(slow)
    assert entry["status"] == "timed out" and time.time() - begin < 20
    later = gpu_check.Stage("later", "would start after the deadline", 1, [sys.executable, "-c", "pass"])
    assert check.run(later)["status"] == "skipped"


def test_unknown_stage_is_refused_with_the_list(tmp_path):
    with pytest.raises(SystemExit, match="unknown stage.*'nope'.*tests"):
        gpu_check.main(["--out", str(tmp_path), "--stages", "nope"])


@pytest.mark.parametrize("log, expected", [
    ("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n", {"sanitizer_errors": 0}),
    ("========= ERROR SUMMARY: 3 errors\n", {"sanitizer_errors": 3, "status": "failed"}),
    ("========= Error: Device not supported\n", {"status": "not supported"}),
    ("", {"status": "failed"}),  # the sanitizer wrote nothing: no process was checked
])
def test_sanitizer_outcome(tmp_path, log, expected):
    path = tmp_path / "sanitizer.log"
    path.write_text(log)
    outcome = gpu_check.sanitizer_outcome(str(path), {"status": "passed"})
    assert {key: outcome[key] for key in expected} == expected


def test_without_a_gpu_the_real_run_stops_at_once_and_says_why(tmp_path):
    environment = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PATH="/usr/bin:/bin")
    completed = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 3
    assert "gpu_check: FATAL: nvidia-smi lists no GPU" in completed.stderr
