"""The accuracy study: a plan of (experiment, seed) runs trained one after another, resumably.

``python -m stepjax.study [--plan cpu] [--root runs/study]`` trains every run of the plan that is
not finished yet (each in ``<root>/<experiment>_s<seed>``, resuming from its checkpoints) and
evaluates each finished run with flip test-time augmentation (`stepjax.evaluate`); then
``python -m stepjax.results`` turns the run directories into docs/RESULTS.md.

Each run trains in a process of its own (``python -m stepjax.main``), so that a run that dies (e.g.
aborted by XLA) ends only itself: it is retried once (resuming from its last checkpoint), and if it
fails again the study goes on with the next run and names the failed ones at the end (exit status
1). SIGTERM and SIGINT are passed on to the running training, which saves a checkpoint; then the
study stops (exit status 3). SIGUSR1 lets the running training finish and stops the study after it
(exit status 3; `stepjax.train.after_run`).

Several study processes may work through one plan at once (``make deep-lanes``: one per core): each
claims a run before it trains it (`stepjax.train.lock` on ``<root>/.claims/<run>``), and a run
another live process has claimed is left to it.

A run cut before its first checkpoint (killed, with nothing to resume from) is moved to
``<root>/.cut/`` and trained afresh (`stepjax.train.set_aside_cut_run`).

A run whose directory is gone but whose record in ``results/`` is finished (trained in an earlier
checkout) counts as finished: it is neither trained nor evaluated again.

The study analyses each pair of its runs that `stepjax.analysis.seeds.PAIRS` names (SE against
plain, StepNet against SE, per seed) as soon as both are finished and their checkpoints are here,
before its next training (a 20-minute analysis is not left waiting for hours of training):
``python -m stepjax.analysis`` on 500 test images, its record in ``results/analysis/<protocol>_<pair>_s<seed>``
and its figures in ``docs/figures/analysis/`` under the same name. An analysis already filed is not
run again; ``--status`` lists each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from stepjax import errors, parallel
from stepjax.analysis.__main__ import DEFAULT_OUT, RECORDS
from stepjax.analysis.seeds import PAIRS, pair_analysis
from stepjax.records import analysis_record, finished_run, results_root

SEEDS = (0, 1, 2)
PLANS = {
    # 3 seeds of plain, SE and StepNet; one seed of the StepNet ablation, CBAM and DIA
    "cpu": [(f"cifar10_{c}:cpu", s) for s in SEEDS for c in ("resnet", "se", "stepnet")]
    + [(f"cifar10_{c}:cpu", 0) for c in ("stepnet_nohistory", "cbam", "dia")],
    # the deep protocol (ResNet-164 topology): seed 0 of plain, SE and StepNet first, then seeds 1, 2
    "deep": [(f"cifar10_{c}:deep", s) for s in SEEDS for c in ("resnet", "se", "stepnet")],
    # its control for a gate that does not vary with the image (docs/ANALYSIS.md 3.9): a trained
    # constant step per channel, the same three seeds
    "deep_controls": [("cifar10_channel_step:deep", s) for s in SEEDS],
    # seeds 3 and 4 of SE, StepNet and the control at depth: three seeds detect a paired
    # difference of about 1 point (docs/ANALYSIS.md 3.14), five about 0.6 at the spread of seeds 0-2
    "deep_more": [(f"cifar10_{c}:deep", s) for s in (3, 4) for c in ("se", "stepnet", "channel_step")],
    # and of the plain network, so that every comparison with it is paired over five seeds too
    "deep_plain_more": [("cifar10_resnet:deep", s) for s in (3, 4)],
}
ROOTS = {"cpu": "runs/study", "deep": "runs/deep", "deep_controls": "runs/deep", "deep_more": "runs/deep",
         "deep_plain_more": "runs/deep"}  # run directories; records go to results/<same>
ANALYSIS_SAMPLES = 500  # test images of each pairwise analysis (docs/ANALYSIS.md 3.5-3.10)


def run_dir(root: Path, exp: str, seed: int) -> Path:
    return Path(root) / f"{exp.replace(':', '_')}_s{seed}"


def finished_steps(workdir: Path) -> int | None:
    """The step count of a finished run (in its run directory or, once that is gone, its record),
    None while it is not finished."""
    folder = finished_run(workdir)
    return None if folder is None else json.loads((folder / "summary.json").read_text()).get("steps")


def protocol_mismatch(exp: str, workdir: Path) -> str | None:
    """Why a finished run cannot count for `exp` (trained under another protocol), or None."""
    from stepjax.config import load_experiment, read_run_config
    from stepjax.results import protocol

    current, saved = protocol(load_experiment(exp).to_dict()), protocol(read_run_config(finished_run(workdir)).to_dict())
    if saved == current:
        return None
    return (f"{workdir} is a finished run trained under another protocol than {exp}'s current one:\n"
            f"  run: {saved}\n  now: {current}\nMove it aside (e.g. to another root, reported apart) or "
            "pass another --root; nothing was trained.")


def command(exp: str, seed: int, workdir: Path) -> str:
    """The shell command that trains (or resumes) one run of the plan."""
    return f"python -m stepjax.main --config {exp} --workdir {shlex.quote(str(workdir))} seed={seed}"


class _Child:
    """Runs one child process at a time (a training or an analysis); SIGTERM and SIGINT are passed on
    to it and stop the study once it has ended (a training saves its checkpoint first)."""

    def __init__(self):
        self.child = None
        self.stop = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.stop = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)  # after Ctrl-C it has it already; a training ignores the repeat

    def run(self, shell_command: str) -> int:
        """Runs one ``python -m ...`` command of the plan in this interpreter; returns its exit status."""
        self.child = subprocess.Popen([sys.executable, *shlex.split(shell_command)[1:]])
        try:
            return self.child.wait()
        finally:
            self.child = None

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def plan_analyses(runs) -> list[tuple[str, Path, Path]]:
    """The pairwise analyses (`stepjax.analysis.seeds.PAIRS`) among a plan's `runs`: ``(name,
    analysed run, compared run)`` for each pair whose two runs the plan has under one seed."""
    by_experiment = {(exp, seed): workdir for exp, seed, workdir in runs}
    analyses = []
    for pair, (ours, other) in PAIRS.items():
        for exp, seed, workdir in runs:
            name, _, protocol = exp.partition(":")
            compared = by_experiment.get((f"{name.removesuffix(ours)}{other}:{protocol}", seed))
            if name.endswith(f"_{ours}") and compared is not None:
                analyses.append((pair_analysis(protocol, pair, seed), workdir, compared))
    return analyses


def analysis_state(name: str, ours: Path, other: Path) -> str:
    """``done`` (its record is filed), ``waiting for <runs>``, ``ready``, or why it cannot run."""
    from stepjax.train.checkpoint import saved_steps

    if analysis_record(results_root() / RECORDS / name) is not None:
        return "done"
    waiting = [str(d) for d in (ours, other) if finished_steps(d) is None]
    if waiting:
        return "waiting for " + " and ".join(waiting)
    gone = [str(d) for d in (ours, other) if not saved_steps(d / "checkpoints")[0]]
    if gone:
        return (f"cannot run: no checkpoint in {' and '.join(gone)} (trained in an earlier checkout; its record "
                "holds no model)")
    return "ready"


def analysis_command(name: str, ours: Path, other: Path) -> str:
    return (f"python -m stepjax.analysis --workdir {shlex.quote(str(ours))} --compare {shlex.quote(str(other))} "
            f"--num-samples {ANALYSIS_SAMPLES} --out {shlex.quote(str(DEFAULT_OUT / name))}")


def _analyse_ready(analyses, child: _Child, after, ran: dict[str, int]) -> None:
    """Run each analysis that is ready, not claimed by another study process and not run before by
    this one (the names in `ran`, to which each is added with its exit status); none is started once
    SIGUSR1 or a signal asked the study to stop."""
    from stepjax.train import claimed

    for name, ours, other in analyses:
        if child.stop or after.requested:
            break
        if name in ran:
            continue
        with claimed(ours.parent / name) as mine:
            if mine and analysis_state(name, ours, other) == "ready":
                shell_command = analysis_command(name, ours, other)
                print(shell_command, flush=True)
                ran[name] = child.run(shell_command)


def _retry(status: int) -> bool:
    """Whether a training that ended with `status` is worth a second try: a crash, or a process killed
    by a signal or aborted (by XLA); not a refusal, a stop, a failed save or a divergence."""
    return status not in (errors.DONE, errors.REFUSED, errors.STOPPED, errors.SAVE_FAILED, errors.DIVERGED)


def _train_pending(runs, training: _Child, after) -> tuple[dict, dict, bool, list]:
    """Train each unfinished run of `runs` that no other process has claimed (a run that dies is
    retried once) and evaluate each finished one; after each run, before the next training, analyse
    each pair of `plan_analyses` that is ready (one this run completed, or the other study processes did).
    Once `after` (a `stepjax.train.StopAfterRun`) is requested by SIGUSR1, start nothing further.

    **Returns:**

    `(failed, analysed, stopped, others)`: workdir -> exit status of the runs that failed, name ->
    exit status of the analyses it ran, whether a signal stopped the study, and the workdirs left to
    the other processes that had claimed them.
    """
    from stepjax.train import claimed

    failed, analysed, others = {}, {}, []
    for exp, seed, workdir in runs:
        if training.stop:
            return failed, analysed, True, others
        with claimed(workdir) as mine:
            if mine:
                stopped = _train_and_evaluate(exp, seed, workdir, training, after, failed)
            else:
                print(f"{workdir}: another study process trains it; going on with the next run.", flush=True)
                others.append(workdir)
                stopped = False
        if stopped:
            return failed, analysed, True, others
        _analyse_ready(plan_analyses(runs), training, after, analysed)
    return failed, analysed, training.stop, others  # a signal may have come during an analysis


def _train_and_evaluate(exp: str, seed: int, workdir: Path, training: _Child, after, failed: dict) -> bool:
    """Train one run unless it is finished, then evaluate it unless its evaluation is filed; a failed
    training goes into `failed`. Returns whether the study is to stop."""
    from stepjax.evaluate import evaluate_run, read_evaluation
    from stepjax.records import file_run
    from stepjax.train import set_aside_cut_run

    if finished_steps(workdir) is None:
        if after.requested:
            return True
        set_aside_cut_run(workdir)
        print(command(exp, seed, workdir), flush=True)
        status = training.run(command(exp, seed, workdir))
        if _retry(status) and not training.stop:
            print(f"{workdir}: the training died (exit status {status}); retrying once, from its last "
                  "checkpoint.", file=sys.stderr, flush=True)
            status = training.run(command(exp, seed, workdir))
        if status == errors.STOPPED or training.stop:
            return True
        if status != errors.DONE:
            failed[workdir] = status
            return False
    if read_evaluation(finished_run(workdir), finished_steps(workdir)) is None:
        result = evaluate_run(workdir)
        print(f"{workdir}: test accuracy {100 * result['accuracy']:.2f} %, with flip TTA "
              f"{100 * result['flip_accuracy']:.2f} %; record filed in {file_run(workdir)}", flush=True)
    return False


def print_status(runs) -> None:
    """One line per run of the plan: where it stands (`stepjax.train.status`), with the flip-TTA
    accuracy of a finished run whose evaluation is filed."""
    from stepjax.evaluate import read_evaluation
    from stepjax.train import describe_status, run_status

    for _, _, workdir in runs:
        status = run_status(workdir)
        line = describe_status(status)
        evaluation = read_evaluation(finished_run(workdir), status.step) if status.state == "done" else None
        if evaluation is not None:
            line += f", with flip TTA {100 * evaluation['flip_accuracy']:.2f} %"
        print(f"{str(workdir):45s} {line}")
    for name, ours, other in plan_analyses(runs):
        print(f"{'analysis ' + name:45s} {analysis_state(name, ours, other)}")


def seed_set(text: str) -> set[int]:
    """``--seeds`` as a set: ``0`` or ``1,2``."""
    try:
        return {int(s) for s in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds, e.g. 0 or 1,2") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    parser.add_argument("--root", help="run directories (default runs/study for cpu, runs/deep for deep)")
    parser.add_argument("--seeds", type=seed_set,
                        help="only the plan's runs of these seeds, e.g. 0 or 1,2 (default all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands of pending runs and of the analyses ready to run")
    parser.add_argument("--status", action="store_true",
                        help="print where each run of the plan stands (done, training, stopped, pending); train nothing")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a reported error")
    args = parser.parse_args(argv)
    args.root = args.root or ROOTS.get(args.plan, f"runs/{args.plan}")
    errors.setup_logging(args.debug)
    return errors.run(lambda: _study(args), debug=args.debug)


def _study(args) -> int:
    from stepjax.train import StopAfterRun

    parallel.configure_cpu_devices()
    runs = [(exp, seed, run_dir(args.root, exp, seed)) for exp, seed in PLANS[args.plan]
            if args.seeds is None or seed in args.seeds]
    if not runs:
        raise errors.UserError(f"plan {args.plan} has no run of seeds {sorted(args.seeds)}; its seeds are "
                               f"{sorted({seed for _, seed in PLANS[args.plan]})}.")
    stale = [why for exp, _, d in runs if finished_steps(d) is not None and (why := protocol_mismatch(exp, d))]
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return errors.REFUSED
    if args.status:
        print_status(runs)
        return errors.DONE
    if args.dry_run:
        for exp, seed, workdir in runs:
            if finished_steps(workdir) is None:
                print(command(exp, seed, workdir))
        for name, ours, other in plan_analyses(runs):
            if analysis_state(name, ours, other) == "ready":
                print(analysis_command(name, ours, other))
        return errors.DONE
    training = _Child()
    try:
        with StopAfterRun() as after:
            failed, analysed, stopped, others = _train_pending(runs, training, after)
        failed_analyses = [] if stopped else [name for name, status in analysed.items() if status != errors.DONE]
    finally:
        training.restore()
    if others:
        print("stepjax.study: left to the other study processes that train them: " + ", ".join(map(str, others)),
              file=sys.stderr)
    if failed:
        print(f"stepjax.study: {len(failed)} of {len(runs)} runs failed (their messages are above); rerun to "
              "retry them, finished runs are kept: " + ", ".join(f"{d} (exit status {s})" for d, s in failed.items()),
              file=sys.stderr)
    if failed_analyses:
        print(f"stepjax.study: the analyses {', '.join(failed_analyses)} failed (their messages are above); "
              "rerun the study to retry them.", file=sys.stderr)
    if stopped:
        how = ("by a signal (a running training saved its checkpoint)" if training.stop else
               "after the run in progress, as SIGUSR1 asked")
        print(f"stepjax.study: stopped {how}; rerun to go on.", file=sys.stderr)
    return errors.STOPPED if stopped else errors.CRASHED if failed or failed_analyses else errors.DONE


if __name__ == "__main__":
    parallel.restart_with_huge_pages()  # before any work: glibc reads its tunables at start-up
    errors.exit_process(main())
