"""``python -m stepjax.results``: tables, curves and a verdict from run records (or run directories).

Reads every ``<root>/*/`` that holds ``config.json`` and ``metrics.jsonl`` (and ``summary.json``
when finished or stopped) under one or more roots and writes a markdown report with one section
per protocol (the experiment's variant: ``cpu``, or ``paper`` for the default protocol), each
with its runs, statistics, verdict and a PNG of its training curves. Nothing in the report is
typed by hand: rerun it after more runs finish.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stepjax import figures
from stepjax.config import read_run_config
from stepjax.evaluate import read_evaluation
from stepjax.records import digest
from stepjax.train.metrics import read_metrics


def controller_label(model: dict) -> str:
    """The controller with its options and any placement other than `all`, e.g. `stepnet (history=False)`."""
    options = [f"{k}={v}" for k, v in sorted(model.get("controller_options", {}).items())]
    if model.get("placement", "all") != "all":
        options.append(f"placement={model['placement']}")
    return f"{model['controller']} ({', '.join(options)})" if options else model["controller"]


def load_run_record(workdir: Path) -> dict:
    """One run's facts: experiment, seed, command, wall time, curves, best/last accuracy."""
    config = read_run_config(workdir).to_dict()
    metrics = read_metrics(workdir / "metrics.jsonl")
    # a resumed run logs again the steps between its last checkpoint and the interruption: keep the last
    test = list({m["step"]: m for m in metrics if m["split"] == "test"}.values())
    train = list({m["step"]: m for m in metrics if m["split"] == "train"}.values())
    summary = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else {}
    command = (workdir / "command.txt").read_text().strip() if (workdir / "command.txt").exists() else ""
    starts = (workdir / "code.txt").read_text().split("\n") if (workdir / "code.txt").exists() else []
    code = list(dict.fromkeys(line.split()[-1] for line in starts if line.strip()))  # versions, in order
    accuracy = [m["accuracy"] for m in test]
    experiment = config.get("experiment", workdir.name)
    evaluation = read_evaluation(workdir, summary.get("steps")) if summary.get("status") == "done" else None
    return {
        "workdir": str(workdir),
        "experiment": experiment,
        "group": experiment.split(":")[0],
        "variant": experiment.split(":")[1] if ":" in experiment else "paper",
        "controller": controller_label(config["model"]),
        "seed": config["seed"],
        "data": f"{config['data']['name']} ({config['data']['source']}{', ' + str(config['data'].get('dir')) if config['data'].get('dir') else ''})",
        "command": command,
        "code": ", ".join(code) or "not recorded",
        "protocol": protocol(config),
        "status": _status_of(summary, train),
        "wall_time_s": summary["wall_time_s"] + summary.get("eval_time_s", 0.0) if "wall_time_s" in summary else None,
        "epochs": [m["epoch"] for m in test],
        "planned_epochs": config.get("train", {}).get("epochs"),
        "test_accuracy": accuracy,
        "test_loss": [m["loss"] for m in test],
        "train_steps": [m["step"] for m in train],
        "train_loss": [m["loss"] for m in train],
        "images_per_sec": [m["images_per_sec"] for m in train if "images_per_sec" in m],
        "steps_per_epoch": test[0]["step"] / test[0]["epoch"] if test else None,
        "best_accuracy": max(accuracy) if accuracy else None,
        "last_accuracy": accuracy[-1] if accuracy else None,
        "flip_accuracy": evaluation["flip_accuracy"] if evaluation else _logged_flip(test, summary),
        "config": config,
    }


def _logged_flip(test: list[dict], summary: dict) -> float | None:
    """The final flip-TTA accuracy a finished run logged itself (``train.eval_flip``)."""
    return test[-1].get("flip_accuracy") if test and summary.get("status") == "done" else None


def param_millions(config: dict) -> float:
    """Trainable parameters (millions) of a run's model, counted on abstract shapes."""
    import ml_collections
    from flax import nnx

    from stepjax.models import build_model, count_params

    return count_params(nnx.eval_shape(lambda: build_model(ml_collections.ConfigDict(config)))) / 1e6


