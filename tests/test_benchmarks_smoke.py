"""The benchmarks run (tiny sizes, CPU), so they do not rot between GPU sessions."""

import importlib
import json

import pytest
import torch

from benchmarks import __main__ as benchmarks_cli
from benchmarks import (batch_norm_relu, convert, early_exit, exit_confidence, exit_partition, fused_conv2d,
                        gather_rows, scatter_exits, upsample_concat)


def test_upsample_concat_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "result.json"
    result = upsample_concat.main(["--configs", "cifar-c1", "--batch", "1", "--device", "cpu", "--no-compile",
                                   "--repeats", "1", "--min-run-time", "0.001", "--json", str(path)])
    shapes = upsample_concat.fusion_shapes("cifar-c1")
    assert len(result["rows"]) == len(shapes) == 30
    assert set(result["summary"]) == {"forward_speedup_vs_eager", "train_speedup_vs_eager"}
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["environment"]["torch"] and saved["date"]


def test_gather_rows_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "result.json"
    result = gather_rows.main(["--configs", "cifar-c1", "--batch", "2", "--device", "cpu", "--repeats", "1",
                               "--min-run-time", "0.001", "--json", str(path)])
    (row,) = result["rows"]
    # The first layer's 3 scales, the 12 blocks, and the positions vector.
    assert row["tensors"] == len(gather_rows.live_shapes("cifar-c1")) + 1 == 16
    assert row["kept"] == 1 and set(row["seconds"]) == {"gather_rows", "loop", "copy"}
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["environment"]["torch"] and saved["date"]


def test_early_exit_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "early_exit.json"
    result = early_exit.main(["--configs", "cifar-c1", "--batch", "8", "--budgets", "0.5", "1.5",
                              "--val-images", "16", "--device", "cpu", "--repeats", "1",
                              "--min-run-time", "0.001", "--json", str(path)])
    (row,) = result["rows"]
    assert [budget["p"] for budget in row["budgets"]] == [0.5, 1.5]
    for budget in row["budgets"]:
        assert sum(budget["exit_counts"]) == 8
        assert budget["predicted_speedup"] == row["flops_per_exit"][-1] / budget["flops_per_image"]
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "early_exit" and saved["summary"]["realised_over_predicted_min"] > 0


def test_fused_conv2d_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "result.json"
    result = fused_conv2d.main(["--configs", "cifar-c1", "--batch", "1", "--device", "cpu", "--no-compile",
                                "--max-shapes", "3", "--repeats", "1", "--min-run-time", "0.001", "--json", str(path)])
    shapes = fused_conv2d.conv_shapes("cifar-c1")
    assert len(shapes) == len(set(shapes)) > 10
    assert [tuple(row["shape"].values()) for row in result["rows"]] == shapes[:3]
    assert set(result["summary"]) == {"forward_speedup_vs_eager", "train_speedup_vs_eager"}
    assert all(set(row["train_s"]) == {"fused", "eager"} for row in result["rows"])
    assert [row["config"] for row in result["models"]] == ["cifar-c1"]
    (model,) = result["models"]
    # The converted model's training step saves less for backward than the eager one.
    assert 0 < model["saved_activation_mib"]["fused"] < model["saved_activation_mib"]["eager"]
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["environment"]["torch"] and saved["date"]


def test_batch_norm_relu_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "result.json"
    result = batch_norm_relu.main(["--configs", "cifar-c1", "--batch", "2", "--device", "cpu", "--no-compile",
                                   "--max-shapes", "3", "--repeats", "1", "--min-run-time", "0.001", "--json",
                                   str(path)])
    shapes = batch_norm_relu.bn_shapes("cifar-c1")
    assert len(shapes) == len(set(shapes)) > 10
    assert [tuple(row["shape"].values()) for row in result["rows"]] == shapes[:3]
    assert set(result["summary"]) == {"forward_speedup_vs_eager", "train_speedup_vs_eager"}
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "batch_norm_relu" and saved["device"] == "cpu" and saved["environment"]["torch"]


