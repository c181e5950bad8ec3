"""benchmarks.tables: the tables in the docs are the records' numbers. Reads JSON and markdown only
(no device work)."""

import difflib
import os

import pytest

from benchmarks import tables
from tests import ROOT as REPO

RESULTS = os.path.join(REPO, "benchmarks", "results")


def _text(name: str) -> str:
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def _same_tables(name: str) -> None:
  text = _text(name)
  new = tables.fill(text)
  diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), name,
                                      "from the records"))
  assert new == text, f"{name}: run `python -m benchmarks.tables`\n{diff}"


# -- the tables ---------------------------------------------------------------------------------


def test_readme_tables_are_the_records():
  assert tables.names(_text("README.md")) == ["study_h200", "study_h200_cost",
                                               "serve_load_h200", "throughput_max_batch_h200",
                                               "throughput_quant_h200", "train_speed_h200"]
  _same_tables("README.md")


@pytest.mark.parametrize("name", [d for d in tables.DOCS if d != "README.md"])
def test_results_tables_are_the_records(name):
  # throughput.md recomputes the rooflines of 20 runs: the slow one (seconds).
  _same_tables(name)


def test_every_table_is_in_a_doc_and_every_marker_has_a_table():
  used = [n for d in tables.DOCS for n in tables.names(_text(d))]
  assert sorted(set(used)) == sorted(tables.TABLES)
  # Each name once, except a table shown in two places on purpose.
  assert sorted(n for n in set(used) if used.count(n) > 1) == ["serve_load_h200",
                                                                         "train_speed_h200"]


def test_check_names_a_stale_number_and_a_rewrite_fixes_it(tmp_path, capsys):
  text = _text("README.md")
  stale = text.replace("| 0.24 | 68,486 |", "| 0.24 | 68,000 |")
  assert stale != text
  doc = tmp_path / "doc.md"
  doc.write_text(stale)
  assert tables.main(["--check", str(doc)]) == 1
  out = capsys.readouterr().out
  assert "-| llama | cudnn | dots | 0.24 | 68,000 |" in out
  assert "+| llama | cudnn | dots | 0.24 | 68,486 |" in out
  assert doc.read_text() == stale  # --check writes nothing
  assert tables.main([str(doc)]) == 0
  assert doc.read_text() == text
  assert tables.main(["--check", str(doc)]) == 0


def test_an_unknown_table_is_named():
  with pytest.raises(KeyError, match="no_such_table"):
    tables.fill("<!-- table:no_such_table -->\n<!-- /table -->\n")


# -- record files -------------------------------------------------------------------------------


def test_a_suspect_record_is_marked_in_the_table_not_dropped():
  # The 1b lckv int8 / fp8 max-batch runs read their cache with wrapped 32-bit offsets past 4,096
  # rows (fixed in 3c9d98e): their records say so, and the README's table marks them.
  table = tables.throughput_quant_h200()
  suspect = {e["setting"] for e in tables._entries("throughput", tables.H200) if e.get("suspect")}
  for dtype in ("int8", "fp8"):
    marked = f"1b_lckv_p5_g2043_max_25.5GB_{dtype}" in suspect
    assert (f"| lckv | {dtype} (suspect) |" in table) == marked
  assert "| 7b, 24 GB, 512+1024 | lckv | int8 |" in table  # an ordinary row, unmarked
