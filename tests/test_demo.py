"""The README's demo command end to end, shrunk to seconds."""

import json
import os

from ranet_fast import demo


def test_demo_trains_evaluates_and_reports_exits_by_difficulty(tmp_path, capsys):
    demo.main(["--save", str(tmp_path), "--epochs", "1", "--synthetic-size", "128,64,64",
               "--nChannels", "4", "--growthRate", "4", "-j", "0", "-b", "32"])
    out = capsys.readouterr().out
    assert "anytime (test split)" in out and "dynamic" in out
    assert "easy images (" in out and "hard images (" in out
    assert os.path.getsize(tmp_path / "accuracy_vs_flops.png") > 0
    assert (tmp_path / "results.json").exists()
    # Real early exit on the same 64 test images and thresholds as the simulated table: the same
    # exit and prediction for every image, so the same accuracy, printed side by side.
    assert "real early exit on the same 64 test images" in out
    report = json.loads((tmp_path / demo.EARLY_EXIT_JSON).read_text())
    assert report["images"] == report["batch"] == 64 and report["torch_threads"] >= 1 and "commit" in report
    assert [budget["p"] for budget in report["budgets"]] == list(demo.REAL_EXIT_BUDGETS)
    for budget in report["budgets"]:
        assert budget["images_exiting_elsewhere"] == 0 and budget["images_predicted_differently"] == 0
        assert budget["real_top1"] == budget["simulated_top1"]
        assert budget["real_flops_per_image"] == budget["simulated_flops_per_image"]
        assert budget["realised_speedup"] > 0 and budget["predicted_speedup"] >= 1