def _status_of(summary: dict, train: list[dict]) -> str:
    """``done``/``preempted`` from summary.json; ``running`` without one, or when the run has logged
    steps beyond its stop (resumed since)."""
    if summary.get("status") == "preempted" and train and train[-1]["step"] > summary.get("steps", math.inf):
        return "running"
    return summary.get("status", "running")


def protocol(config: dict) -> str:
    """One line naming the training protocol of a run's config (what differs between protocols)."""
    m, o, t = config.get("model", {}), config.get("optim", {}), config.get("train", {})
    if not o or not t:
        return ""
    return (f"{m.get('preset')}, {t['epochs']} epochs of batch {t['global_batch']}, SGD momentum {o['momentum']}"
            f"{' (Nesterov)' if o.get('nesterov') else ''}, lr {o['lr']} {o['schedule']}, {o.get('warmup_epochs', 0)} warm-up "
            f"epoch(s), wd {o['weight_decay']}{' (not on BatchNorm and biases)' if o['decay_only_kernels'] else ''}, "
            f"label smoothing {o.get('label_smoothing', 0.0)}, {m.get('dtype', 'float32')}"
            f"{', zero-initialised residual fields' if m['zero_init_residual'] else ''}")


def collect(*roots: Path) -> list[dict]:
    """Records of every run directory under the `roots`, sorted by protocol, experiment, seed."""
    dirs = [d for root in roots for d in sorted(Path(root).iterdir())
            if (d / "config.json").exists() and (d / "metrics.jsonl").exists()]
    return sorted((load_run_record(d) for d in dirs), key=lambda r: (r["variant"], r["group"], r["seed"]))


def group_stats(records: list[dict]) -> dict[str, dict]:
    """Per experiment: over its finished runs, the accuracies (``best``, ``last``, ``flip``: last with
    flip TTA, from the runs that have it) and their mean and sample standard deviation."""
    groups = defaultdict(list)
    for r in records:
        if r["status"] == "done":
            groups[r["group"]].append(r)
    stats = {}
    for name, runs in groups.items():
        protocols = {r["protocol"] for r in runs}
        if len(protocols) > 1:
            raise ValueError(
                f"{name}: its finished runs were trained under {len(protocols)} protocols, which cannot be "
                f"pooled: {sorted(protocols)} (runs {[r['workdir'] for r in runs]}). Move the runs trained "
                "with other settings (e.g. a pilot with more epochs) to their own --root and report them apart.")
        stats[name] = {"n": len(runs), "params_m": param_millions(runs[0]["config"])}
        for key in ("best", "last", "flip"):
            kept = [r for r in runs if r[f"{key}_accuracy"] is not None]
            values = np.array([r[f"{key}_accuracy"] for r in kept])
            stats[name][key], stats[name][f"{key}_by_seed"] = values, {r["seed"]: r[f"{key}_accuracy"] for r in kept}
            stats[name][f"{key}_mean"] = values.mean() if len(values) else float("nan")
            stats[name][f"{key}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
    return stats


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value (nan with fewer than two values per side)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def welch_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of ``mean(a) - mean(b)`` with Welch's standard error and
    Welch-Satterthwaite degrees of freedom (nan with fewer than two values per side)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    from scipy import stats

    low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return float(low), float(high)


def paired_by_seed(a: dict, b: dict) -> tuple[np.ndarray, float]:
    """Differences ``a[seed] - b[seed]`` over the seeds both have, and the two-sided paired t-test
    p-value (nan with fewer than two common seeds). Under one seed, runs of different controllers
    start from the same backbone and see the same data order, so pairing removes that variance."""
    seeds = sorted(set(a) & set(b))
    diffs = np.array([a[s] - b[s] for s in seeds])
    if len(diffs) < 2:
        return diffs, float("nan")
    from scipy import stats

    return diffs, float(stats.ttest_1samp(diffs, 0.0).pvalue)


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The t-interval of the mean of `values` (for paired differences: of the mean difference),
    ``mean ± t_{(1+confidence)/2, n-1} sd / sqrt(n)``."""
    from scipy import stats

    low, high = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return float(low), float(high)


def sd_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the standard deviation behind `values` (normal data): ``(n-1) s^2 /
    sigma^2`` is chi-square with ``n - 1`` degrees of freedom. From 3 values it runs from 0.52 to
    6.3 times the sample sd ``s``."""
    from scipy import stats

    df = len(values) - 1
    tail = (1 - confidence) / 2
    sd = values.std(ddof=1)
    return float(sd * math.sqrt(df / stats.chi2.ppf(1 - tail, df))), float(sd * math.sqrt(df / stats.chi2.ppf(tail, df)))


def detectable_difference(diffs: np.ndarray, alpha: float = 0.05, power: float = 0.8, sd: float | None = None) -> float:
    """The smallest true mean difference that a two-sided paired t-test at `alpha` would find with
    probability `power`, given the spread of the paired differences (the usual approximation
    ``(t_{1-alpha/2} + t_{power}) * sd / sqrt(n)`` with ``n - 1`` degrees of freedom); `sd` is
    the sample sd of `diffs` unless given (e.g. the upper end of `sd_interval`)."""
    from scipy import stats

    df = len(diffs) - 1
    sd = diffs.std(ddof=1) if sd is None else sd
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(len(diffs)))


