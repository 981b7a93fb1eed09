"""The documents that come from runs match their records: regenerated from results/ into a
temporary folder, they equal the committed ones (figures by the digest of their data)."""

import dataclasses
import shutil
from pathlib import Path

from stepjax.docs import DIGESTS, SEED_TABLES, Drawing, generated_markdown, read_digests, regenerate, seed_tables
from stepjax.records import ANALYSIS_RECORD

REPO = Path(__file__).resolve().parents[1]


def test_docs_match_their_records(tmp_path):
    written = regenerate(REPO / "results", tmp_path, draw=False)
    assert (tmp_path / "figures" / "DIGESTS.md") in written
    for path in written:
        committed = REPO / "docs" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is generated from results/ but not committed: run `make results`"
        assert path.read_text() == committed.read_text(), (
            f"{committed} differs from what its records give: run `make results` and commit")
    names = {p.relative_to(tmp_path) for p in written}
    committed = {p.relative_to(REPO / "docs") for p in generated_markdown(REPO / "docs")}
    assert committed <= names, f"committed generated docs without a record: {sorted(committed - names)}"


def test_make_results_draws_only_the_figures_whose_data_changed(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    drawing = Drawing(True, tmp_path, {"a.png": "1", "b.png": "2"})
    assert not drawing.needed({"a.png": "1"})  # same data, file there
    assert drawing.needed({"a.png": "9"})  # new data
    assert drawing.needed({"b.png": "2"})  # file missing
    assert dataclasses.replace(drawing, redraw=True).needed({"a.png": "1"})
    assert not dataclasses.replace(drawing, draw=False).needed({"a.png": "9"})
    assert read_digests(REPO / "docs") == {  # what DIGESTS.md lists is what it is read as
        line.split("`")[1]: line.split("|")[2].strip()
        for line in (REPO / "docs" / DIGESTS).read_text().splitlines() if line.startswith("| `")}


def test_a_seed_table_is_written_from_the_records_there_and_names_the_missing(tmp_path):
    for name in ("deep_se_vs_plain_s0", "deep_se_vs_plain_s1"):
        (tmp_path / "results" / "analysis" / name).mkdir(parents=True)
        shutil.copy(REPO / "results" / "analysis" / name / ANALYSIS_RECORD, tmp_path / "results" / "analysis" / name)
    seed_tables(tmp_path / "results", tmp_path / "docs")
    assert not (tmp_path / "docs" / "figures" / "analysis" / "seeds_cpu.md").exists()  # no record of it
    table = (tmp_path / "docs" / "figures" / "analysis" / "seeds_deep.md").read_text()
    head, body = table.split("\n", 1)
    missing = [name for name in SEED_TABLES["figures/analysis/seeds_deep.md"] if not name.startswith("deep_se_vs_plain_s")]
    assert head.startswith("Not analysed") and [n.strip("`.,") for n in head.split(": ")[1].split()] == ["deep_se_vs_plain_s2", *missing]
    assert all(f"`cifar10_{c}_deep_s{s}`" in body for c in ("se", "resnet") for s in (0, 1)) and "_s2`" not in body
