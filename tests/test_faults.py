"""Faults a long study meets (docs/RELIABILITY.md): a starved core, a second writer, signals, a save
cut short, a refused resume, a full disk, broken input files, a run that dies inside the study."""

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stepjax import data, errors, parallel, study
from stepjax.config import apply_overrides, load_experiment
from stepjax.evaluate import evaluate_run
from stepjax.main import main
from stepjax.results import collect
from stepjax.train import WorkdirLock, WorkdirLocked, claim_dir, load_run, read_metrics, restore_run, train
from stepjax.train.checkpoint import saved_steps

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "cifar10_resnet:smoke"


def smoke_config(*overrides):
    return apply_overrides(load_experiment(SMOKE), ["train.progress=False", *overrides])


def _main_process(workdir, *overrides, script=None):
    """`python -m stepjax.main` on the smoke experiment (or `script` with the same arguments)."""
    args = ["--config", SMOKE, "--workdir", str(workdir), "train.progress=False", *overrides]
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "stepjax.main", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(workdir, split="train"):
    return [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == split]


def _snapshot(workdir, names=("config.json", "command.txt", "code.txt", "metrics.jsonl")):
    return {name: (workdir / name).read_bytes() for name in names if (workdir / name).exists()}


@pytest.fixture
def cli(monkeypatch):
    """`main` in this process leaves no trace on the next tests (XLA_FLAGS, the unraisable hook)."""
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    return main


# ---- a starved core ----

STALL = """
import sys, time
from stepjax import parallel
parallel.configure_cpu_devices(2)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
mesh = parallel.data_mesh()

def stall(index, x):
    if int(index) == 0:
        time.sleep(float(sys.argv[1]))
    return x

def step(x):  # device 0's thread sleeps inside the step; device 1's waits for it at the all-reduce
    x = jax.pure_callback(stall, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.lax.axis_index("data"), x)
    return jax.lax.psum(x, "data")

x = jax.device_put(jnp.arange(4.0), parallel.batch_sharded(mesh))
print(np.asarray(jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P()))(x)).tolist())
"""


