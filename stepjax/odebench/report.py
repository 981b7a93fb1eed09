"""Comparison of controllers per problem, the verdict, and the JSON / PNG / markdown output.

The report (`ODE_BENCH_RESULTS.md` and its figures) is a function of the record alone:
`regenerate` rebuilds it from `results.json` without solving anything.
"""

import dataclasses
import json
import math
import pathlib
import re

import numpy as np

from stepjax.figures import pyplot
from stepjax.figures import save as save_figure

from .workprecision import Curve, cost_ratio, error_levels

WIN_RATIO = 0.85  # at least 15 % fewer NFE than the best classical controller
WIN_LEVELS = 3  # ... at this many of the error levels
WIN_FAMILIES = 2  # ... on this many stiff families
NONSTIFF_MAX_RATIO = 1.05
CRITERION = (
    f"on held-out problems, at least {1 - WIN_RATIO:.0%} fewer NFE than the best classical controller (tuned PID "
    f"included) at matched global error, at {WIN_LEVELS} of 4 error levels, on at least {WIN_FAMILIES} stiff families; "
    f"no more than {NONSTIFF_MAX_RATIO}x its NFE at any level on the never-trained non-stiff sanity set; "
    "no failed solve."
)
RECORD_DIR = "results/odebench"  # where `python -m stepjax.odebench` files its record (under $STEPJAX_RESULTS)
QUICK_RECORD_DIR = "runs/odebench_quick"  # ... and `--quick` its own


def _geomean(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.exp(np.mean(np.log(x)))) if x.size else float("nan")


def compare(curves: dict, learned: str, classical: list, n_levels: int = 4) -> dict:
    """Compare the learned controller with every classical one on one problem.

    Each pair is matched at `n_levels` errors spread over the range both curves reach.
    The best classical controller is the one against which the learned controller's
    geometric-mean NFE ratio is highest, i.e. the hardest baseline.

    **Arguments:**

    - `curves`: controller name -> [`Curve`][].
    - `learned`: name of the learned controller's curve.
    - `classical`: names of the classical curves.
    - `n_levels`: number of matched-error levels.

    **Returns:** a dict with the best classical name, its levels and the learned/best
    NFE ratio per level, the number of levels at or below `WIN_RATIO`, the classical
    controllers whose errors never meet the learned one's (`unmatched`), geometric-mean
    NFE and wall-time ratios against every classical controller, and failure counts.
    """
    pairs = {}
    for name in classical:
        levels = error_levels([curves[learned], curves[name]], n_levels)
        pairs[name] = (levels, cost_ratio(curves[learned], curves[name], levels), cost_ratio(curves[learned], curves[name], levels, cost="wall_time"))
    matched = [name for name, (levels, _, _) in pairs.items() if levels.size]
    best = max(matched, key=lambda name: _geomean(pairs[name][1]), default=None)
    levels, ratios, _ = pairs[best] if best else (np.array([]), np.array([]), None)
    return {
        "levels": levels.tolist(),
        "best_classical": best,
        "unmatched": [name for name in classical if name not in matched],
        "ratios": ratios.tolist(),
        "wins": int(np.sum(ratios <= WIN_RATIO)),
        "vs": {name: _geomean(pairs[name][1]) for name in classical},
        "wall_vs": {name: _geomean(pairs[name][2]) for name in classical},
        "failures": {name: c.failures for name, c in curves.items()},
    }


