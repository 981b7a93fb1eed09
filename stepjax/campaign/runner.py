"""Run one campaign item on this machine within a time budget, and pack what it gives into an
output folder that fits what a device call brings back (at most 8 files of at most 16 MiB).

Trainings run as ``python -m stepjax.main`` processes, `Item.concurrency` at a time, in run
directories ``<device root>/runs/<record>`` (a run directory carried there by staging resumes).
A training is started only while `MIN_START_S` of its window are left; when the window ends, the
runner sends SIGTERM (the training saves a checkpoint and stops as *preempted*), then SIGKILL
after `GRACE_S`. The analyses follow, side by side, until `PACK_S` before the budget's end.

The output folder holds ``campaign.json`` (the item, the device, the command, the wall time and
every run's outcome), ``records.tar.gz`` (the ``results/`` records of the item's runs, the
analyses' records (``analysis.json.gz``) and figures, the measurements, the logs) and ``run<k>.tar.gz``
(`stepjax.campaign.staging.bundle_run`: the newest checkpoint of a run, to resume it or analyse
it later), as many as fit: unfinished runs first, then runs whose analyses are still to do, then
the rest. `stepjax.campaign.filing` files it on the CPU side.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from stepjax.campaign import plan as planning
from stepjax.campaign import staging
from stepjax.data.sources import DATA_DIR_ENV
from stepjax.records import CODE_VERSION_ENV, RESULTS_ENV, RUNS_DIR, analysis_record, file_run

REPO = Path(__file__).resolve().parents[2]
MAX_FILES, FILE_LIMIT, TOTAL_LIMIT = 8, 16 * staging.MIB, 64 * staging.MIB
GRACE_S = 60.0  # from SIGTERM to SIGKILL: a checkpoint of ResNet-164 is written in seconds
MIN_START_S = 120.0  # no training starts with less of its window left
POLL_S = 1.0
LOG_TAIL = 20  # lines of a failed job's log kept in campaign.json
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


class CampaignError(RuntimeError):
    """The item cannot run here (e.g. the data are not staged); the message is one line."""


@dataclasses.dataclass
class Job:
    """One process of the item: a training or an analysis."""

    name: str
    argv: list[str]
    env: dict
    log: Path
    process: subprocess.Popen | None = None
    started: float | None = None
    ended: float | None = None
    signalled: float | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.started = time.monotonic()

    def poll(self) -> bool:
        """True once the process has ended."""
        if self.process is not None and self.ended is None and self.process.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    def stop(self, now: float) -> None:
        """SIGTERM first (a training checkpoints and stops), SIGKILL `GRACE_S` later."""
        if self.signalled is None:
            self.process.send_signal(signal.SIGTERM)
            self.signalled = now
        elif now - self.signalled > GRACE_S:
            self.process.kill()

    def outcome(self) -> dict:
        code = self.process.returncode if self.process is not None else None
        out = {"name": self.name, "command": " ".join(self.argv[1:]), "returncode": code,
               "wall_s": round(self.ended - self.started, 1) if self.ended and self.started else None,
               "stopped_by_deadline": self.signalled is not None}
        if code not in (0, None) and self.log.exists():
            out["log_tail"] = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        return out


@dataclasses.dataclass
class Context:
    """Where an item runs: the results tree that says what is finished, the device root (data,
    run directories, installed wheels), the work folder of this command, its deadline."""

    results: Path
    root: Path
    work: Path
    deadline: float

    def workdir(self, record: str) -> Path:
        return self.root / RUNS_DIR / record

    def left(self) -> float:
        return self.deadline - time.monotonic()


def base_env(ctx: Context, item: planning.Item, share: int) -> dict:
    """The environment of the item's processes: this checkout and the carried wheels first on the
    path, the staged data, a compilation cache shared by the processes, `share` of GPU memory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(ctx.root / "site"), env.get("PYTHONPATH")]))
    env.update(PYTHONUNBUFFERED="1", STEPJAX_RESULTS=str(ctx.work / "filed"),
               XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / max(share, 1):.3f}")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ctx.root / "jax-cache"))
    code = staging.staged_code(ctx.root)
    if code:  # what main.code_version records where the tree came without git
        env[CODE_VERSION_ENV] = code
    if item.data:
        env[DATA_DIR_ENV] = str(staging.data_dir(ctx.root))
    env.update(dict(pair.split("=", 1) for pair in item.env))
    return env


def training_job(training: planning.Training, ctx: Context, env: dict) -> Job:
    argv = [sys.executable, "-m", "stepjax.main", "--config", training.exp, "--workdir", str(ctx.workdir(training.record)),
            f"seed={training.seed}", *training.overrides, "train.progress=False"]
    return Job(training.record, argv, env, ctx.work / "logs" / f"{training.name}.log")


