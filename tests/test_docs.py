"""The documents that come from runs match their records: regenerated from results/ into a
temporary folder, they equal the committed ones (figures by the digest of their data)."""

from pathlib import Path

from stepjax.docs import generated_markdown, regenerate

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