def verdict(results: list) -> dict:
    """Apply the win criterion (`CRITERION`) to the per-problem comparisons.

    A stiff family counts as won when every one of its held-out problems has at least
    `WIN_LEVELS` levels at or below `WIN_RATIO`. The learned controller wins overall when
    at least `WIN_FAMILIES` stiff families are won, the never-trained non-stiff problems
    (the sanity set) stay at or below `NONSTIFF_MAX_RATIO` at every level, and it never
    fails. A problem with a classical controller that could not be matched in error counts
    against it. Held-out members of a trained non-stiff family (Lorenz) are not part of the
    sanity set; their worst ratio is reported beside it.

    **Arguments:** `results`: dicts with `family`, `stiff`, `sanity` and `comparison`.

    **Returns:** a dict with the families won, the non-stiff check, failures, `win`, and
    a sentence summarising it.
    """
    families = {}
    for r in results:
        if r["stiff"]:
            won = r["comparison"]["wins"] >= WIN_LEVELS and not r["comparison"]["unmatched"]
            families[r["family"]] = families.get(r["family"], True) and won
    won = sorted(f for f, ok in families.items() if ok)
    sanity = [r for r in results if r["sanity"]]
    worst = _worst_ratio(sanity)
    trained_nonstiff = [r for r in results if not r["stiff"] and not r["sanity"]]
    worst_trained = _worst_ratio(trained_nonstiff)
    nonstiff_ok = bool(sanity) and worst <= NONSTIFF_MAX_RATIO
    failures = sum(r["comparison"]["failures"].get("learned", 0) for r in results)
    win = len(won) >= WIN_FAMILIES and nonstiff_ok and failures == 0
    tuned = _geomean([r["comparison"]["vs"].get("tuned PID", np.nan) for r in results])
    summary = (
        f"{'WIN' if win else 'NO WIN'}: stiff families won {len(won)}/{len(families)} "
        f"({', '.join(won) or 'none'}; need {WIN_FAMILIES}); worst ratio on the never-trained non-stiff "
        f"sanity set ({_names(sanity)}) {worst:.3f} (limit {NONSTIFF_MAX_RATIO})"
        + (f"; worst on held-out members of trained non-stiff families ({_names(trained_nonstiff)}) {worst_trained:.3f}, not part of the criterion" if trained_nonstiff else "")
        + f"; learned failures {failures}; geometric-mean NFE ratio to the tuned PID over all held-out problems {tuned:.3f}."
    )
    return {"stiff_families_won": won, "stiff_families": sorted(families), "worst_nonstiff_ratio": worst, "worst_trained_nonstiff_ratio": worst_trained, "nonstiff_ok": nonstiff_ok, "learned_failures": failures, "win": win, "geomean_vs_tuned": tuned, "summary": summary}


def _worst_ratio(results: list) -> float:
    """Highest learned / best-classical ratio over `results`; inf if a baseline was unmatched."""
    worst = (math.inf if r["comparison"]["unmatched"] else float(np.nanmax(r["comparison"]["ratios"] or [math.inf])) for r in results)
    return max(worst, default=math.nan)


def _names(results: list) -> str:
    return ", ".join(dict.fromkeys(r["family"] for r in results)) or "none"


def verdict_words(results: list, judged: dict) -> list:
    """The verdict in words, one paragraph per question, from the numbers alone.

    **Arguments:** `results` and `judged` as for [`verdict`][].

    **Returns:** a list of markdown paragraphs.
    """
    groups = {"stiff": [r for r in results if r["stiff"]], "non-stiff": [r for r in results if not r["stiff"]]}
    words = []
    for label, rows in groups.items():
        if not rows:
            continue
        per_problem = "; ".join(
            f"{r['problem']} {_fmt(min(r['comparison']['ratios'], default=math.nan))}–{_fmt(max(r['comparison']['ratios'], default=math.nan))}"
            f" vs {r['comparison']['best_classical']}"
            for r in rows
        )
        best = _geomean([x for r in rows for x in r["comparison"]["ratios"]])
        words.append(f"- **{label.capitalize()} held-out problems** (learned / best classical NFE, range over the error levels): {per_problem}. Geometric mean {_fmt(best)}.")
    vs = {name: _geomean([r["comparison"]["vs"].get(name, np.nan) for r in results]) for name in ("tuned PID", "PI34", "PI34-shrink")}
    words.append(
        f"- **Against single baselines** (geometric mean over all held-out problems and levels): tuned PID {_fmt(vs['tuned PID'])}, "
        f"PI34 {_fmt(vs['PI34'])}, PI34-shrink {_fmt(vs['PI34-shrink'])}. The learned controller starts from PI34; "
        "the PI34-shrink ablation shows how much of any gain a classical controller gets just by being allowed to shrink "
        "the step after an accepted step."
    )
    versus_tuned = [r["comparison"]["vs"].get("tuned PID", np.nan) for r in results]
    ahead = [r["problem"] for r, x in zip(results, versus_tuned) if x < 1 / 1.05]
    behind = [r["problem"] for r, x in zip(results, versus_tuned) if x > 1.05]
    standing = (
        f"Against the tuned PID (same training budget) it needs at least 5 % fewer NFE on {len(ahead)} of {len(results)} "
        f"held-out problems ({', '.join(ahead) or 'none'}), at least 5 % more on {len(behind)} ({', '.join(behind) or 'none'}), "
        f"and ties on the rest."
    )
    if judged["win"]:
        words.append(f"- **Conclusion:** the learned controller meets the win criterion. {standing}")
    else:
        words.append(
            f"- **Conclusion:** no win by the criterion ({len(judged['stiff_families_won'])} of "
            f"{len(judged['stiff_families'])} stiff families with at least 15 % fewer NFE than the best classical controller "
            f"at 3 of 4 error levels; {WIN_FAMILIES} needed). {standing}"
        )
    return words


