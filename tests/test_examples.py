"""The guide's example runs end to end (tiny sizes): convert, train with the trainer's loop, calibrate,
real early exit."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_custom_early_exit_example_runs():
    done = subprocess.run(
        [sys.executable, os.path.join("examples", "custom_early_exit.py"), "--train-samples", "64",
         "--val-samples", "64", "--test-samples", "48", "--epochs", "1", "--width", "4", "--batch-size", "32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ranet_fast.convert: ") and "0 left alone" in lines[0]
    summary = json.loads(next(line for line in lines if line.startswith("summary "))[len("summary "):])
    assert len(summary["exit_counts"]) == 3 and sum(summary["exit_counts"]) == 48
    # The stem and both downsampling convs fused, and the three dense blocks are RANet's fast ones.
    assert summary["converted"]["conv-bn-relu"] == 3 and summary["converted"]["FastBlockNormal"] == 3
    assert 0 < summary["flops_per_image"] <= summary["full_flops_per_image"]
    assert len(summary["thresholds"]) == 3


def test_backbone_early_exit_example_runs():
    done = subprocess.run(
        [sys.executable, os.path.join("examples", "backbone_early_exit.py"), "--train-samples", "64",
         "--val-samples", "64", "--test-samples", "48", "--epochs", "1", "--blocks", "1", "--width", "8",
         "--batch-size", "32", "--repeats", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ranet_fast.convert: ") and "0 left alone" in lines[0]
    summary = json.loads(next(line for line in lines if line.startswith("summary "))[len("summary "):])
    assert len(summary["exit_counts"]) == 4 and sum(summary["exit_counts"]) == 48
    # The stem and every BasicBlock's two convs fused (in the stages' Sequentials and the blocks' traced forwards).
    assert summary["converted"] == {"conv-bn-relu": 5, "conv-bn": 7, "graph": 4}
    assert 0 < summary["flops_per_image"] <= summary["full_flops_per_image"]
    assert summary["realised_speedup"] > 0 and set(summary["seconds"]) == {"full", "early_exit"}