def _interval(bounds) -> str:
    """``[low, high]`` in signed points (of fractions)."""
    return "[{:+.2f}, {:+.2f}]".format(*(100 * b for b in bounds))


def _paired_words(diffs: np.ndarray, p: float, alpha: float) -> str:
    """The paired part of a verdict line: the mean difference with its t-interval, and the
    detectable difference at the sample sd and at the upper end of the sd's interval."""
    sd_low, sd_high = sd_interval(diffs, 1 - alpha)
    return (f"; paired by seed: {100 * diffs.mean():+.2f} ± {100 * diffs.std(ddof=1):.2f} points, "
            f"n={len(diffs)}, p={p:.3f}, {100 * (1 - alpha):.0f} % CI {_interval(t_interval(diffs, 1 - alpha))}, "
            f"detectable at 80 % power: {100 * detectable_difference(diffs, alpha):.2f} points, but the sd of "
            f"the paired differences is uncertain from {len(diffs)} seeds ({100 * (1 - alpha):.0f} % CI "
            f"{100 * sd_low:.2f} to {100 * sd_high:.2f} points), and at its upper end "
            f"{100 * detectable_difference(diffs, alpha, sd=sd_high):.2f} points")


# the contrasts paired by training seed across the lotteries of one experiment and ratio
SEED_CONTRASTS = (("nsi_top", "nsi_bottom"), ("nsi_top", "none"), ("nsi_bottom", "none"),
                  ("nsi_top", "all"), ("nsi_bottom", "all"))


def lottery_seed_table(lotteries: dict[int, dict], key: str = "best_accuracy") -> str:
    """Markdown: one experiment's lottery over training seeds, each placement's accuracy by seed and
    the `SEED_CONTRASTS` paired by seed (mean ± sd, two-sided paired t-test, 95 % t-interval).

    **Arguments:**

    - `lotteries`: training seed -> that seed's lottery record (``results/lottery/<name>/lottery.json``,
      written by `stepjax.analysis.lottery`).
    - `key`: ``"best_accuracy"`` or ``"last_accuracy"``.

    **Returns:**

    The table, with a line saying whether each placement has the same blocks in every seed (a
    pairing is of one placement only when it does).
    """
    seeds = sorted(lotteries)
    runs = {seed: {r["name"]: r for r in lotteries[seed]["runs"] if r["status"] == "done"} for seed in seeds}
    names = list(dict.fromkeys(name for seed in seeds for name in runs[seed]))
    acc = {name: {seed: 100 * runs[seed][name][key] for seed in seeds if name in runs[seed]} for name in names}
    lines = [f"# {lotteries[seeds[0]]['title'].split(', seed')[0]}: over training seeds",
             "", f"Generated by `make results` from `results/lottery/`; {key.replace('_', ' ')}, %. "
             + lotteries[seeds[0]]["note"], "",
             "| placement | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    lines += [f"| `{name}` | " + " | ".join(f"{acc[name][s]:.2f}" if s in acc[name] else "-" for s in seeds) + " |"
              for name in names]
    differing = [name for name in names if len({tuple(runs[s][name]["blocks"]) for s in seeds if name in runs[s]}) > 1]
    lines += ["", "Blocks: " + (f"**differ between seeds** for {', '.join(f'`{n}`' for n in differing)}."
                                if differing else "each placement has the same blocks in every seed it has."), "",
              "| contrast (points) | per seed | mean ± sd | n | paired t p | 95 % CI |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [_contrast_row(a, b, acc.get(a, {}), acc.get(b, {})) for a, b in SEED_CONTRASTS
              if set(acc.get(a, {})) & set(acc.get(b, {}))]
    return "\n".join(lines) + "\n"