def test_convert_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "result.json"
    result = convert.main(["--models", "densenet-small", "--batch", "2", "--size", "32", "--device", "cpu",
                           "--no-compile", "--repeats", "1", "--min-run-time", "0.001", "--json", str(path)])
    (row,) = result["rows"]
    seconds = row["forward_s"]
    assert set(seconds) == {"converted", "eager", "eager copy"} and row["converted"]["FastDenseBlock"] == 2
    # One round: each ratio is that round's.
    assert row["speedup"] == seconds["eager"] / seconds["converted"]
    assert row["control_ratio"] == seconds["eager"] / seconds["eager copy"]
    assert result["summary"]["control_min"] == result["summary"]["control_max"] == row["control_ratio"]
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "convert" and saved["device"] == "cpu" and saved["environment"]["torch"]


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    from benchmarks.common import paired_ratio

    # Rounds of different speed: per round a takes 2, 1.5 and 2 times b's time; the ratio of the
    # two medians (3 / 2) would mix rounds.
    samples = {"a": [1.0, 3.0, 6.0], "b": [0.5, 2.0, 3.0]}
    assert paired_ratio(samples, "a", "b") == 2.0


# Not named "benchmark": pytest-benchmark, where installed, owns a fixture of that name.
@pytest.mark.parametrize("exit_op_module", [exit_confidence, exit_partition, scatter_exits],
                         ids=lambda module: module.__name__.rpartition(".")[2])
def test_exit_op_benchmark_checks_every_backend_and_writes_json(tmp_path, exit_op_module):
    path = tmp_path / "result.json"
    result = exit_op_module.main(["--rows", "5", "64", "--classes", "3", "--device", "cpu", "--repeats", "1",
                             "--min-run-time", "0.001", "--json", str(path)])
    backends = result["backends"]
    assert backends[-1] == "reference" and backends == [
        name for name in ("cuda", "triton", "cpu", "reference") if name in backends]
    assert [(row["num_rows"], row["num_classes"]) for row in result["rows"]] == [(5, 3), (64, 3)]
    for row in result["rows"]:
        assert set(row["seconds"]) == set(backends) and all(value > 0 for value in row["seconds"].values())
        assert set(row["speedup_vs_reference"]) == set(backends) - {"reference"}
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == exit_op_module.__name__.rpartition(".")[2] and saved["device"] == "cpu"
    assert saved["torch_threads"] == torch.get_num_threads() and saved["environment"]["torch"] and saved["date"]


def test_exit_op_benchmark_refuses_a_backend_that_disagrees_with_the_reference(monkeypatch):
    # The check before timing is what makes a figure mean something: a wrong backend stops the run.
    real = exit_confidence.exit_confidence

    def off_by_one_prediction(logits, backend=None):
        confidence, prediction = real(logits, backend=backend)
        return confidence, prediction + (backend != "reference")

    monkeypatch.setattr(exit_confidence, "exit_confidence", off_by_one_prediction)
    with pytest.raises(AssertionError, match="predictions differ"):
        exit_confidence.main(["--rows", "4", "--classes", "3", "--device", "cpu", "--repeats", "1",
                              "--min-run-time", "0.001"])


def test_the_command_line_lists_the_benchmarks_and_runs_one_by_name(capsys):
    assert benchmarks_cli.main([]) == 2  # no name: the list, as an error
    listing = capsys.readouterr().out
    assert all(name in listing for name in benchmarks_cli.BENCHMARKS)
    assert benchmarks_cli.main(["no-such-benchmark"]) == 2
    assert benchmarks_cli.main(["exit_confidence", "--rows", "2", "--classes", "2", "--device", "cpu",
                                "--repeats", "1", "--min-run-time", "0.001"]) == 0
    assert "speed-up vs reference" in capsys.readouterr().out
    # Every listed name is a module with a main.
    for name in benchmarks_cli.BENCHMARKS:
        assert callable(importlib.import_module(f"benchmarks.{name}").main)
