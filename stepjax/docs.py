"""``python -m stepjax.docs`` (``make results``): every document and figure that comes from runs,
regenerated from the records in ``results/`` alone.

What is generated is data (`REPORTS`, `SEED_TABLES`): the accuracy reports from training records,
the analysis figures from ``results/analysis/<name>/analysis.json.gz``, the lottery strip plots from
``results/lottery/<name>/lottery.json``, the across-seed tables of the analyses and of the lotteries. Beside the
figures, ``docs/figures/DIGESTS.md`` lists a digest of each figure's data, so a test can tell that
a committed figure still matches its record without comparing pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from stepjax import results
from stepjax.analysis import figures, lottery, seeds
from stepjax.analysis.report import render_report
from stepjax.records import ANALYSIS_RECORD, analysis_record, digest, read_analysis_record


@dataclasses.dataclass(frozen=True)
class Report:
    """An accuracy report: the records under `roots` (relative to the results tree) -> `out`."""

    roots: tuple[str, ...]
    out: str
    figure: str
    title: str
    per_run: bool = False


REPORTS = (
    Report(("study", "deep", "gpu"), "RESULTS.md", "figures/results_curves.png", "Results"),
    Report(("pilot",), "RESULTS_PILOTS.md", "figures/pilot_curves.png",
           "Pilot runs (settings other than the study's, trained to size the CPU protocols)", per_run=True),
)
# across-seed tables of the analyses: table -> analysis records (results/analysis/<name>): the study's
# pairs, and at depth StepNet seed 2 against the constant-step control (docs/ANALYSIS.md 3.13), whose
# SE seed 2 was trained in a checkout that is gone
SEED_TABLES = {f"figures/analysis/seeds_{protocol}.md": [seeds.pair_analysis(protocol, pair, seed)
                                                          for pair in seeds.PAIRS for seed in (0, 1, 2)] + extra
               for protocol, extra in (("cpu", []), ("deep", ["deep_stepnet_s2_vs_channel_step_s0", "deep_channel_step_s1_vs_s0",
                                                    "deep_channel_step_s2_vs_s0", "deep_stepnet_vs_se_s3",
                                                    "deep_stepnet_vs_se_s4", "deep_channel_step_s4_vs_s3",
                                                    "deep_plain_s4_vs_s3"]))}
DIGESTS = "figures/DIGESTS.md"
LOTTERY_SEEDS = "figures/analysis/lottery_seeds_{name}.md"
LOST_NOTE = ("Runs reported before 2026-11-30 whose records are lost (their figures kept, each marked "
             "\"record lost\"): [lost/RESULTS.md](lost/RESULTS.md), [lost/RESULTS_PILOTS.md](lost/RESULTS_PILOTS.md).")


@dataclasses.dataclass(frozen=True)
class Drawing:
    """Which figures to draw: all (`redraw`), none (`draw` off, as in the drift test), or those whose
    data digest differs from the one `previous` lists (or whose file is missing)."""

    draw: bool
    docs_dir: Path
    previous: dict[str, str]
    redraw: bool = False

    def needed(self, digests: dict[str, str]) -> bool:
        return self.draw and (self.redraw or any(
            self.previous.get(name) != value or not (self.docs_dir / name).exists() for name, value in digests.items()))


def accuracy_report(report: Report, results_dir: Path, docs_dir: Path, drawing: Drawing) -> dict[str, str]:
    """Write one accuracy report; returns its figures' data digests (figure path -> digest)."""
    roots = [results_dir / root for root in report.roots if (results_dir / root).is_dir()]
    records = results.collect(*roots)
    out = docs_dir / report.out
    if not records:
        out.write_text(f"# {report.title}\n\nNo run records yet under "
                       f"{', '.join(f'`results/{r}`' for r in report.roots)}.\n\n{LOST_NOTE}\n")
        return {}

    def named(path):
        return str(Path(path).relative_to(docs_dir))

    _, digests = results.write_report(records, out, docs_dir / report.figure, title=report.title,
                                      per_run=report.per_run,
                                      draw=lambda path, value: drawing.needed({named(path): value}))
    out.write_text(out.read_text() + f"\n{LOST_NOTE}\n")
    return {named(path): value for path, value in digests.items()}


def analysis_figures(results_dir: Path, docs_dir: Path, drawing: Drawing) -> dict[str, str]:
    """Draw every analysis record into ``figures/analysis/<name>/``; returns the data digests."""
    all_digests = {}
    for path in sorted((results_dir / "analysis").glob(f"*/{ANALYSIS_RECORD}")):
        report = read_analysis_record(path)
        digests = {f"figures/analysis/{path.parent.name}/{name}.png": digest(figure)
                   for name, figure in report["figures"].items()}
        render_report(report, docs_dir / "figures" / "analysis" / path.parent.name, draw=drawing.needed(digests))
        all_digests.update(digests)
    return all_digests


def lottery_figures(results_dir: Path, docs_dir: Path, drawing: Drawing) -> dict[str, str]:
    """Draw every lottery record into ``figures/analysis/lottery_<name>/``; returns the data digests."""
    digests = {}
    for path in sorted((results_dir / "lottery").glob("*/lottery.json")):
        figure = json.loads(path.read_text())
        name = f"figures/analysis/lottery_{path.parent.name}/lottery.png"
        (docs_dir / name).parent.mkdir(parents=True, exist_ok=True)
        digests[name] = digest(figure)
        if drawing.needed({name: digests[name]}):
            figures.plot_lottery(figure, docs_dir / name)
    return digests


