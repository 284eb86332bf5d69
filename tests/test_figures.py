"""Every figure in README.md and docs/ is rendered from a committed results file, and every link resolves."""

import glob
import json
import os
import re
import shutil

import pytest

from benchmarks import figures

PAGES = figures.pages()
# [text](target): the target up to a space or the closing parenthesis; images too.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_published_tables_equal_what_the_results_render(capsys):
    assert figures.main(["--check"]) == 0, capsys.readouterr().err + "\nrun: python -m benchmarks.figures"


def test_every_figure_is_published_and_every_marker_names_a_figure():
    marked = {match["name"] for page in PAGES for match in figures.MARKER.finditer(open(page).read())}
    assert marked == set(figures.FIGURES)
    readme = open(os.path.join(figures.ROOT, "README.md")).read()
    assert "<!-- figures:suite-cpu:begin -->" in readme, "the README's one results table"


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_every_results_file_says_where_its_figures_came_from(name):
    paths = figures.source_files(figures.FIGURES[name])
    assert paths, f"figure {name} has no results file"
    for path in paths:
        record = json.load(open(path))
        assert figures.missing_provenance(record) == [], path



@pytest.mark.parametrize("path", sorted(
    os.path.relpath(path, figures.RESULTS) for folder in (figures.RESULTS, os.path.join(figures.RESULTS, "gpu"))
    for path in glob.glob(os.path.join(folder, "*.json"))))
def test_every_committed_results_file_says_where_it_came_from(path):
    """Published or not: device, threads (CPU runs), versions, commit and date, so any figure can be."""
    with open(os.path.join(figures.RESULTS, path)) as handle:
        assert figures.missing_provenance(json.load(handle)) == [], path

def _copy_results(tmp_path, names):
    for name in names:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        shutil.copy(os.path.join(figures.RESULTS, name), tmp_path / name)
    shutil.copytree(os.path.join(figures.RESULTS, "gpu"), tmp_path / "gpu")


def test_a_tampered_results_file_fails_the_check_naming_page_table_and_file(tmp_path, capsys):
    names = [name for figure in figures.FIGURES.values() for name in figure.files if "*" not in name]
    _copy_results(tmp_path, names)
    assert figures.main(["--check", "--results", str(tmp_path)]) == 0, capsys.readouterr().err

    path = tmp_path / "suite-cpu-c1-fp32-train-path.json"
    record = json.loads(path.read_text())
    optimize = next(r for r in record["rows"] if r["workload"] == "anytime" and r["contender"] == "optimize")
    optimize["vs_eager"] = 1.51
    path.write_text(json.dumps(record))

    assert figures.main(["--check", "--results", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "README.md: table 'suite-cpu' differs from suite-cpu-c1-fp32-train-path.json" in error
    assert "early-exit" not in error and "gpu" not in error, "only the tampered table differs"
    assert "(1.51x)" in figures.FIGURES["suite-cpu"].render(str(tmp_path))


def test_a_results_file_without_its_thread_count_is_refused(tmp_path, capsys):
    _copy_results(tmp_path, [name for figure in figures.FIGURES.values() for name in figure.files if "*" not in name])
    path = tmp_path / "early_exit-cpu.json"
    record = json.loads(path.read_text())
    del record["torch_threads"]
    path.write_text(json.dumps(record))

    assert figures.main(["--check", "--results", str(tmp_path)]) == 1
    assert "early_exit-cpu.json (figure early-exit-cpu) lacks torch_threads" in capsys.readouterr().err


def test_provenance_requires_date_commit_versions_and_device():
    assert figures.missing_provenance({}) == ["date", "commit", "environment.torch", "environment.triton",
                                              "device", "torch_threads"]
    on_gpu = {"date": "d", "commit": "c", "environment": {"torch": "t", "triton": "x", "gpus": ["H200"]}}
    assert figures.missing_provenance(on_gpu) == []


def test_readme_is_a_five_minute_read():
    assert len(open(os.path.join(figures.ROOT, "README.md")).read().splitlines()) <= 250


@pytest.mark.parametrize("page", [os.path.relpath(p, figures.ROOT) for p in PAGES])
def test_every_relative_link_resolves(page):
    text = open(os.path.join(figures.ROOT, page)).read()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    directory = os.path.dirname(os.path.join(figures.ROOT, page))
    missing = [t for t in targets if not os.path.exists(os.path.join(directory, t.split("#")[0]))]
    assert missing == [], f"{page} links to files that do not exist"


def test_every_docs_page_is_linked_from_the_readme():
    readme = open(os.path.join(figures.ROOT, "README.md")).read()
    docs = [os.path.relpath(page, figures.ROOT) for page in PAGES if os.path.dirname(page) == figures.DOCS]
    assert docs, "no pages under docs/"
    for page in docs:
        assert f"({page})" in readme, page