def analysis_job(analysis: planning.Analysis, ctx: Context, env: dict) -> Job:
    argv = [sys.executable, "-m", "stepjax.analysis", "--workdir", str(ctx.workdir(analysis.model)),
            "--out", str(ctx.work / "analysis" / analysis.name), *analysis.options]
    if analysis.compare:
        argv += ["--compare", str(ctx.workdir(analysis.compare))]
    if DATA_DIR_ENV in env:
        argv += ["--data-dir", env[DATA_DIR_ENV]]
    # the record (analysis.json.gz) goes to <results>/analysis/<name>: here, beside its figures
    env = {**env, RESULTS_ENV: str(ctx.work)}
    return Job(analysis.name, argv, env, ctx.work / "logs" / f"{analysis.name}.log")


def run_jobs(jobs: list[Job], concurrency: int, window_end: float, min_start_s: float) -> list[Job]:
    """Run `jobs`, `concurrency` at a time, none started with less than `min_start_s` before
    `window_end`, every one still running at `window_end` stopped (`Job.stop`). Returns the jobs
    that were started."""
    queue, running, started = list(jobs), [], []
    while queue or running:
        now = time.monotonic()
        while queue and len(running) < concurrency and window_end - now >= min_start_s:
            job = queue.pop(0)
            job.start()
            running.append(job)
            started.append(job)
        running = [job for job in running if not job.poll()]
        if not running and queue and window_end - now < min_start_s:
            break
        if now >= window_end:
            for job in running:
                job.stop(now)
        time.sleep(POLL_S)
    return started


def run_summary(workdir: Path) -> dict:
    """The outcome a run directory records (``summary.json``), or ``{"status": "not started"}``."""
    path = workdir / "summary.json"
    if not path.exists():
        return {"status": "not finished" if (workdir / "config.json").exists() else "not started"}
    summary = json.loads(path.read_text())
    keep = ("status", "steps", "best_accuracy", "best_epoch", "last_accuracy", "last_epoch", "wall_time_s",
            "eval_time_s", "images_per_sec", "device")
    return {k: summary[k] for k in keep if k in summary}


def finished_here(record: str, ctx: Context) -> bool:
    """Whether this machine holds the finished run `record` with a checkpoint (to analyse it)."""
    workdir = ctx.workdir(record)
    return run_summary(workdir).get("status") == "done" and staging.latest_checkpoint(workdir) is not None


def run_trainings(item: planning.Item, todo: dict, ctx: Context, analyses_s: float) -> list[dict]:
    env = base_env(ctx, item, min(item.concurrency, len(todo["trainings"])))
    jobs = [training_job(t, ctx, env) for t in todo["trainings"]]
    window_end = ctx.deadline - analyses_s
    started = {job.name for job in run_jobs(jobs, item.concurrency, window_end, MIN_START_S)}
    out = []
    for training, job in zip(todo["trainings"], jobs):
        result = {"record": training.record, **run_summary(ctx.workdir(training.record))}
        out.append({**result, **(job.outcome() if job.name in started else {"job": "not started: too little time left"})})
    return out


def run_analyses(item: planning.Item, todo: dict, ctx: Context) -> list[dict]:
    ready = [a for a in todo["analyses"] if finished_here(a.model, ctx) and (a.compare is None or finished_here(a.compare, ctx))]
    if not ready:
        return [{"name": a.name, "status": "inputs not finished on this machine"} for a in todo["analyses"]]
    env = base_env(ctx, item, len(ready))
    jobs = [analysis_job(a, ctx, env) for a in ready]
    run_jobs(jobs, len(jobs), ctx.deadline, 0.0)
    out = []
    for analysis in todo["analyses"]:
        job = next((j for j in jobs if j.name == analysis.name), None)
        done = analysis_record(ctx.work / "analysis" / analysis.name) is not None
        status = "done" if done else ("failed or stopped" if job else "inputs not finished on this machine")
        out.append({"name": analysis.name, "status": status, **(job.outcome() if job else {})})
    return out


