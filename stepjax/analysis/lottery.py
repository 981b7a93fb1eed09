"""Lottery ticket in SAM: train placements of the controller at one connection ratio and compare.

``python -m stepjax.analysis.lottery --exp cifar10_se:cpu --ratio 0.4 --num-random 5
--nsi-workdir DIR [key=value ...]`` trains, each as a normal resumable `train()` run in its own
workdir under ``--root``: no controller, the controller in every block, `--num-random` random
placements at the ratio, and the NSI-guided placements at the same ratio (the blocks of largest
NSI of the reference model DIR, and as a contrast those of smallest NSI). It then draws the test
accuracies as a strip plot with the NSI-guided placement marked. Re-running skips finished runs
and resumes unfinished ones; ``--plot-only`` draws what has finished. ``--reuse none=DIR1
--reuse all=DIR2`` takes finished runs of the same protocol and seed (e.g. the accuracy study's
plain and SE runs) instead of training them again; they are checked to be the same training.
The override ``seed=N`` trains every placement from training seed N: a lottery of its own, named
``<exp>_ratio<r>_s<N>`` (its placements are the same when its ranking is). Several lottery
processes may train one lottery at once (one per core, under ``taskset``): each claims the run it
trains, and leaves a claimed run to the process that holds it.

The lottery outlives its run directories: the NSI ranking is kept beside its record
(``results/lottery/<name>/nsi_scores.json``) and read back from there, and a run that
finished in an earlier checkout is read from its record. DIR may also be an analysis record
(``results/analysis/NAME``), whose NSI needs no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from stepjax import errors, parallel
from stepjax.analysis import figures
from stepjax.analysis.placement import nsi_placement, nsi_scores, recorded_scores
from stepjax.analysis.report import RECONSTRUCTION_NOTE, load_images, load_source
from stepjax.analysis.trace import DEFAULT_NSI, INDICATORS
from stepjax.errors import UserError
from stepjax.records import analysis_record, file_run, finished_run, results_root


def placement_configs(config, *, ratio: float, num_random: int, scores) -> dict:
    """The configs of the lottery: name -> config with ``model.placement`` set.

    **Arguments:**

    - `config`: the experiment config.
    - `ratio`: connection ratio of the random and NSI-guided placements.
    - `num_random`: number of random placements (seeds 0, 1, ...).
    - `scores`: per-block NSI of the reference model (`nsi_scores`).

    **Returns:**

    An ordered dict, in training order: ``none``, ``all``, ``nsi_top``, ``nsi_bottom``, ``random_<seed>``...
    """
    # the NSI-guided runs before the random ones: an interrupted lottery has its contrast first
    choices = {"none": ("none", 0), "all": ("all", 0),
               "nsi_top": (nsi_placement(scores, ratio, top=True), 0),
               "nsi_bottom": (nsi_placement(scores, ratio, top=False), 0)}
    choices.update({f"random_{seed}": ("random", seed) for seed in range(num_random)})
    out = {}
    for name, (placement, seed) in choices.items():
        c = config.copy_and_resolve_references()
        with c.model.ignore_type():
            c.model.placement = placement
        c.model.placement_ratio, c.model.placement_seed = ratio, seed
        out[name] = c
    return out


def _blocks(config) -> tuple[list[int], int]:
    """The global block indices where `config`'s controller is on (none for the constant step), and
    the number of blocks."""
    from stepjax.models import placement_masks

    masks = np.concatenate(placement_masks(config.model))
    on = [] if config.model.controller == "constant" else [int(i) for i in np.flatnonzero(masks)]
    return on, len(masks)


def _training(config) -> dict:
    """What decides a training run's outcome, up to names: seed, data, optimiser, schedule length,
    network, and the controller with the blocks it is on."""
    m, blocks = config.model, _blocks(config)[0]
    return json.loads(json.dumps({  # as saved in config.json: tuples become lists
        "seed": config.seed, "data.name": config.data.name, "optim": config.optim.to_dict(),
        "train.epochs": config.train.epochs, "train.total_steps": config.train.total_steps,
        "train.global_batch": config.train.global_batch, "model.preset": m.preset, "model.dtype": m.dtype,
        "model.depths": m.depths, "model.widths": m.widths, "model.stem_width": m.stem_width,
        "model.zero_init_residual": m.zero_init_residual, "blocks": blocks,
        "controller": (m.controller, m.controller_options.to_dict()) if blocks else None,
    }))


def _reused_summary(config, workdir: Path, *, record: bool = False) -> dict:
    """The summary of a finished run (a ``--reuse`` directory, or with `record` the record of a run
    of this lottery) that stands in for `config`'s run; errors name what differs."""
    from stepjax.config import read_run_config

    path = Path(workdir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    if summary.get("status") != "done":
        raise UserError(f"--reuse {workdir}: not a finished run (no summary.json with status done). "
                         "Finish it first (e.g. `make study`) or drop the --reuse.")
    saved = read_run_config(workdir)
    want, have = _training(config), _training(saved)
    differ = [f"{k}: {have[k]} instead of {want[k]}" for k in want if have[k] != want[k]]
    if differ and record:
        raise UserError(f"the record {workdir} of this lottery's run is a different training from the one it "
                        "would train now (has the NSI ranking changed?): " + "; ".join(differ)
                        + ". Move the record aside to train the run again, or rank as before.")
    if differ:
        raise UserError(f"--reuse {workdir} is a different training from the lottery's run: "
                         + "; ".join(differ) + ". Reuse a run of the same protocol and seed, or drop the --reuse.")
    return summary


def placement_dir(name: str, root, reuse: dict) -> Path:
    """The run directory of placement `name`: the finished run it reuses, else ``root/name``."""
    return Path(reuse.get(name) or Path(root) / name)


def run_lottery(configs: dict, root, *, train_fn: Callable | None = None, plot_only: bool = False,
                reuse: dict | None = None, stop_after=None) -> dict:
    """Train (or resume, or skip when finished) every config in ``root/<name>`` and collect.

    **Arguments:**

    - `configs`: from `placement_configs`.
    - `root`: parent directory of the run directories.
    - `train_fn`: ``train_fn(config, workdir) -> summary`` (default `stepjax.train.train`).
    - `plot_only`: train nothing; unfinished runs are reported as pending.
    - `reuse`: name -> directory of a finished run that is the same training as that config's
      (checked first, before anything is trained); it is read, not trained.
    - `stop_after`: a `stepjax.train.StopAfterRun`, or None.

    A run whose directory is gone but whose record (`stepjax.records.record_path`) is finished is
    read from the record, after the same check.

    Several processes may work through one lottery at once (one per core): each claims a run before
    it trains it (`stepjax.train.claimed`) and leaves a run another live process has claimed to it.
    Such a run is read again once this process's own runs are done, so that whichever process
    finishes last reports, and records, every run (before sitting 27 it kept the state it had read
    when it passed the run, and a record could miss a run that had finished).

    A run cut before its first checkpoint (`stepjax.train.set_aside_cut_run`) is moved aside and
    trained afresh. A run that ends unfinished (stopped by a signal: its checkpoint is saved) stops the lottery:
    the later runs are reported as they stand, and rerunning resumes. So does `stop_after`'s
    request (SIGUSR1), once the run in progress has finished: no further run is started.

    **Returns:**

    name -> ``{"workdir", "blocks", "ratio", "status", "best_accuracy", "last_accuracy"}``.
    """
    from stepjax.train import claimed, set_aside_cut_run

    if train_fn is None:
        from stepjax.train import train as train_fn
    reuse = reuse or {}
    unknown = sorted(set(reuse) - set(configs))
    if unknown:
        raise UserError(f"--reuse names {unknown}, which the lottery does not train; choose from {list(configs)}.")
    reused = {name: _reused_summary(configs[name], workdir) for name, workdir in reuse.items()}
    results, others, interrupted = {}, [], False

    def state(name):
        return _run_state(name, configs[name], placement_dir(name, root, reuse), reused)

    for name, config in configs.items():
        workdir, summary = state(name)
        interrupted = interrupted or (stop_after is not None and stop_after.requested)
        if summary["status"] != "done" and not (plot_only or interrupted):
            with claimed(workdir) as mine:
                if mine:
                    set_aside_cut_run(workdir)
                    summary = train_fn(config, workdir)
                    file_run(workdir)
                    interrupted = summary["status"] != "done"  # e.g. SIGTERM: start no further run
                else:
                    print(f"{workdir}: another lottery process trains it; going on with the next run.", flush=True)
                    others.append(name)
        results[name] = _result(config, workdir, summary)
    for name in others:  # read again: the other process may have finished it while this one trained
        results[name] = _result(configs[name], *state(name))
    return results


def _run_state(name: str, config, workdir: Path, reused: dict) -> tuple[Path, dict]:
    """Where placement `name`'s run is (its directory, or its record once finished in an earlier
    checkout) and its summary (``{"status": "pending"}`` before it has one)."""
    if name not in reused and (finished := finished_run(workdir)) not in (None, workdir):
        workdir = finished  # its record: finished in an earlier checkout, the run directory is gone
        reused[name] = _reused_summary(config, workdir, record=True)
    path = workdir / "summary.json"
    return workdir, reused.get(name) or (json.loads(path.read_text()) if path.exists() else {"status": "pending"})


def _result(config, workdir: Path, summary: dict) -> dict:
    blocks, total = _blocks(config)
    return {"workdir": str(workdir), "blocks": blocks, "ratio": len(blocks) / total, "status": summary["status"],
            "best_accuracy": summary.get("best_accuracy"), "last_accuracy": summary.get("last_accuracy")}


def cached_scores(source: str, folders, *, indicator: str, num_samples: int) -> tuple[np.ndarray, dict]:
    """`nsi_scores` of the reference model, cached in ``<folder>/nsi_scores.json`` of each of `folders`.

    **Arguments:**

    - `source`: a run directory or ``init:EXP`` (traced on `num_samples` training images, `load_images`),
      or an analysis record (`recorded_scores`: its images, whatever `num_samples` says).
    - `folders`: where the ranking is kept: the lottery's run root and its record in ``results/``,
      which outlives the run directories. The first cache of the same source and settings is read;
      otherwise the scores are computed and written to all of them.
    - `indicator`: a name in `INDICATORS`.
    - `num_samples`: training images for a traced source.

    **Returns:**

    `(scores, key)`: the per-block scores and what they were measured on (``source``, ``indicator``,
    ``num_samples``, ``split``).
    """
    if analysis_record(source) is not None:  # its NSI is read, not traced
        scores, settings = recorded_scores(source, indicator=indicator)
        key = {"source": str(source), "indicator": indicator, "num_samples": settings["num_samples"],
               "split": settings["split"]}
    else:
        scores, key = None, {"source": str(source), "indicator": indicator, "num_samples": num_samples, "split": "train"}
    for path in (Path(folder) / "nsi_scores.json" for folder in folders):
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("key") == key:
            return np.array([np.nan if v is None else v for v in cached["scores"]]), key
    if scores is None:
        config, model, _ = load_source(source)
        scores = nsi_scores(model, load_images(config, num_samples, split="train")[0], indicator=indicator)
    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "nsi_scores.json").write_text(
            json.dumps({"key": key, "scores": [None if np.isnan(v) else float(v) for v in scores]}))
    return scores, key


