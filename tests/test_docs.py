"""The documents that come from runs match their records: regenerated from results/ into a
temporary folder, they equal the committed ones (figures by the digest of their data)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from stepjax.docs import (
    DIGESTS,
    SEED_TABLES,
    Drawing,
    generated_markdown,
    lottery_seed_tables,
    read_digests,
    regenerate,
    seed_tables,
)
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


def _lottery(seed, accuracies, blocks=None):
    title = "lottery ticket in SAM: x, connection ratio 0.4" + (f", seed {seed}" if seed else "")
    return {"title": title, "note": "NSI note.", "contrasts": {},
            "runs": [{"name": name, "status": "done", "best_accuracy": acc, "blocks": (blocks or {}).get(name, [1, 2])}
                     for name, acc in accuracies.items()]}


def test_a_lottery_from_several_training_seeds_gets_its_contrasts_paired_by_seed(tmp_path):
    from scipy import stats

    runs = {0: {"none": 0.78, "nsi_top": 0.77, "nsi_bottom": 0.79, "all": 0.80, "random_0": 0.785},
            1: {"none": 0.775, "nsi_top": 0.78, "nsi_bottom": 0.795, "all": 0.797},
            2: {"none": 0.77, "nsi_top": 0.775, "nsi_bottom": 0.792, "all": 0.801}}
    for seed, accuracies in runs.items():
        folder = tmp_path / "results" / "lottery" / ("x_ratio0.4" + (f"_s{seed}" if seed else ""))
        folder.mkdir(parents=True)
        (folder / "lottery.json").write_text(json.dumps(_lottery(seed, accuracies)))
    alone = tmp_path / "results" / "lottery" / "y_ratio0.4"  # one seed only: no table
    alone.mkdir()
    (alone / "lottery.json").write_text(json.dumps(_lottery(0, runs[0])))
    lottery_seed_tables(tmp_path / "results", tmp_path / "docs")
    written = sorted(p.name for p in (tmp_path / "docs" / "figures" / "analysis").iterdir())
    assert written == ["lottery_seeds_x_ratio0.4.md"]
    table = (tmp_path / "docs" / "figures" / "analysis" / written[0]).read_text()
    diffs = [-2.0, -1.5, -1.7]  # nsi_top - nsi_bottom, seeds 0-2
    row = next(line for line in table.splitlines() if line.startswith("| `nsi_top` - `nsi_bottom`"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] == "-2.00 (s0), -1.50 (s1), -1.70 (s2)"
    assert cells[1] == f"{sum(diffs) / 3:+.2f} ± {stats.tstd(diffs):.2f}" and cells[2] == "3"
    assert float(cells[3]) == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue, abs=5e-4)
    assert "| `random_0` | 78.50 | - | - |" in table and "each placement has the same blocks" in table
    # a seed whose ranking chose other blocks is named: its pairing is not of one placement
    folder = tmp_path / "results" / "lottery" / "x_ratio0.4_s2"
    (folder / "lottery.json").write_text(json.dumps(_lottery(2, runs[2], blocks={"nsi_top": [5, 6]})))
    lottery_seed_tables(tmp_path / "results", tmp_path / "docs")
    assert "**differ between seeds** for `nsi_top`." in (tmp_path / "docs" / "figures" / "analysis" / written[0]).read_text()