def device_name(trainings: list[dict]) -> str:
    """The GPU's name from nvidia-smi, else the device the trainings recorded, else ``unknown``."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
        if names:
            return f"{len(names)} x {names[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    devices = sorted({t["device"] for t in trainings if t.get("device")})
    return ", ".join(devices) or "unknown"


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def pack_records(item: planning.Item, ctx: Context, out: Path) -> Path:
    """The results-format tree of the item (records, analyses, measurements, logs) as ``records.tar.gz``."""
    tree = ctx.work / "pack"
    for training in item.trainings:
        workdir = ctx.workdir(training.record)
        if (workdir / "config.json").exists():
            file_run(workdir, tree / training.record)
    for analysis in item.analyses:
        made = ctx.work / "analysis" / analysis.name
        if analysis_record(made) is not None:
            shutil.copytree(made, tree / "analysis" / analysis.name, dirs_exist_ok=True)
    measured = ctx.work / "measure.json"
    if measured.exists():
        (tree / "measure").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(measured, tree / "measure" / f"{item.key}.json")
    if (ctx.work / "logs").is_dir():
        shutil.copytree(ctx.work / "logs", tree / "logs", dirs_exist_ok=True)
    archive = out / "records.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tree.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def bundle_candidates(item: planning.Item, ctx: Context) -> list[planning.Training]:
    """The item's runs with a checkpoint here, in the order they earn a file: unfinished (to
    resume), finished with an analysis still to do, the rest."""
    analysed = {a.name for a in item.analyses if analysis_record(ctx.work / "analysis" / a.name) is not None}
    wanted = {r for a in item.analyses if a.name not in analysed for r in (a.model, a.compare) if r}
    present = [t for t in item.trainings if staging.latest_checkpoint(ctx.workdir(t.record)) is not None]

    def rank(training):
        done = run_summary(ctx.workdir(training.record)).get("status") == "done"
        return (done, training.record not in wanted)

    return sorted(present, key=rank)


def pack_bundles(item: planning.Item, ctx: Context, out: Path, used: int) -> tuple[list[str], list[str]]:
    """As many `bundle_candidates` as the output limits allow, as ``run<k>.tar.gz``; returns the
    files written and one line per run left out."""
    written, left_out = [], []
    for training in bundle_candidates(item, ctx):
        path = out / f"run{len(written) + 1}.tar.gz"
        staging.bundle_run(ctx.workdir(training.record), ctx.root, path)
        size = path.stat().st_size
        reason = ("the 16 MiB a file may be" if size > FILE_LIMIT else "the 64 MiB all files may be"
                  if used + size > TOTAL_LIMIT else "the 8 files" if len(written) + 3 > MAX_FILES else None)
        if reason:
            path.unlink()
            left_out.append(f"{training.record}: checkpoint ({size / staging.MIB:.1f} MiB) not brought back: above {reason}")
            continue
        written.append(path.name)
        used += size
    return written, left_out


def run_item(item: planning.Item, out: str | Path, *, results: str | Path, root: str | Path, budget_s: float) -> dict:
    """Run the unfinished parts of `item` within `budget_s` seconds and pack them into `out`.

    **Arguments:**

    - `item`: a `stepjax.campaign.plan.Item`.
    - `out`: the output folder (``$OUT`` on the device); created if missing.
    - `results`: the results tree that says what is finished (``results/``).
    - `root`: the device root (staged data, carried run directories, wheels; `staging.device_root`).
    - `budget_s`: seconds from now until everything is packed.

    **Returns:**

    The campaign summary (``campaign.json`` in `out`). Raises `CampaignError` if the item needs
    the data and they are not staged.
    """
    start, stamp = time.monotonic(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results, root, out = Path(results), Path(root), Path(out)
    todo = planning.pending(item, results)
    if item.data and (todo["trainings"] or todo["analyses"]):
        ready, line = staging.data_status(root)
        if not ready:
            raise CampaignError(line)
    ctx = Context(results, root, root / "work" / f"{stamp}-{item.key}", start + budget_s - planning.PACK_S)
    ctx.work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"item": item.key, "title": item.title, "stamp": stamp, "host": socket.gethostname(),
               "command": " ".join(["python", "-m", "stepjax.campaign", *sys.argv[1:]]), "budget_s": budget_s,
               "versions": versions()}
    analyses_s = max((a.est_s for a in todo["analyses"]), default=0.0)
    summary["trainings"] = run_trainings(item, todo, ctx, analyses_s) if todo["trainings"] else []
    if todo["measure"]:
        from stepjax.campaign.measure import run_measure

        summary["measure"] = run_measure(ctx.work / "measure.json", ctx.deadline, base_env(ctx, item, 1))
    summary["analyses"] = run_analyses(item, todo, ctx) if todo["analyses"] else []
    summary["device"] = device_name(summary["trainings"])
    summary["wall_s"] = round(time.monotonic() - start, 1)  # until packing; the packing adds seconds
    records = pack_records(item, ctx, out)
    bundles, left_out = pack_bundles(item, ctx, out, records.stat().st_size + 2 * staging.MIB)
    summary.update(files=["campaign.json", records.name, *bundles], left_out=left_out,
                   packed_wall_s=round(time.monotonic() - start, 1))
    (out / "campaign.json").write_text(json.dumps(summary, indent=1))
    return summary


def describe(summary: dict) -> list[str]:
    """A few lines for the terminal: each run's outcome, the files, what was left out."""
    lines = [f"{summary['item']} on {summary['device']}: {summary['wall_s']:.0f} s of {summary['budget_s']:.0f} "
             f"(packed at {summary['packed_wall_s']:.0f} s)"]
    for t in summary["trainings"]:
        best = f", best {100 * t['best_accuracy']:.2f} %" if t.get("best_accuracy") is not None else ""
        lines.append(f"  {t['record']}: {t['status']}{best}" + (f" (exit {t['returncode']})" if t.get("returncode") else ""))
    lines += [f"  analysis {a['name']}: {a['status']}" for a in summary["analyses"]]
    if "measure" in summary:
        lines.append(f"  measure: {summary['measure']['measured']} of {summary['measure']['planned']} measurements")
    lines.append(f"  files: {', '.join(summary['files'])}")
    lines += [f"  left out: {line}" for line in summary["left_out"]]
    return lines
