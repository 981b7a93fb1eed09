"""The documents that come from runs match their records: regenerated from results/ into a
temporary folder, they equal the committed ones (figures by the digest of their data)."""

import dataclasses
from pathlib import Path

from stepjax.docs import DIGESTS, Drawing, generated_markdown, read_digests, regenerate

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