def _contrast_row(a: str, b: str, acc_a: dict, acc_b: dict) -> str:
    """A row of `lottery_seed_table`: ``a - b`` paired by the seeds both have (accuracies in %, by seed)."""
    diffs, p = paired_by_seed(acc_a, acc_b)
    per_seed = ", ".join(f"{d:+.2f} (s{s})" for d, s in zip(diffs, sorted(set(acc_a) & set(acc_b))))
    if len(diffs) < 2:
        return f"| `{a}` - `{b}` | {per_seed} | {diffs.mean():+.2f} | 1 | - | - |"
    low, high = t_interval(diffs)
    return (f"| `{a}` - `{b}` | {per_seed} | {diffs.mean():+.2f} ± {diffs.std(ddof=1):.2f} | {len(diffs)} "
            f"| {p:.3f} | [{low:+.2f}, {high:+.2f}] |")


def verdict(stats: dict, pairs: list[tuple[str, str]], alpha: float = 0.05, key: str = "best") -> list[str]:
    """Plain-words comparisons of each ``(ours, other)`` pair of experiments on `key` accuracy (``best``: best
    epoch, picked on the test set, so optimistic; ``last``: the final model): the difference of the
    means with a Welch test and its confidence interval (level ``1 - alpha``), and the seed-paired
    differences with a paired t-test, the t-interval of their mean, and the difference a paired
    test would detect at 80 % power, also at the upper end of the chi-square interval of the
    paired differences' sd (from 3 seeds that end is 6.3 times the sample sd). The words rest on
    the paired test when two or more seeds are shared, else on Welch's."""
    lines = []
    for ours, other in pairs:
        if ours not in stats or other not in stats:
            lines.append(f"- {ours} vs {other}: not enough finished runs yet.")
            continue
        a, b = stats[ours][key], stats[other][key]
        diff, p = 100 * (a.mean() - b.mean()), welch_p(a, b)
        welch_ci = "" if math.isnan(p) else f", {100 * (1 - alpha):.0f} % CI {_interval(welch_interval(a, b, 1 - alpha))}"
        diffs, p_paired = paired_by_seed(stats[ours][f"{key}_by_seed"], stats[other][f"{key}_by_seed"])
        if math.isnan(p_paired):
            test, decisive, gain, paired = "Welch", p, diff, ""
        else:
            test, decisive, gain, paired = "paired", p_paired, diffs.mean(), _paired_words(diffs, p_paired, alpha)
        if math.isnan(decisive):
            word = "too few seeds for a test"
        elif decisive < alpha:
            word = f"significant at {alpha} by the {test} test ({'better' if gain > 0 else 'worse'})"
        else:
            word = f"no significant difference ({test} test)"
        welch = "" if math.isnan(p) else f", Welch p={p:.3f}"
        lines.append(f"- {ours} vs {other}: {diff:+.2f} points in mean {key} accuracy{welch_ci} "
                     f"(n={len(a)} vs {len(b)}{welch}{paired}): {word}.")
    return lines