def lottery_seed_tables(results_dir: Path, docs_dir: Path) -> None:
    """Write ``figures/analysis/lottery_seeds_<name>.md`` (`results.lottery_seed_table`) for every lottery
    trained from more than one training seed (``<name>``, ``<name>_s1``, ...)."""
    groups: dict[str, dict[int, dict]] = {}
    for path in sorted((results_dir / "lottery").glob("*/lottery.json")):
        name, seed = lottery.lottery_seed(path.parent.name)
        groups.setdefault(name, {})[seed] = json.loads(path.read_text())
    for name, by_seed in groups.items():
        if len(by_seed) > 1:
            out = docs_dir / LOTTERY_SEEDS.format(name=name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(results.lottery_seed_table(by_seed))


def seed_tables(results_dir: Path, docs_dir: Path) -> None:
    """Write the across-seed tables (`SEED_TABLES`) from the analysis records that exist, naming the
    ones that do not."""
    for table, names in SEED_TABLES.items():
        paths = {name: analysis_record(results_dir / "analysis" / name) for name in names}
        found = [read_analysis_record(p) for p in paths.values() if p is not None]
        if found:
            missing = [f"`{name}`" for name, p in paths.items() if p is None]
            head = f"Not analysed (no record in results/analysis/): {', '.join(missing)}.\n\n" if missing else ""
            (docs_dir / table).parent.mkdir(parents=True, exist_ok=True)
            (docs_dir / table).write_text(head + seeds.render(seeds.rows(found)))


def read_digests(docs_dir: Path) -> dict[str, str]:
    """The figure digests listed in ``docs_dir``'s `DIGESTS` (empty where there is none)."""
    path = docs_dir / DIGESTS
    rows = path.read_text().splitlines() if path.exists() else []
    return {cells[1].strip(" `"): cells[2].strip() for cells in (row.split("|") for row in rows)
            if len(cells) == 4 and cells[1].strip().startswith("`")}


def regenerate(results_dir: str | Path = "results", docs_dir: str | Path = "docs", *, draw: bool = True,
               redraw: bool = False) -> list[Path]:
    """Regenerate every run-derived document and figure from the records.

    **Arguments:**

    - `results_dir`: the results tree (``results/``). Paths in the documents are written relative
      to its parent (the repository), wherever the process runs.
    - `docs_dir`: where the documents go (``docs/``; a temporary folder in the drift test).
    - `draw`: draw the figures whose data changed (digest unlike the listed one) or whose file is
      missing; off, only the markdown and the figures' data digests are written (what the drift
      test compares, in seconds).
    - `redraw`: draw every figure.

    **Returns:**

    The markdown files written.
    """
    results_dir, docs_dir = Path(results_dir).resolve(), Path(docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    drawing = Drawing(draw, docs_dir, read_digests(docs_dir), redraw)
    here = Path.cwd()
    os.chdir(results_dir.parent)  # records are named as `results/...` in the documents
    try:
        relative = Path(results_dir.name)
        digests = {}
        for report in REPORTS:
            digests.update(accuracy_report(report, relative, docs_dir, drawing))
        digests.update(analysis_figures(relative, docs_dir, drawing))
        digests.update(lottery_figures(relative, docs_dir, drawing))
        seed_tables(relative, docs_dir)
        lottery_seed_tables(relative, docs_dir)
    finally:
        os.chdir(here)
    lines = ["# Figure data digests", "", "Generated by `make results`: a digest of the data behind each figure "
             "(`stepjax.records.digest`), so that a test can tell a figure still matches its record.", "",
             "| figure | data digest |", "| --- | --- |", *(f"| `{k}` | {v} |" for k, v in sorted(digests.items()))]
    (docs_dir / DIGESTS).parent.mkdir(parents=True, exist_ok=True)
    (docs_dir / DIGESTS).write_text("\n".join(lines) + "\n")
    return generated_markdown(docs_dir)


def generated_markdown(docs_dir: str | Path) -> list[Path]:
    """The markdown files that `regenerate` writes under `docs_dir` (for the drift test)."""
    docs_dir = Path(docs_dir)
    names = [r.out for r in REPORTS] + [DIGESTS] + [t for t in SEED_TABLES if (docs_dir / t).exists()]
    names += [str(p.relative_to(docs_dir)) for p in sorted(docs_dir.glob("figures/analysis/*/correlations.md"))]
    names += [str(p.relative_to(docs_dir)) for p in sorted(docs_dir.glob(LOTTERY_SEEDS.format(name="*")))]
    return [docs_dir / name for name in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="the results tree (default results)")
    parser.add_argument("--docs", default="docs", help="where the documents go (default docs)")
    parser.add_argument("--redraw", action="store_true",
                        help="draw every figure (default: those whose data changed or whose file is missing)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        parser.error(f"no results tree at {args.results}; run from the repository root or pass --results DIR")
    for path in regenerate(args.results, args.docs, redraw=args.redraw):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
