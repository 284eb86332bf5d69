"""The benchmark scripts run (tiny sizes, CPU), so they do not rot between GPU sessions."""

import json

from benchmarks import upsample_concat


def test_upsample_concat_benchmark_runs_and_writes_json(tmp_path):
    path = tmp_path / "result.json"
    result = upsample_concat.main(["--configs", "cifar-c1", "--batch", "1", "--device", "cpu", "--no-compile",
                                   "--repeats", "1", "--min-run-time", "0.001", "--json", str(path)])
    shapes = upsample_concat.fusion_shapes("cifar-c1")
    assert len(result["rows"]) == len(shapes) == 30
    assert set(result["summary"]) == {"forward_speedup_vs_eager", "train_speedup_vs_eager"}
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["environment"]["torch"] and saved["date"]


def test_fused_conv2d_benchmark_runs_and_writes_json(tmp_path):
    from benchmarks import fused_conv2d

    path = tmp_path / "result.json"
    result = fused_conv2d.main(["--configs", "cifar-c1", "--batch", "1", "--device", "cpu", "--no-compile",
                                "--max-shapes", "3", "--repeats", "1", "--min-run-time", "0.001", "--json", str(path)])
    shapes = fused_conv2d.conv_shapes("cifar-c1")
    assert len(shapes) == len(set(shapes)) > 10
    assert [tuple(row["shape"].values()) for row in result["rows"]] == shapes[:3]
    assert set(result["summary"]) == {"forward_speedup_vs_eager"}
    assert [row["config"] for row in result["models"]] == ["cifar-c1"]
    saved = json.loads(path.read_text())
    assert saved["device"] == "cpu" and saved["environment"]["torch"] and saved["date"]
