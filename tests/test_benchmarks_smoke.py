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