def _how_many(values: list, condition) -> str:
    """``"k of n"``: how many of `values` meet `condition`."""
    return f"{sum(map(condition, values))} of {len(values)}"


def lottery_contrasts(results: dict, key: str = "best_accuracy") -> dict:
    """The lottery's comparisons over its finished runs, in accuracy points.

    **Arguments:**

    - `results`: from `run_lottery`.
    - `key`: ``"best_accuracy"`` or ``"last_accuracy"``.

    **Returns:**

    ``{"random": {"n", "mean", "sd", "max"}, "random mean - all": points,
    "random placements above all": "k of n", "nsi_top - <other>": points, ...,
    "random placements below nsi_top": "k of n"}``: the first half tests the paper's lottery claim
    that partial placements beat full placement, the second whether the NSI picks a good one. A
    comparison whose runs have not finished is left out, and the sd of fewer than two random
    placements is None.
    """
    done = {name: round(100 * r[key], 4) for name, r in results.items() if r["status"] == "done"}
    random = [v for name, v in done.items() if name.startswith("random")]
    contrasts = {"random": {"n": len(random), "mean": round(float(np.mean(random)), 4) if random else None,
                            "sd": round(float(np.std(random, ddof=1)), 4) if len(random) > 1 else None,
                            "max": max(random, default=None)}}
    if random and "all" in done:
        contrasts["random mean - all"] = round(contrasts["random"]["mean"] - done["all"], 4)
        contrasts["random placements above all"] = _how_many(random, lambda v: v > done["all"])
    if "nsi_top" not in done:
        return contrasts
    top = done["nsi_top"]
    for other in ("nsi_bottom", "all", "none"):
        if other in done:
            contrasts[f"nsi_top - {other}"] = round(top - done[other], 4)
    if random:
        contrasts["nsi_top - random mean"] = round(top - contrasts["random"]["mean"], 4)
        contrasts["random placements below nsi_top"] = _how_many(random, lambda v: v < top)
    return contrasts


