"""Figures drawn from the JSON-ready data that `stepjax.analysis.report` builds (so every PNG has
its numbers in the report's JSON). Matplotlib is imported on first use (`stepjax.figures`)."""

from __future__ import annotations

import math

import numpy as np

from stepjax import figures

COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value, digits=2):
    return "n/a" if _missing(value) else f"{value:.{digits}f}"


def plot_nsi(figure: dict, path) -> None:
    """The paper-style NSI plot: one panel per stage; per model thin per-sample curves, the mean
    curve (thick), the max (dashed) and min (dotted) envelopes.

    **Arguments:**

    - `figure`: ``{"title", "label", "stages": [{"stage", "blocks", "models": [{"label", "mean",
      "min", "max", "samples"}]}]}``.
    - `path`: the PNG to write.
    """
    plt = figures.pyplot()
    stages = figure["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        x = stage["blocks"]
        for colour, model in zip(COLOURS, stage["models"]):
            for curve in model["samples"]:
                ax.plot(x, curve, color=colour, lw=0.4, alpha=0.12)
            ax.plot(x, model["mean"], color=colour, lw=2.0, marker="o", ms=3, label=model["label"])
            ax.plot(x, model["max"], color=colour, lw=1.0, ls="--")
            ax.plot(x, model["min"], color=colour, lw=1.0, ls=":")
        ax.set_title(f"stage {stage['stage']}", fontsize=9)
        ax.set_xlabel("block within stage")
        ax.set_xticks(x if len(x) <= 18 else x[::2])
    axes[0][0].set_ylabel(figure["label"], fontsize=8)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(stages[0]["models"]),
               fontsize=7, frameon=False)
    fig.suptitle(figure["title"], fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    figures.save(fig, path, dpi=120)


def plot_step_sizes(figure: dict, path, max_columns: int = 9) -> None:
    """Step-size heatmaps: one panel per block, samples x channels, samples sorted by an
    indicator; each stage starts a new row of at most `max_columns` panels; each title gives the
    coefficient of variation across samples.

    **Arguments:**

    - `figure`: ``{"title", "sort_by", "vmin", "vmax", "stages": [{"stage", "panels": [{"block",
      "cv_samples", "matrix"}]}]}``.
    - `path`: the PNG to write.
    - `max_columns`: panels per row.
    """
    plt = figures.pyplot()
    rows = [(stage["stage"], stage["panels"][i : i + max_columns])
            for stage in figure["stages"] for i in range(0, len(stage["panels"]), max_columns)]
    cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.7 * cols + 1.4, 1.8 * len(rows) + 0.7), squeeze=False,
                             layout="constrained")
    image = None
    for row, (stage, panels) in zip(axes, rows):
        for ax in row[len(panels):]:
            ax.axis("off")
        for ax, panel in zip(row, panels):
            image = ax.imshow(panel["matrix"], aspect="auto", interpolation="nearest", cmap="viridis",
                              vmin=figure["vmin"], vmax=figure["vmax"])
            ax.set_title(f"s{stage} b{panel['block']}  CV {_fmt(panel['cv_samples'], 3)}", fontsize=6.5)
            ax.tick_params(labelsize=5)
        row[0].set_ylabel(f"samples by\n{figure['sort_by']}", fontsize=6.5)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="step size h")
    fig.suptitle(figure["title"], fontsize=9)
    figures.save(fig, path, dpi=110)


CORRELATION_COLUMNS = ("model", "indicator", "within-block mean rho [CI]", "p", "blocks p<=a",
                       "gate inputs partialled (p)", "across-block rho", "partial rho [CI]", "p")


def correlation_rows(figure: dict) -> list[list[str]]:
    """The correlation table as rows of strings (`CORRELATION_COLUMNS`)."""
    rows = []
    for r in figure["rows"]:
        within_ci = "[" + ", ".join(_fmt(v) for v in r["within_ci"]) + "]"
        partial_ci = "[" + ", ".join(_fmt(v) for v in r["partial_ci"]) + "]"
        rows.append([
            r["model"], r["indicator"] + (" *" if r["uses_step"] else ""),
            f"{_fmt(r['within_rho'])} {within_ci}", _fmt(r["within_p"], 3),
            "{}+ {}- of {}".format(*r["significant"], r["num_tested"])
            + ("" if r.get("correction") == "holm" else " (not adjusted)"),  # records made before Holm
            f"{_fmt(r.get('gate_partial_rho'))} ({_fmt(r.get('gate_partial_p'), 3)})", _fmt(r["across_rho"]),
            f"{_fmt(r['partial_rho'])} {partial_ci}", _fmt(r["partial_p"], 3),
        ])
    return rows


def mean_gate_sentence(test: dict | None) -> str:
    """One sentence on the mean-gate control's paired test (empty without one)."""
    if not test:
        return ""
    change = 100 * (test["control_accuracy"] - test["model_accuracy"])
    return (f"Mean-gate control (each gate replaced by its dataset mean): accuracy {100 * test['model_accuracy']:.2f} % "
            f"-> {100 * test['control_accuracy']:.2f} % ({change:+.2f} points) on {test['num_samples']} images; "
            f"{test['model_only_correct']} images right only with the model's own gate, "
            f"{test['control_only_correct']} only with the mean gate; {test['test']} (two-sided) "
            f"p = {test['p_value']:.3g}.")


