"""The benchmark scripts run (tiny sizes, CPU), so they do not rot between GPU sessions."""

import json

from benchmarks import batch_norm_relu, convert, early_exit, fused_conv2d, gather_rows, upsample_concat


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
    assert set(row["forward_s"]) == {"converted", "eager"} and row["converted"]["FastDenseBlock"] == 2
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "convert" and saved["device"] == "cpu" and saved["environment"]["torch"]