def test_a_device_thread_stalled_for_a_minute_does_not_kill_the_run():
    # XLA's default aborts the process once a thread has waited 20 + 40 s at a collective (rc 134,
    # "Termination timeout ... of 40 seconds exceeded"): stall one device for 65 s
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.time()
    result = subprocess.run([sys.executable, "-c", STALL, "65"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["[2.0,", "4.0]"]  # [0 + 2, 1 + 3]
    assert time.time() - start > 65


def test_the_collective_timeouts_leave_a_users_value_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                    "--xla_cpu_collective_call_terminate_timeout_seconds=7")
    parallel.set_default_xla_flags(parallel.COLLECTIVE_TIMEOUTS)
    parallel.set_default_xla_flags(parallel.COLLECTIVE_TIMEOUTS)  # a second start-up adds nothing
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2", "--xla_cpu_collective_call_terminate_timeout_seconds=7",
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300"]


# ---- one writer per workdir ----

def test_a_second_writer_is_refused_and_readers_are_not(tmp_path, cli, capsys):
    workdir = tmp_path / "run"
    train(smoke_config("train.total_steps=2"), workdir)
    before = _snapshot(workdir)
    holder = WorkdirLock(workdir)
    holder.acquire()
    try:
        who = rf"in use by pid {os.getpid()} on host {re.escape(socket.gethostname())}, since 20\d\d-"
        with pytest.raises(WorkdirLocked, match=who + r".*delete the lock file"):
            train(smoke_config("train.total_steps=4"), workdir)
        with pytest.raises(WorkdirLocked, match=who):
            evaluate_run(workdir)
        assert cli(["--config", SMOKE, "--workdir", str(workdir), "train.total_steps=4"]) == errors.REFUSED
        assert re.fullmatch(f"stepjax: {re.escape(str(workdir))} is " + who + r".*\n", capsys.readouterr().err)
        assert load_run(workdir)[2] == 2 and collect(tmp_path)[0]["status"] == "done"  # readers go on
    finally:
        holder.release()
    assert _snapshot(workdir) == before and not (workdir / "writer.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_one_from_another_host_is_not(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock = WorkdirLock(tmp_path)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "2026-11-30T10:00:00"}))
    lock.acquire()
    assert f"Took over the lock of {tmp_path}: pid {dead.pid}" in caplog.text
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": os.getpid(), "since": "2026-11-30T10:00:00"}))
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on host elsewhere.*delete the lock file"):
        WorkdirLock(tmp_path).acquire()


# ---- shutdown ----

def test_sigint_saves_and_a_second_signal_does_not_cut_the_save(tmp_path):
    workdir = tmp_path / "run"
    run = _main_process(workdir, "train.total_steps=100000", "train.checkpoint_every_steps=100000",
                        "train.log_every_steps=1", "train.eval_every_epochs=100000")
    lines, stopping = [], threading.Event()

    def read_stderr():
        for line in run.stderr:
            lines.append(line)
            if "SIGINT received" in line:
                stopping.set()

    reader = threading.Thread(target=read_stderr)
    reader.start()
    deadline = time.time() + 300
    while not ((workdir / "metrics.jsonl").exists() and _steps(workdir) and _steps(workdir)[-1] >= 3):
        assert time.time() < deadline and run.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    assert stopping.wait(60), "".join(lines)[-3000:]
    run.send_signal(signal.SIGTERM)  # while the checkpoint is being saved
    assert run.wait(timeout=300) == errors.STOPPED, "".join(lines)[-3000:]
    reader.join()
    assert any("SIGTERM received again" in line for line in lines), "".join(lines)[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["steps"] >= 3
    assert saved_steps(workdir / "checkpoints") == ([summary["steps"]], [])
    assert restore_run(workdir)[2] == summary["steps"]


def test_a_rerun_over_an_unfinished_checkpoint_says_so_and_never_restarts_silently(tmp_path):
    workdir = tmp_path / "run"
    base = ["train.total_steps=6", "train.checkpoint_every_steps=100", "train.log_every_steps=1"]
    train(smoke_config(*base, "train.halt_after_steps=2"), workdir)
    (workdir / "checkpoints" / "2").rename(workdir / "checkpoints" / "2.orbax-checkpoint-tmp")  # killed while saving
    before = _snapshot(workdir)
    refusal = (r"holds 2 records up to step 2 in metrics.jsonl and an unfinished checkpoint "
               r"\(2.orbax-checkpoint-tmp.*no finished checkpoint.*--discard-record")
    with pytest.raises(errors.UserError, match=refusal):
        train(smoke_config(*base), workdir)
    shutil.rmtree(workdir / "checkpoints" / "2.orbax-checkpoint-tmp")
    with pytest.raises(errors.UserError, match=r"holds 2 records up to step 2 in metrics.jsonl but no finished"):
        train(smoke_config(*base), workdir)
    assert _snapshot(workdir) == before
    assert train(smoke_config(*base), workdir, discard_record=True)["steps"] == 6
    assert _steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_a_refused_resume_leaves_the_record_unchanged(tmp_path, cli, capsys):
    workdir = tmp_path / "run"
    assert cli(["--config", SMOKE, "--workdir", str(workdir), "train.total_steps=2", "train.progress=False"]) == 0
    before = _snapshot(workdir)
    assert cli(["--config", SMOKE, "--workdir", str(workdir), "seed=1", "optim.lr=0.02"]) == errors.REFUSED
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("stepjax: Data iterator state was saved with {'seed': 0")
    assert [line for line in err if not line[:4].isdigit()] == err[-1:]  # else only timestamped log lines
    assert _snapshot(workdir) == before


# ---- a full disk ----

FULL_DISK = """
import errno, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

save = handler.JsonCheckpointHandler._save_fn

async def no_space_at_step_4(self, item, directory):  # written in the background, as the arrays are
    if "/4.orbax-checkpoint-tmp" in str(directory):
        raise OSError(errno.ENOSPC, "No space left on device")
    return await save(self, item, directory)

handler.JsonCheckpointHandler._save_fn = no_space_at_step_4
sys.argv = ["stepjax.main", *sys.argv[1:]]
runpy.run_module("stepjax.main", run_name="__main__", alter_sys=True)
"""


def test_a_full_disk_is_reported_at_once_in_one_line_and_the_previous_checkpoint_stays(tmp_path):
    workdir = tmp_path / "run"
    run = _main_process(workdir, "train.total_steps=12", "train.checkpoint_every_steps=2", "train.log_every_steps=1",
                        script=FULL_DISK)
    _, err = run.communicate(timeout=400)
    assert run.returncode == errors.SAVE_FAILED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stepjax: Could not write the checkpoint of step 4 in {workdir}/checkpoints: the disk is "
                           "full. Free space there, or keep fewer checkpoints (train.keep_checkpoints")
    assert last.endswith("resume from step 2.") and "Traceback" not in err and "Event loop" not in err
    assert _steps(workdir)[-1] == 4  # noticed at the save, not at the next one
    assert saved_steps(workdir / "checkpoints") == ([2], [])
    assert restore_run(workdir)[2] == 2


# ---- broken input files ----

def _npz_bytes(tmp_path, **arrays):
    path = tmp_path / "scratch.npz"
    np.savez(path, **arrays)
    return path.read_bytes()


GOOD = {"image": np.full((64, 32, 32, 3), 128, np.uint8), "label": np.arange(64) % 10}
BROKEN = {  # how to write the broken file, and what the message says
    "empty": (lambda tmp: b"", r"is empty \(0 bytes"),
    "truncated": (lambda tmp: _npz_bytes(tmp, **GOOD)[:5000], r"cannot be read as an npz archive, truncated"),
    "random bytes": (lambda tmp: np.random.default_rng(0).bytes(4000), r"is not an npz archive \(no zip header\)"),
    "an npy file": (lambda tmp: _npy_bytes(tmp), r"holds a single .npy array"),
    "missing key": (lambda tmp: _npz_bytes(tmp, image=GOOD["image"]), r"lacks key\(s\) \['label'\]"),
    "float images": (lambda tmp: _npz_bytes(tmp, image=GOOD["image"] / 255.0, label=GOOD["label"]),
                     (r"'image' has dtype float64; expected uint8 .*pixels in \[0, 1\]: convert with "
                      r"np.clip\(np.round\(x \* 255\)")),
    "channels first": (lambda tmp: _npz_bytes(tmp, image=GOOD["image"].transpose(0, 3, 1, 2), label=GOOD["label"]),
                       r"'image' has shape \(64, 3, 32, 32\); expected NHWC .*x.transpose\(0, 2, 3, 1\)"),
}


def _npy_bytes(tmp_path):
    path = tmp_path / "scratch.npy"
    np.save(path, GOOD["image"])
    return path.read_bytes()


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_input_file_is_named_before_training_starts(tmp_path, split, case):
    directory = tmp_path / "data"
    directory.mkdir()
    for name in ("train", "test"):
        np.savez(directory / f"{name}.npz", **GOOD)
    write, message = BROKEN[case]
    (directory / f"{split}.npz").write_bytes(write(tmp_path))
    workdir = tmp_path / "run"
    with pytest.raises(errors.UserError, match=f"^{re.escape(str(directory / split))}.npz:? " + message) as error:
        train(smoke_config("data.source='npz'", f"data.dir='{directory}'"), workdir)
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(workdir)) == []  # refused before anything was written


def test_the_suggested_conversion_of_float_images_works(tmp_path):
    images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3))
    np.savez(tmp_path / "train.npz", image=images, label=GOOD["label"][:4])
    config = smoke_config("data.source='npz'", f"data.dir='{tmp_path}'")
    with pytest.raises(errors.UserError) as error:
        data.load_split(config.data, "train")
    expression = re.search(r"convert with (np\.clip\(.*\)\.astype\(np\.uint8\))", str(error.value)).group(1)
    converted = eval(expression, {"np": np, "x": images})
    assert converted.dtype == np.uint8 and np.array_equal(converted, np.round(images * 255).astype(np.uint8))