def write_json(payload: dict, path: pathlib.Path):
    """Write `payload` (curves as dicts, NaN as null) to `path`."""

    def default(obj):
        if isinstance(obj, Curve):
            return dataclasses.asdict(obj)
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"Cannot serialise {type(obj).__name__}")

    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, Curve):
            return clean(dataclasses.asdict(obj))
        return obj

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=1, default=default))


_STYLE = {"learned": dict(color="black", lw=2.5, marker="o", zorder=5), "tuned PID": dict(color="tab:red", lw=2, ls="--", marker="s")}


_METRIC_LABEL = {"error": "RMS global error over the dense output", "final_error": "RMS global error at the final time"}


def plot_work_precision(name: str, curves: dict, levels: list, path: pathlib.Path):
    """One figure per problem: NFE and wall time against achieved error, every controller.

    **Arguments:**

    - `name`: problem name (title).
    - `curves`: controller name -> [`Curve`][].
    - `levels`: matched-error levels, drawn as dotted lines.
    - `path`: PNG file to write.
    """
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label in zip(axes, ("nfe", "wall_time"), ("NFE", "wall time [s]")):
        for controller, curve in curves.items():
            e, c = curve.points(cost=cost)
            style = _STYLE.get(controller, dict(lw=1, marker=".", alpha=0.8))
            ax.loglog(e, c, label=controller, **style)
        for level in levels:
            ax.axvline(level, color="grey", ls=":", lw=0.8)
        ax.set_xlabel(_METRIC_LABEL[curve.metric])
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{name}: work-precision")
    axes[1].set_title("wall time after compilation (min of repeats)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _fmt(x, digits=3):
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _results_table(results: list) -> list:
    lines = [
        "| problem | solver | best classical | learned / best NFE at the 4 error levels | levels <= 0.85 | vs tuned PID | vs PI34 | vs PI34-shrink | wall vs best | rejected (learned / best) | learned failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["comparison"]
        best = c["best_classical"]
        curves = r["curves"]
        rejected = f"{sum(curves['learned'].rejected)} / {sum(curves[best].rejected)}" if best else "–"
        ratios = ", ".join(_fmt(x) for x in c["ratios"]) or "no common error range"
        if c["unmatched"]:
            ratios += f" (no common error range with {', '.join(c['unmatched'])})"
        lines.append(
            f"| {r['problem']} | {r['solver']} | {best or '–'} | {ratios} | {c['wins']}/{len(c['ratios'])} | "
            f"{_fmt(c['vs'].get('tuned PID'))} | {_fmt(c['vs'].get('PI34'))} | {_fmt(c['vs'].get('PI34-shrink'))} | "
            f"{_fmt(c['wall_vs'].get(best))} | {rejected} | {c['failures'].get('learned', 0)} |"
        )
    return lines


def _training_lines(training: dict) -> list:
    lines = []
    for solver, t in training.items():
        scores = ", ".join(f"{h['score']:+.3f}" for h in t["history"])
        gains = t["tuned"]["gains"]
        lines += [
            f"- **{solver}**: trained on {', '.join(t['problems'])} at rtol {', '.join(f'{x:g}' for x in t['rtols'])}.",
            f"  Learned-controller training score per round (mean log NFE ratio to PI34 at matched error; round 0 takes PI34's steps, plus one evaluation per step when the secant feature is on): {scores}; kept round {t['kept_round']}; cost {t['solves']:.0f} solve-equivalents.",
            f"  Tuned PID, same budget ({t['tuned']['solves']} solves, {len(t['tuned']['history'])} candidates): "
            f"pcoeff {gains['pcoeff']:.3f}, icoeff {gains['icoeff']:.3f}, dcoeff {gains['dcoeff']:.3f}, safety {gains['safety']:.3f}; training score {t['tuned']['score']:+.3f}.",
        ]
    return lines


def write_markdown(payload: dict, path: pathlib.Path, figures: dict):
    """Write the results page.

    **Arguments:**

    - `payload`: as written to JSON by [`stepjax.odebench.benchmark.run`][].
    - `path`: markdown file.
    - `figures`: problem name -> PNG path.
    """
    v, quick = payload["verdict"], payload["config"]["quick"]
    anchors = "\n".join(f"| {a['name']} | {a['max_rel_error']:.1e} | {'ok' if a['ok'] else 'FAILED'} |" for a in payload["anchors"])
    lines = [
        "# Learned step-size control vs diffrax's PID family: results",
        "",
        f"Measured by `{payload['command']}` on {payload['device']} in {payload['elapsed_s'] / 60:.1f} min. "
        f"Record: `{QUICK_RECORD_DIR if quick else RECORD_DIR}/` (`results.json` and the trained controllers, "
        f"{', '.join(f'`{name}`' for name in payload['policies'].values())}); this page and its figures are "
        f"regenerated from it alone by `python -m stepjax.odebench --report-only{' --quick' if quick else ''}`.",
        "",
        "## Verdict",
        "",
        f"Win criterion: {CRITERION}",
        "",
        v["summary"],
        "",
        *payload["verdict_words"],
        "",
        "## NFE ratios on held-out problems",
        "",
        "NFE ratio = learned / best classical controller at matched global error (RMS over the dense output for "
        "Tsit5 problems; RMS at the final time for Kvaerno5 problems, whose cubic Hermite dense output would measure the "
        "interpolant rather than the controller), interpolated linearly on log-log work-precision curves at 4 levels spread over the error range "
        "that both curves of a pair reach (errors above 1e-2 left out). Best classical = the controller, among "
        f"{', '.join(payload['classical'])}, against which the learned one has its highest geometric-mean NFE ratio. "
        "'vs' columns are geometric means over the levels of each pair. "
        "PI34-shrink is a classical ablation: PI34 allowed to shrink the step after an accepted step, "
        "which diffrax's `PIDController` never does and the learned controller may.",
        "",
        *_results_table(payload["results"]),
        "",
        "## Training",
        "",
        f"One training seed ({payload['config']['seed']}). The training is deterministic on x86-64 CPUs with AVX2: the implicit "
        "solves factorise without LAPACK, whose CPU-dependent kernels made another machine keep another imitation round "
        "(`stepjax/odebench/linear.py`). How much the result varies over seeds is not measured here (`--seed N` trains with another).",
        "",
        *_training_lines(payload["training"]),
        "",
        "## Reference solutions",
        "",
        "Kvaerno5 at rtol = 1e-12 stepping onto every output time; checked against published end points:",
        "",
        "| anchor | max relative error | |",
        "|---|---|---|",
        anchors,
        "",
        "## Figures",
        "",
        *[f"![{name}]({fig})" for name, fig in figures.items()],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def rejudge(payload: dict) -> dict:
    """Recompute every comparison and the verdict of a saved payload (as read back from
    `results.json`) with the current comparison code; the measured curves are unchanged.

    **Arguments:**

    - `payload`: the dict read from `results.json`.

    **Returns:** the payload with `Curve` objects, new comparisons, verdict and verdict words.
    """
    nan = lambda v: [math.nan if x is None else x for x in v] if isinstance(v, list) else v
    for r in payload["results"]:
        r["curves"] = {name: Curve(**{k: nan(v) for k, v in c.items()}) for name, c in r["curves"].items()}
        r["comparison"] = compare(r["curves"], "learned", payload["classical"])
    payload["verdict"] = verdict(payload["results"])
    payload["verdict_words"] = verdict_words(payload["results"], payload["verdict"])
    return payload


def figure_path(problem: str) -> str:
    """**Returns:** the figure of `problem`, relative to the page."""
    return f"figures/odebench/{re.sub('[^A-Za-z0-9.]+', '_', problem).strip('_')}.png"


def regenerate(record_dir: pathlib.Path, docs_dir: pathlib.Path, log=print) -> pathlib.Path:
    """Rebuild the results page and its figures from a record, without solving anything.

    **Arguments:**

    - `record_dir`: a directory with `results.json` (as written by
      `stepjax.odebench.benchmark.write_records`).
    - `docs_dir`: where `ODE_BENCH_RESULTS.md` and `figures/odebench/*.png` go.
    - `log`: progress printer.

    **Returns:** the page's path.
    """
    payload = rejudge(json.loads((record_dir / "results.json").read_text()))
    figures = {}
    for r in payload["results"]:
        figures[r["problem"]] = figure_path(r["problem"])
        plot_work_precision(r["problem"], r["curves"], r["comparison"]["levels"], docs_dir / figures[r["problem"]])
    page = docs_dir / "ODE_BENCH_RESULTS.md"
    write_markdown(payload, page, figures)
    log(f"[report] {page} and {len(figures)} figures from {record_dir / 'results.json'}")
    return page