def single_seed_lines(stats: dict, key: str = "best") -> list[str]:
    """For each experiment with one finished run: its `key` accuracy minus that of the same seed in
    each other experiment (no test is possible), and for scale the seed-to-seed standard
    deviation of the same-seed differences between the multi-seed experiments, with the upper end
    of its 95 % chi-square interval (`sd_interval`)."""
    by_seed = {name: s[f"{key}_by_seed"] for name, s in sorted(stats.items())}
    multi = {name: runs for name, runs in by_seed.items() if stats[name]["n"] > 1}
    paired = [diffs for a, b in itertools.combinations(multi.values(), 2) if len(diffs := paired_by_seed(a, b)[0]) > 1]
    spreads = [100 * diffs.std(ddof=1) for diffs in paired]
    lines = []
    for name, s in sorted(stats.items()):
        if s["n"] != 1 or not s[f"{key}_by_seed"]:
            continue
        (seed, accuracy), = s[f"{key}_by_seed"].items()
        against = ", ".join(f"{other} {100 * (accuracy - runs[seed]):+.2f}"
                            for other, runs in by_seed.items() if other != name and seed in runs)
        compared = f"; minus the same seed of: {against} points" if against else "; no other experiment has this seed"
        lines.append(f"- {name} (seed {seed} only): {_pct(accuracy)} % {key}{compared}.")
    if lines and spreads:
        one = len(spreads) == 1
        sd = f"{spreads[0]:.2f}" if one else f"{min(spreads):.2f} to {max(spreads):.2f}"
        seeds = "-".join(sorted({str(len(d)) for d in paired}, key=int))
        upper = max(100 * sd_interval(diffs)[1] for diffs in paired)
        rests = (f"It rests on {seeds} seeds; the upper end of its 95 % interval is {upper:.2f} points." if one else
                 f"Each sd rests on {seeds} seeds; the upper ends of their 95 % intervals reach {upper:.2f} points.")
        lines.append(f"- For scale: between the multi-seed experiments the same-seed differences vary from seed to "
                     f"seed with a standard deviation of {sd} points, so a single-seed difference below about twice "
                     f"that is no evidence either way. {rests}")
    return lines


def _pct(x):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _mean_std(mean, std):
    """``mean ± std`` in percent; the mean alone for one run; empty for none."""
    return f"{_pct(mean)} ± {_pct(std)}" if _pct(std) else _pct(mean)


def _duration(seconds):
    return "" if seconds is None else f"{seconds / 60:.1f} min"


def _throughput(rates):
    """Median and 90th percentile of the logged training windows' images/s: the median is what the
    run got, the 90th percentile about what it gets with the cores to itself."""
    return "" if not rates else "{:.0f} ({:.0f})".format(*np.percentile(rates, [50, 90]))


def _status(r):
    if r["status"] == "done" or not r["epochs"]:
        return r["status"]
    return f"{r['status']} after {r['epochs'][-1]:g} of {r['planned_epochs']} epochs"