# ---- user errors on the command line ----

def test_user_errors_print_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path, cli, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "train.npz").write_bytes(b"")
    cases = [
        (["--config", "cifar10_resnett"], r"Unknown experiment 'cifar10_resnett'\. Available: .*make list"),
        (["--config", SMOKE, "train.epochz=3"], r"Unknown config key 'train.epochz'\. Valid keys: .*train.epochs"),
        (["--config", SMOKE, "data.source='npz'", f"data.dir='{empty}'"],
         re.escape(str(empty / "train.npz")) + " is empty"),
    ]
    for argv, message in cases:
        assert cli([*argv, "--workdir", str(tmp_path / "run")]) == errors.REFUSED
        assert re.fullmatch(f"stepjax: {message}.*\n", capsys.readouterr().err)
    with pytest.raises(errors.UserError, match="Unknown experiment"):
        cli(["--config", "cifar10_resnett", "--debug"])


# ---- the study ----

def test_sigusr1_lets_the_running_training_finish_and_stops_the_study(tmp_path, monkeypatch, capfd):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    for path in (ROOT / "experiments").glob("*.py"):
        (experiments / path.name).symlink_to(path)
    (experiments / "signals.py").write_text(  # the smoke run, whose training signals the study as it starts
        '"""The smoke run; SIGUSR1 to the parent."""\nimport os, signal\n\nfrom stepjax.config import load_experiment\n\n\n'
        f'def get_config(arg):\n    os.kill(os.getppid(), signal.SIGUSR1)\n    return load_experiment("{SMOKE}")\n')
    monkeypatch.setenv("STEPJAX_EXPERIMENTS", str(experiments))
    monkeypatch.setitem(study.PLANS, "tiny", [("signals", 0), (SMOKE, 1)])
    root = tmp_path / "study"
    assert study.main(["--plan", "tiny", "--root", str(root)]) == errors.STOPPED
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "stepjax.study: stopped after the run in progress, as SIGUSR1 asked; rerun to go on.")
    assert json.loads((study.run_dir(root, "signals", 0) / "summary.json").read_text())["status"] == "done"
    assert (study.run_dir(root, "signals", 0) / "evaluation.json").exists()  # finished and evaluated
    assert not study.run_dir(root, SMOKE, 1).exists()  # the next run was not started


