"""README.md's reproduction table is what benchmarks/repro_table.py makes from RESULTS.md,
and every figure it shows is one RESULTS.md gives."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("repro_table",
                                                  REPO / "benchmarks" / "repro_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["repro_table"] = module
    spec.loader.exec_module(module)
    return module


rt = _load()
RESULTS = (REPO / "benchmarks" / "RESULTS.md").read_text()


def test_readme_table_is_in_sync_with_the_script():
    readme = (REPO / "README.md").read_text()
    assert rt.replace_block(readme, rt.render()) == readme, (
        "README.md's reproduction table is out of date: run "
        "python benchmarks/repro_table.py --write")
    assert rt.main(["--check"]) == 0


def test_every_row_is_cited_faithfully():
    assert rt.problems(rt.ROWS, RESULTS) == []
    sections = rt.sections(RESULTS)
    for row in rt.ROWS:
        assert row.section in sections


def test_every_row_has_its_six_cells():
    table = rt.render().splitlines()
    assert table[0].strip("| ").split(" | ") == list(rt.COLUMNS)
    assert len(table) == 2 + len(rt.ROWS)
    for line in table[2:]:
        assert line.count(" | ") == len(rt.COLUMNS) - 1


def test_the_commands_use_the_readers_data_directory():
    table = rt.render()
    assert "../shared/data" not in table
    assert "--data-dir $METAJAX_DATA_DIR" in table


def test_short_runs_are_labelled():
    for row in rt.ROWS:
        if "60 minutes" in row.difference:
            assert "**short run**" in row.difference, row.benchmark


@pytest.mark.parametrize(
    "change, message",
    [
        ({"metajax": "97.24 +/- 0.28%"}, "figure '97.24 +/- 0.28'"),
        ({"paper": "98.9%"}, "number '98.9'"),
        ({"section": "No such section"}, "no section"),
        ({"commands": ("metajax train omniglot-5w1s-maml --steps 7",)}, "command"),
    ],
)
def test_a_figure_not_in_results_is_refused(change, message):
    row = dataclasses.replace(rt.ROWS[1], **change)
    found = rt.problems((row,), RESULTS)
    assert found and message in found[0]


def test_check_fails_on_a_stale_readme(tmp_path, capsys):
    readme = (REPO / "README.md").read_text()
    stale = tmp_path / "README.md"
    assert "| 97.57 +/- 0.56% |" in readme
    stale.write_text(readme.replace("| 97.57 +/- 0.56% |", "| 97.00 +/- 0.56% |", 1))
    assert rt.main(["--check", "--readme", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert rt.main(["--write", "--readme", str(stale)]) == 0
    assert stale.read_text() == readme
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing\n")
    assert rt.main(["--check", "--readme", str(no_markers)]) == 2


def test_a_section_heading_inside_a_code_fence_is_not_a_section():
    text = "pre\n## A\nbody\n```bash\n## not a heading\n```\n## B\nmore\n"
    found = rt.sections(text)
    assert set(found) == {"", "A", "B"} and "## not a heading" in found["A"]