def lottery_figure(results: dict, *, experiment: str, ratio: float, ranking: dict, seed: int = 0) -> dict:
    """The JSON-ready data of the strip plot (see `figures.plot_lottery`), with `lottery_contrasts`
    of the best and the last accuracy; `ranking` is the key of `cached_scores`, `seed` the training
    seed (named in the title unless 0)."""
    return {
        "title": f"lottery ticket in SAM: {experiment}, connection ratio {ratio}" + (f", seed {seed}" if seed else ""),
        "note": f"NSI = mean {INDICATORS[ranking['indicator']].label} of {ranking['source']} on "
                f"{ranking['num_samples']} {ranking['split']} images. " + RECONSTRUCTION_NOTE,
        "runs": [{"name": name, **r} for name, r in results.items()],
        "contrasts": {key: lottery_contrasts(results, key) for key in ("best_accuracy", "last_accuracy")},
    }


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, ...)")
    return int(text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m stepjax.analysis.lottery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment, e.g. cifar10_se:cpu")
    p.add_argument("--ratio", type=float, default=0.4, help="connection ratio (default 0.4)")
    p.add_argument("--num-random", type=_count, default=5, help="random placements (default 5)")
    p.add_argument("--nsi-workdir", required=True,
                   help="reference model for the NSI ranking: run dir, init:EXP, or an analysis record "
                        "(results/analysis/NAME: its NSI, on its images)")
    p.add_argument("--indicator", default=DEFAULT_NSI, choices=sorted(INDICATORS))
    p.add_argument("--nsi-samples", type=int, default=500, help="training images for the NSI ranking")
    p.add_argument("--root", help="run directories go here (default runs/lottery/<name>, <name> = "
                   "<exp>_ratio<r>, with _s<seed> for a seed other than 0)")
    p.add_argument("--out", help="figure directory (default docs/figures/analysis/lottery_<name>); the "
                   "record lottery.json goes to results/lottery/<name>")
    p.add_argument("--plot-only", action="store_true", help="train nothing, draw what has finished")
    p.add_argument("--status", action="store_true",
                   help="print where each placement's run stands (done, training, stopped, pending); "
                        "train, draw and write nothing")
    p.add_argument("--reuse", action="append", default=[], metavar="NAME=DIR",
                   help="a finished run that is the same training (repeatable), e.g. "
                        "--reuse none=runs/study/cifar10_resnet_cpu_s0 --reuse all=runs/study/cifar10_se_cpu_s0")
    p.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.progress=False")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    errors.setup_logging(args.debug)  # its trainings' progress lines, as under `stepjax.main` and the study
    return errors.run(lambda: _lottery(args), debug=args.debug)


def lottery_name(exp: str, ratio: float, seed: int) -> str:
    """The lottery's name, that of its record (``results/lottery/<name>``) and run root: the
    experiment and the ratio, and the training seed unless it is 0 (``..._ratio0.4_s1``)."""
    return f"{exp.replace(':', '_')}_ratio{ratio}" + (f"_s{seed}" if seed else "")


def lottery_seed(name: str) -> tuple[str, int]:
    """The inverse of `lottery_name` for the seed: ``(name without "_s<N>", N)``, N = 0 where absent."""
    base, _, seed = name.rpartition("_s")
    return (base, int(seed)) if base and seed.isdigit() else (name, 0)


def _lottery(args) -> int:
    """The lottery's runs (each claimed by the process that trains it), its figure, its record and
    its contrasts."""
    from stepjax.config import command_config
    from stepjax.train import StopAfterRun, describe_status, run_status

    parallel.configure_cpu_devices()  # as `stepjax.main` and the study: one CPU device per core
    config = command_config(args.exp, args.overrides)
    name = lottery_name(args.exp, args.ratio, config.seed)
    root = Path(args.root or f"runs/lottery/{name}")
    reuse = dict(item.split("=", 1) for item in args.reuse if "=" in item)
    if len(reuse) != len(args.reuse):
        raise UserError(f"--reuse takes NAME=DIR items; got {args.reuse}.")
    record = results_root() / "lottery" / name  # also keeps the ranking the placements came from
    if args.status:
        scores, _ = cached_scores(args.nsi_workdir, (root, record), indicator=args.indicator, num_samples=args.nsi_samples)
        print(f"lottery {name} (runs in {root})")
        for run in placement_configs(config, ratio=args.ratio, num_random=args.num_random, scores=scores):
            print(f"{run:12s} {describe_status(run_status(placement_dir(run, root, reuse)))}")
        return errors.DONE
    with StopAfterRun() as after:
        scores, ranking = cached_scores(args.nsi_workdir, (root, record), indicator=args.indicator,
                                        num_samples=args.nsi_samples)
        configs = placement_configs(config, ratio=args.ratio, num_random=args.num_random, scores=scores)
        results = run_lottery(configs, root, plot_only=args.plot_only, reuse=reuse, stop_after=after)
    out = Path(args.out or f"docs/figures/analysis/lottery_{name}")
    figure = lottery_figure(results, experiment=args.exp, ratio=args.ratio, ranking=ranking, seed=config.seed)
    out.mkdir(parents=True, exist_ok=True)
    record.mkdir(parents=True, exist_ok=True)
    (record / "lottery.json").write_text(json.dumps(figure, indent=1))
    figures.plot_lottery(figure, out / "lottery.png")
    for run in figure["runs"]:
        best = run["best_accuracy"]
        print(f"{run['name']:12s} {run['status']:9s} best {'pending' if best is None else f'{100 * best:.2f} %'}"
              f"  blocks {run['blocks']}")
    print("best accuracy, points:", json.dumps(figure["contrasts"]["best_accuracy"]))
    print("wrote", record / "lottery.json", out / "lottery.png", sep="\n  ")
    unfinished = any(r["status"] != "done" for r in results.values())
    stopped = any(r["status"] == "preempted" for r in results.values()) or (after.requested and unfinished)
    return errors.STOPPED if stopped else errors.DONE


if __name__ == "__main__":
    parallel.restart_with_huge_pages()  # before any work: glibc reads its tunables at start-up
    errors.exit_process(main())