def render_protocol(variant: str, records: list[dict], figure: str | None, pairs: list[tuple[str, str]]) -> list[str]:
    """The markdown section of one protocol; without `pairs` to compare, the runs are only listed
    (no verdict, no single-seed comparisons). A pair with a control (`CONTROLS`) that this protocol
    has no run of is left out."""
    out = [f"## {variant} protocol", "", "| run | controller | seed | status | best % | last % | last % flip TTA | wall time (train + eval) | "
           "train images/s median (p90) | first -> last train loss | data | code |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        losses = f"{r['train_loss'][0]:.3f} -> {r['train_loss'][-1]:.3f}" if r["train_loss"] else ""
        out.append(f"| `{r['workdir']}` | {r['controller']} | {r['seed']} | {_status(r)} | {_pct(r['best_accuracy'])} | "
                   f"{_pct(r['last_accuracy'])} | {_pct(r['flip_accuracy'])} | {_duration(r['wall_time_s'])} | "
                   f"{_throughput(r['images_per_sec'])} | {losses} | {r['data']} | {r['code']} |")
    protocols = sorted({(r["group"], r["protocol"]) for r in records if r["protocol"]})
    out += ["", "Protocol (from each run's config.json):", ""] + [f"- {g}: {p}" for g, p in protocols]
    out += ["", "Commands (each resumes if rerun):", ""]
    out += [f"    {r['command']}" for r in records if r["command"]]
    stats = group_stats(records)
    out += ["", "Per experiment (finished runs only):", "", "| experiment | params (M) | seeds | best % mean ± std | "
            "last % mean ± std | last % flip TTA mean ± std (runs) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, s in sorted(stats.items()):
        out.append(f"| {name} | {s['params_m']:.3f} | {s['n']} | {_mean_std(s['best_mean'], s['best_std'])} | "
                   f"{_mean_std(s['last_mean'], s['last_std'])} | "
                   f"{_mean_std(s['flip_mean'], s['flip_std'])} ({len(s['flip'])}) |")
    pairs = [pair for pair in pairs if not set(pair) & (set(CONTROLS) - {r["group"] for r in records})]
    if pairs:
        out += ["", "Verdict (finished runs only; two-sided tests: Welch over the seeds, and paired by seed, since "
                "under one seed every controller starts from the same backbone and sees the same data order):", ""]
        out += list(dict.fromkeys(line for key in ("best", "last") for line in verdict(stats, pairs, key=key)))
    single = single_seed_lines(stats)
    if pairs and single:
        out += ["", "Single-seed runs (no test is possible; compared with the same seed of the other "
                "experiments, which start from the same backbone and see the same data order):", "", *single]
    if figure:
        out += ["", f"![{variant} curves]({figure})"]
    return out + [""]


def render(sections: list[list[str]], title: str = "Results") -> str:
    """The markdown report from the protocol sections."""
    head = [f"# {title}", "", "Generated by `make results` (`python -m stepjax.docs`) from the run records in `results/`; "
            "do not edit by hand. StepNet is our reconstruction (see README).", "",
            "Columns: *best* is the highest test accuracy over the epochs (picked on the test set, so "
            "optimistic), *last* the final model's; *last % flip TTA* evaluates the final checkpoint on the "
            "image and its mirror and averages the probabilities (`python -m stepjax.evaluate`, run by the "
            "study after each run, or logged by the run itself with `train.eval_flip=True`). The wall time includes any time the run shared the 2 CPU cores with "
            "other jobs (tests, analyses); *train images/s* gives the median over the logged windows and, "
            "in brackets, their 90th percentile, about the speed with the cores to itself. Means and "
            "standard deviations are over the finished seeds.", ""]
    return "\n".join(head + [line for section in sections for line in section])


def epoch_means(steps, losses, steps_per_epoch) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the logged training losses of each epoch, placed at the epoch's end."""
    epochs = np.ceil(np.asarray(steps) / steps_per_epoch)
    ends = np.unique(epochs)
    return ends, np.array([np.mean(np.asarray(losses)[epochs == e]) for e in ends])


def plot_curves(records: list[dict], path: Path) -> None:
    """Test accuracy and train loss by epoch/step, one colour per experiment."""
    plt = figures.pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {}
    for r in records:
        colour = colours.setdefault(r["group"], f"C{len(colours)}")
        label = r["group"] if sum(q["group"] == r["group"] for q in records[: records.index(r) + 1]) == 1 else None
        ax_acc.plot(r["epochs"], [100 * a for a in r["test_accuracy"]], color=colour, label=label, lw=1)
        if r["steps_per_epoch"]:
            ax_loss.plot(*epoch_means(r["train_steps"], r["train_loss"], r["steps_per_epoch"]), color=colour, label=label, lw=1)
        ax_loss.plot(r["epochs"], r["test_loss"], color=colour, lw=1.2, ls="--")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss, mean of each epoch's logged batches (solid),\n"
                "and test loss (dashed)", yscale="log")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    figures.save(fig, path, dpi=110)


# StepNet (ours) against SE and plain; and SE against plain, the premise that attention helps here
COMPARISONS = ["cifar10_stepnet:cifar10_se", "cifar10_stepnet:cifar10_resnet", "cifar10_se:cifar10_resnet",
               # the trained constant step per channel (docs/ANALYSIS.md 3.13-3.16) against the three
               "cifar10_channel_step:cifar10_se", "cifar10_channel_step:cifar10_stepnet",
               "cifar10_channel_step:cifar10_resnet"]
CONTROLS = ("cifar10_channel_step",)  # compared only in a protocol that trained them


def curve_data(records: list[dict]) -> list:
    """The data `plot_curves` draws (for the figure's digest, `stepjax.docs.digest`)."""
    keys = ("group", "epochs", "test_accuracy", "test_loss", "train_steps", "train_loss")
    return [[r[k] for k in keys] for r in records]


def write_report(records: list[dict], out: Path, figure: Path, *, title: str = "Results", per_run: bool = False,
                 pairs: list[tuple[str, str]] | None = None,
                 draw: bool | Callable[[Path, str], bool] = True) -> tuple[list, dict]:
    """Write the markdown report of `records` to `out` and one curves figure per protocol.

    **Arguments:**

    - `records`: from `collect`.
    - `out`: the markdown file.
    - `figure`: the curves figure; each protocol gets its own, with ``_<protocol>`` before the suffix.
    - `title`: the report's heading.
    - `per_run`: report every run on its own, named by its directory (pilots trained with
      differing settings): no pooling over seeds, no verdict.
    - `pairs`: experiment pairs for the verdict (default `COMPARISONS`).
    - `draw`: draw the figures (off: only their data digests, for the drift test), or which to draw:
      a function of a figure's path and data digest (to redraw only figures whose data changed).

    **Returns:**

    ``(sections, digests)``: the markdown sections, and figure path -> digest of its data.
    """
    pairs = [] if per_run else (pairs or [tuple(pair.split(":")) for pair in COMPARISONS])
    if per_run:
        for r in records:
            r["group"] = Path(r["workdir"]).name
    out, figure = Path(out), Path(figure)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections, digests = [], {}
    for variant in sorted({r["variant"] for r in records}):
        chosen = [r for r in records if r["variant"] == variant]
        path = figure.with_name(f"{figure.stem}_{variant}{figure.suffix}")
        digests[path] = digest(curve_data(chosen))
        if draw(path, digests[path]) if callable(draw) else draw:
            plot_curves(chosen, path)
        shown = path.relative_to(out.parent) if path.is_relative_to(out.parent) else path
        sections.append(render_protocol(variant, chosen, str(shown), pairs))
    out.write_text(render(sections, title))
    return sections, digests


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", nargs="+", default=["results/study"], help="directories of run records "
                        "(missing ones are skipped)")
    parser.add_argument("--out", default="docs/RESULTS.md")
    parser.add_argument("--title", default="Results", help="the report's heading")
    parser.add_argument("--figure", default="docs/figures/results_curves.png",
                        help="curves figure; each protocol gets its own, with `_<protocol>` before the suffix")
    parser.add_argument("--compare", nargs="+", default=COMPARISONS, metavar="A:B",
                        help="experiment pairs for the verdict (A against B)")
    parser.add_argument("--per-run", action="store_true", help="report every run on its own, named by its "
                        "directory (pilots trained with differing settings): no pooling over seeds, no verdict")
    args = parser.parse_args(argv)
    if any(pair.count(":") != 1 for pair in args.compare):
        parser.error(f"--compare takes pairs written A:B, e.g. cifar10_stepnet:cifar10_se; got {args.compare}")
    roots = [Path(r) for r in args.root if Path(r).is_dir()]
    records = collect(*roots)
    if not records:
        raise SystemExit(f"No run directories with config.json and metrics.jsonl under {' '.join(args.root)}.")
    sections, _ = write_report(records, Path(args.out), Path(args.figure), title=args.title, per_run=args.per_run,
                               pairs=[tuple(pair.split(":")) for pair in args.compare])
    print(f"wrote {args.out} ({len(sections)} protocols, {len(records)} runs) and its figures")


if __name__ == "__main__":
    main()
