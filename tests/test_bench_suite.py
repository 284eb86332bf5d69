"""The benchmark suite (python -m benchmarks) runs end to end on CPU with a tiny model, so it never rots.

torch.compile is left out: compiling even the tiny model takes minutes on a small CPU.
"""

import json
import os

import pytest

from benchmarks import suite

TINY = ["--override", "nChannels=4", "growthRate=4", "step=2", "--batch", "2", "--repeats", "1", "--warmup", "0",
        "--min-time", "0.001", "--device", "cpu"]


def test_suite_writes_json_with_every_figure_and_the_plots(tmp_path):
    path, plots = tmp_path / "suite.json", tmp_path / "plots"
    result = suite.main([*TINY, "--contenders", "eager", "ranet_fast", "optimize", "--budgets", "0.5",
                         "--val-images", "16", "--json", str(path), "--plot", str(plots)])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["benchmark"] == "suite" and saved["date"] and saved["device"] == "cpu" and saved["device_name"]
    assert saved["environment"]["torch"] and "commit" in saved and saved["memory_method"]
    rows = saved["rows"]
    by_workload = {w: [r for r in rows if r["workload"] == w] for w in suite.WORKLOADS}
    assert [r["contender"] for r in by_workload["anytime"]] == ["eager", "ranet_fast", "optimize"]
    assert [r["contender"] for r in by_workload["train-step"]] == ["eager", "ranet_fast"]  # optimize: inference only
    # Early exit: the budget and the full network (p None) per contender.
    assert [(r["contender"], r["p"]) for r in by_workload["early-exit"]] == [
        (name, p) for name in ("eager", "ranet_fast", "optimize") for p in (0.5, None)]
    for row in rows:
        assert row["config"] == "cifar-c1" and row["batch"] == 2
        assert row["images_per_s"] == pytest.approx(2 / row["seconds_per_call"]) and row["images_per_s"] > 0
        assert len(row["samples_s"]) == 1
        assert row["peak_memory_bytes"] > 0 and row["peak_memory_total_bytes"] is None  # CPU: no absolute figure
        assert row["vs_best_compile"] is None and row["launches"] is None  # no compile contender; CPU
        if row["contender"] == "eager":
            assert row["vs_eager"] == 1
    for row in by_workload["anytime"]:
        assert row["first_call_s"] > 0 and row["max_relative_error"] < 1e-5
    for row in by_workload["early-exit"]:
        assert sum(row["exit_counts"]) == 2 and row["mflops_per_image"] > 0
    assert by_workload["early-exit"][1]["exit_counts"][-1] == 2  # p None: everybody runs to the last exit
    for row in by_workload["train-step"]:
        assert row["first_loss"] > 0 and row["first_loss_relative_error"] < 1e-5
    expected_plots = {"anytime-cifar-c1.png", "train-step-cifar-c1.png", "early-exit-cifar-c1-b2.png"}
    assert set(os.listdir(plots)) == expected_plots
    assert sorted(saved["plots"]) == sorted(str(plots / name) for name in expected_plots)
    assert all(os.path.getsize(plots / name) > 1000 for name in expected_plots)


def test_ratios_are_to_eager_and_to_the_best_compile_contender_of_the_same_case():
    rows = [{"workload": "anytime", "config": "c", "batch": 1, "contender": name, "images_per_s": speed}
            for name, speed in (("eager", 10.0), ("optimize", 30.0), ("compile", 15.0), ("compile-max-autotune", 20.0))]
    rows.append({"workload": "anytime", "config": "c", "batch": 2, "contender": "optimize", "images_per_s": 5.0})
    suite.add_ratios(rows)
    assert [r["vs_eager"] for r in rows] == [1.0, 3.0, 1.5, 2.0, None]
    assert [r["vs_best_compile"] for r in rows] == [0.5, 1.5, 0.75, 1.0, None]


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--device", "cpu", "--contenders", "optimize-graphs"])
    assert "needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.parse_args(["--override", "nChannels"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--configs", "cifar-c9"])