def test_a_run_another_study_process_claimed_is_left_to_it(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(study.PLANS, "tiny", [(SMOKE, 0), (SMOKE, 1)])
    claimed, free = study.run_dir(tmp_path, SMOKE, 0), study.run_dir(tmp_path, SMOKE, 1)
    other = WorkdirLock(claim_dir(claimed))  # as a second study process holds it while it trains
    other.acquire()
    try:
        assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == errors.DONE
    finally:
        other.release()
    out, err = capfd.readouterr()
    assert f"{claimed}: another study process trains it; going on with the next run." in out
    assert err.strip().splitlines()[-1] == f"stepjax.study: left to the other study processes that train them: {claimed}"
    assert not claimed.exists() and (free / "evaluation.json").exists()
    assert not (claim_dir(free) / "writer.lock").exists()  # its claim ends with the run


def test_the_study_goes_on_when_a_run_dies_and_names_it_at_the_end(tmp_path, monkeypatch, capfd):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    for path in (ROOT / "experiments").glob("*.py"):
        (experiments / path.name).symlink_to(path)
    (experiments / "crash.py").write_text(  # a run that aborts, as XLA aborts a process
        '"""Aborts."""\nimport os, signal\n\n\ndef get_config(arg):\n    os.kill(os.getpid(), signal.SIGABRT)\n')
    monkeypatch.setenv("STEPJAX_EXPERIMENTS", str(experiments))
    monkeypatch.setitem(study.PLANS, "tiny", [("crash", 0), (SMOKE, 0)])
    root = tmp_path / "study"
    assert study.main(["--plan", "tiny", "--root", str(root)]) == errors.CRASHED
    err = capfd.readouterr().err
    crashed = study.run_dir(root, "crash", 0)
    assert err.count(f"{crashed}: the training died (exit status -6); retrying once") == 1
    assert err.strip().splitlines()[-1].startswith("stepjax.study: 1 of 2 runs failed")
    assert err.strip().endswith(f"{crashed} (exit status -6)")
    assert json.loads((study.run_dir(root, SMOKE, 0) / "evaluation.json").read_text())["step"] == 16


def test_a_command_run_in_process_logs_to_stderr_as_it_is_now(monkeypatch):
    """A command's logging follows `sys.stderr`: once the stream it was set up under is closed (a
    test's capture, a notebook cell), the next line reaches the new one instead of failing."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    errors.setup_logging(debug=True)
    sys.stderr.close()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("stepjax").info("a later line")
    assert "stepjax: a later line" in later.getvalue()
    assert "Logging error" not in later.getvalue()
