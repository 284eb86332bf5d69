"""The README's demo command end to end, shrunk to seconds."""

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