def correlation_markdown(figure: dict) -> str:
    """The correlation table in Markdown, with its footnote (and the mean-gate control's test)."""
    lines = ["| " + " | ".join(CORRELATION_COLUMNS) + " |", "|" + " --- |" * len(CORRELATION_COLUMNS)]
    rows = correlation_rows(figure) or [["no model with varying step sizes"] + ["n/a"] * (len(CORRELATION_COLUMNS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    sentence = mean_gate_sentence(figure.get("mean_gate_test"))
    return "\n".join(lines) + "\n\n" + (sentence + "\n\n" if sentence else "") + figure["note"] + "\n"


def plot_correlations(figure: dict, path) -> None:
    """The correlation table as a PNG; the within-block cell is coloured by its value.

    **Arguments:**

    - `figure`: ``{"title", "note", "rows": [...]}`` (see `stepjax.analysis.report`).
    - `path`: the PNG to write.
    """
    plt = figures.pyplot()
    rows = correlation_rows(figure)
    height = 0.2 * (len(rows) + 1)
    fig = plt.figure(figsize=(15, height + 1.5))  # 1.2 inches below the table for the footnote
    ax = fig.add_axes((0.01, 1.2 / (height + 1.5), 0.98, height / (height + 1.5)))
    ax.axis("off")
    cmap = plt.get_cmap("RdBu_r")
    colours = [
        ["white", "white", "0.9" if _missing(r["within_rho"]) else cmap(0.5 + 0.5 * r["within_rho"])]
        + ["white"] * (len(CORRELATION_COLUMNS) - 3)
        for r in figure["rows"]
    ]
    if rows:
        table = ax.table(cellText=rows, colLabels=CORRELATION_COLUMNS, cellColours=colours, bbox=(0, 0, 1, 1),
                         cellLoc="left", colWidths=(0.24, 0.13, 0.14, 0.05, 0.08, 0.1, 0.07, 0.14, 0.05))
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    else:
        ax.text(0.5, 0.5, "no analysed model varies its step size: every correlation is undefined",
                ha="center", va="center", fontsize=9)
    fig.suptitle(figure["title"], fontsize=9)
    sentence = mean_gate_sentence(figure.get("mean_gate_test"))
    fig.text(0.01, 0.02, (sentence + " " if sentence else "") + figure["note"], fontsize=6.5, wrap=True, va="bottom")
    figures.save(fig, path, dpi=120)


LOTTERY_GROUPS = ("none", "all", "random", "nsi_top", "nsi_bottom")
LOTTERY_LABELS = {"none": "none", "all": "all", "random": "random", "nsi_top": "NSI top", "nsi_bottom": "NSI bottom"}
LOTTERY_STYLES = {"nsi_top": dict(marker="*", s=180, color="tab:red"),
                  "nsi_bottom": dict(marker="v", s=60, color="tab:purple")}


def _lottery_group(name: str) -> str:
    return "random" if name.startswith("random_") else name


def plot_lottery(figure: dict, path) -> None:
    """Strip plot of the lottery: test accuracy of every finished placement, best over epochs
    (filled) and last (hollow); random placements spread out with their mean as a bar; the
    NSI-guided placement a red star.

    **Arguments:**

    - `figure`: ``{"title", "note", "runs": [{"name", "status", "best_accuracy", "last_accuracy"}]}``.
    - `path`: the PNG to write.
    """
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = []
    for x, group in enumerate(LOTTERY_GROUPS):
        members = [r for r in figure["runs"] if _lottery_group(r["name"]) == group]
        ratio = f"\n(ratio {members[0]['ratio']:.2f})" if members else ""
        labels.append(LOTTERY_LABELS[group] + ratio)
        runs = [r for r in members if r["status"] == "done"]
        offsets = np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [0.0] * len(runs)
        for dx, r in zip(offsets, runs):
            ax.scatter(x + dx, 100 * r["best_accuracy"], zorder=3,
                       **LOTTERY_STYLES.get(group, dict(marker="o", s=30, color="k")))
            ax.scatter(x + dx, 100 * r["last_accuracy"], zorder=2, facecolors="none", edgecolors="0.5", s=30)
        if group == "random" and runs:
            ax.hlines(100 * np.mean([r["best_accuracy"] for r in runs]), x - 0.25, x + 0.25, color="tab:blue")
    ax.set_xticks(range(len(LOTTERY_GROUPS)), labels)
    ax.set_ylabel("test accuracy (%): best (filled), last (hollow)")
    pending = sum(r["status"] != "done" for r in figure["runs"])
    ax.set_title(figure["title"] + (f"\n({pending} of {len(figure['runs'])} runs not finished)" if pending else ""),
                 fontsize=9)
    fig.text(0.01, 0.01, figure["note"], fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    figures.save(fig, path, dpi=120)
