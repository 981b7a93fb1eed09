"""Do the analysis findings repeat across seeds? One table from several analysis records.

``python -m stepjax.analysis.seeds DIR [DIR ...] [--out FILE]`` reads the record (``analysis.json.gz``) that
``python -m stepjax.analysis`` wrote in each DIR, takes every trained model in them (the analysed
one and the one it was compared with; a run analysed twice is counted once) and writes a markdown
table: one column per trained run with the headline figures of docs/ANALYSIS.md, then per model
kind (controller and network) their mean and standard deviation over the runs.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from stepjax.records import ANALYSIS_RECORD, analysis_record, read_analysis_record

NSI = "relative_increment"  # NSI candidate (a), the one docs/ANALYSIS.md plots
# the study's pairwise analyses: name -> (controller analysed, controller it is compared with), both
# trained under one protocol and seed; each has its record in results/analysis/<pair_analysis(...)>
PAIRS = {"se_vs_plain": ("se", "resnet"), "stepnet_vs_se": ("stepnet", "se")}


def pair_analysis(protocol: str, pair: str, seed: int) -> str:
    """The name of a pairwise analysis (its record and figure directory): ``deep_se_vs_plain_s1``."""
    return f"{protocol}_{pair}_s{seed}"


def _within(indicator):
    return lambda model, control: model["representational_ability"][indicator]["within_block"]["mean_rho"]


def _stage_nsi(stage):
    return lambda model, control: model["nsi_summary"][NSI][stage]["mean"]


def _stage_step(stage):
    return lambda model, control: float(np.mean(model["step_size"][stage]["mean"]))


# (column title, function of (model, its mean-gate control or None) -> number or None)
COLUMNS = [
    ("accuracy % on them", lambda m, c: 100 * m["accuracy"]),
    ("mean-gate change (points)", lambda m, c: None if c is None else 100 * (c["accuracy"] - m["accuracy"])),
    ("mean-gate exact McNemar p", lambda m, c: ((c or {}).get("paired_test") or {}).get("p_value")),
    *[(f"NSI (a) mean, stage {s + 1}", _stage_nsi(s)) for s in range(3)],
    ("NSI (a) peak, stage 3", lambda m, c: m["nsi_summary"][NSI][2]["peak"]),
    *[(f"mean step, stage {s + 1}", _stage_step(s)) for s in range(3)],
    ("within-block rho, relative derivative", _within("relative_derivative")),
    ("within-block rho, spectral radius", _within("spectral_radius")),
    ("within-block rho, implied step h*", _within("implied_step")),
]


def trained_models(report: dict) -> list[tuple[dict, dict | None]]:
    """``(model, mean-gate control or None)`` for the trained models of one analysis report."""
    models = report["models"]
    out = [(models["main"], models.get("mean_gate"))] if models["main"]["step"] else []
    if "compare" in models and models["compare"]["step"]:
        out.append((models["compare"], None))
    return out


def kind(model: dict) -> str:
    """The model's description without its training state: controller, options, network."""
    return model["label"].split(", trained")[0]


def rows(reports: list[dict]) -> list[dict]:
    """The figures of each trained run (by source directory); a run's mean-gate figure comes from the
    report that analysed it as the main model."""
    found = {}
    for report in reports:
        for model, control in trained_models(report):
            row = {"source": model["source"], "kind": kind(model), "images": model["num_samples"],
                   **{title: _number(fn(model, control)) for title, fn in COLUMNS}}
            previous = found.get(model["source"])
            if previous is None or (control is not None and previous["mean-gate change (points)"] is None):
                found[model["source"]] = row
    return sorted(found.values(), key=lambda r: (r["kind"], r["source"]))


def _number(value):
    return None if value is None else float(value)


def _cell(value, scale=None):
    """2 decimals for magnitudes from 1 up, else 3; `scale` picks the precision (a mean's, for its sd)."""
    if value is None or np.isnan(value):
        return ""
    return f"{value:.2f}" if abs(value if scale is None else scale) >= 1 else f"{value:.3f}"


def _mean_std(values: list) -> str:
    values = np.array([v for v in values if v is not None])
    if not len(values):
        return ""
    mean = values.mean()
    return _cell(mean) + (f" ± {_cell(values.std(ddof=1), scale=mean)}" if len(values) > 1 else "")


def render(table: list[dict]) -> str:
    """The markdown, one line per figure: the runs, then mean ± standard deviation per model kind
    (of every figure but the p-values)."""
    titles = [title for title, _ in COLUMNS]
    names = [f"`{Path(r['source']).name}`" for r in table]
    images = ", ".join(str(n) for n in sorted({r["images"] for r in table}))
    lines = [f"Per trained run (images analysed per run: {images}):", "", "| figure | " + " | ".join(names) + " |", "|" + " --- |" * (len(table) + 1)]
    lines += [f"| {t} | " + " | ".join(_cell(r[t]) for r in table) + " |" for t in titles]
    groups = defaultdict(list)
    for r in table:
        groups[r["kind"]].append(r)
    kinds = sorted(groups)
    lines += ["", "Mean ± standard deviation over runs:", "",
              "| figure | " + " | ".join(f"{k} (n={len(groups[k])})" for k in kinds) + " |", "|" + " --- |" * (len(kinds) + 1)]
    averaged = [t for t in titles if not t.endswith(" p")]  # a mean of p-values means nothing
    lines += [f"| {t} | " + " | ".join(_mean_std([r[t] for r in groups[k]]) for k in kinds) + " |" for t in averaged]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepjax.analysis.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help=f"analysis record directories (holding {ANALYSIS_RECORD})")
    parser.add_argument("--out", help="markdown file (default: print)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    missing = [d for d in args.dirs if analysis_record(d) is None]
    if missing:
        raise SystemExit(f"No {ANALYSIS_RECORD} in {', '.join(missing)}: run `make analyze WORKDIR=...` first.")
    text = render(rows([read_analysis_record(d) for d in args.dirs]))
    if args.out:
        Path(args.out).write_text(text)
        print("wrote", args.out)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
