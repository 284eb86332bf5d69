"""The GPU tables of docs/gpu.md are rendered from benchmarks/results/gpu/ and nothing else.

That the page equals what they render is tests/test_figures.py's check."""

import json
import shutil

from benchmarks import gpu_report


def test_the_block_follows_the_results(tmp_path):
    """A figure changed in a results file changes the rendered block: nothing is typed by hand."""
    for path in (gpu_report.RESULTS + "/gpu_check-2.json", gpu_report.RESULTS + "/log-2.txt"):
        shutil.copy(path, tmp_path)
    before = gpu_report.render(gpu_report.load_runs(str(tmp_path)))
    record = json.loads((tmp_path / "gpu_check-2.json").read_text())
    record["stages"]["ops"]["result"]["ceilings"]["copy_bytes_per_s"] = 1.234e12
    (tmp_path / "gpu_check-2.json").write_text(json.dumps(record))
    after = gpu_report.render(gpu_report.load_runs(str(tmp_path)))
    assert "copy 1.23 TB/s" in after and "copy 1.23 TB/s" not in before


def test_a_stopped_test_run_is_counted_from_its_log():
    log = ("[gw1] [ 10%] PASSED tests/test_a.py::test_x[cuda-(1, 10)]\n"
           "[gw2] [ 20%] FAILED tests/test_a.py::test_y[triton-(64, 10)-torch.float64]\n"
           "tests/test_b.py::test_z SKIPPED (no CUDA GPU) [ 30%]\n")
    counts = gpu_report.tests_from_log(log)
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (1, 1, 1)
    assert counts["failed_tests"] == ["tests/test_a.py::test_y[triton-(64, 10)-torch.float64]"]
