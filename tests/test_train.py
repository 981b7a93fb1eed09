"""The training system end to end: smoke run, devices, resume, processes, bad input."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stepjax import kernels, parallel, study
from stepjax.analysis.report import load_images, load_source
from stepjax.config import ADDED_KEYS, apply_overrides, load_experiment, read_run_config, validate
from stepjax.evaluate import evaluate_run, read_evaluation
from stepjax.models import build_model
from stepjax.records import CODE_VERSION_ENV, code_changes, code_version
from stepjax.results import collect
from stepjax.train import NonFiniteLossError, load_run, make_optimizer, read_metrics, restore_run, run_programs, train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "cifar10_stepnet:smoke"


def smoke_config(*overrides):
    return apply_overrides(load_experiment(SMOKE), ["train.progress=False", *overrides])


def params_of(workdir):
    _, model, step = load_run(workdir)
    return step, jax.tree.map(np.asarray, nnx.state(model))


def assert_same_tree(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def test_make_train_smoke_end_to_end(tmp_path):
    """`make train` as a user runs it: the CPU's default convolution path (oneDNN where it is built;
    the other tests run XLA's, see conftest)."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "STEPJAX_CONV"}
    result = subprocess.run(
        ["make", "-s", "train", f"EXP={SMOKE}", f"WORKDIR={workdir}", "ARGS=train.progress=False"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if kernels.load() is None:
        assert "convolutions run in oneDNN" in result.stderr
    assert "best test accuracy" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 16
    assert summary["eval_time_s"] > 0 and summary["wall_time_s"] > 0 and summary["device"] == "cpu"
    records = read_metrics(workdir / "metrics.jsonl")
    test_records = [r for r in records if r["split"] == "test"]
    assert len(test_records) == 2 and len(test_records[0]["step_size"]) == 6  # one mean step per block
    assert (workdir / "checkpoints" / "16").is_dir()
    assert any((workdir / "tb").iterdir())
    assert (workdir / "code.txt").read_text().split()[-1] == code_version()
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]


def test_one_device_equals_four_devices(tmp_path):
    assert jax.device_count() >= 4
    overrides = ["train.total_steps=3", "train.eval_every_epochs=100"]
    train(smoke_config("mesh.num_devices=1", *overrides), tmp_path / "one")
    train(smoke_config("mesh.num_devices=4", *overrides), tmp_path / "four")
    (s1, p1), (s4, p4) = params_of(tmp_path / "one"), params_of(tmp_path / "four")
    assert s1 == s4 == 3
    assert_same_tree(p1, p4, rtol=2e-4, atol=2e-5)
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["split"] == "train"]
    l4 = [r["loss"] for r in read_metrics(tmp_path / "four" / "metrics.jsonl") if r["split"] == "train"]
    np.testing.assert_allclose(l1, l4, rtol=1e-5)


def _restored_state(workdir):
    _, _, step, state, extra = restore_run(workdir)
    return step, {"state": jax.tree.map(np.asarray, state._asdict()), "extra": extra}


def test_resume_after_halt_is_identical(tmp_path, monkeypatch):
    monkeypatch.delenv("STEPJAX_CONV")  # the CPU's default path: oneDNN's convolutions where built
    overrides = ["train.total_steps=4", "train.checkpoint_every_steps=1", "train.log_every_steps=1"]
    train(smoke_config(*overrides), tmp_path / "straight")
    halted = train(smoke_config(*overrides, "train.halt_after_steps=2"), tmp_path / "resumed")
    assert halted["status"] == "preempted" and halted["steps"] == 2
    train(smoke_config(*overrides), tmp_path / "resumed")
    (sa, a), (sb, b) = _restored_state(tmp_path / "straight"), _restored_state(tmp_path / "resumed")
    assert sa == sb == 4
    assert_same_tree(a["state"], b["state"], rtol=0, atol=0)  # params, batch stats, momentum
    assert a["extra"]["data"] == b["extra"]["data"]
    losses = lambda w: [r["loss"] for r in read_metrics(w / "metrics.jsonl") if r["split"] == "train"]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # same batches in the same order


def test_runs_that_compute_the_same_steps_share_their_programs(monkeypatch):
    config = smoke_config("train.total_steps=4")
    graphdef, mesh = nnx.graphdef(build_model(config)), parallel.data_mesh(1)
    programs = run_programs(config, graphdef, 8, 4, mesh)
    longer_and_halted = smoke_config("train.total_steps=6", "train.halt_after_steps=2", "train.log_every_steps=1")
    assert run_programs(longer_and_halted, graphdef, 8, 6, mesh) is programs
    assert run_programs(smoke_config("optim.lr=0.5"), graphdef, 8, 4, mesh) is not programs
    assert run_programs(config, graphdef, 8, 4, parallel.data_mesh(2)) is not programs
    cosine = smoke_config("optim.schedule='cosine'")  # its schedule reads the run's length
    assert run_programs(cosine, graphdef, 8, 4, mesh) is not run_programs(cosine, graphdef, 8, 6, mesh)
    monkeypatch.setenv("STEPJAX_REMAT", "0")  # read when the steps are traced
    assert run_programs(config, graphdef, 8, 4, mesh) is not programs
    monkeypatch.delenv("STEPJAX_REMAT")
    monkeypatch.delenv("STEPJAX_CONV")  # the tests' XLA path -> the CPU's default
    if kernels.path_for(jnp.float32) == "onednn":  # where the extension is built, steps trace other calls
        assert run_programs(config, graphdef, 8, 4, mesh) is not programs


def test_halt_between_log_windows_counts_every_trained_image(tmp_path):
    overrides = ["train.total_steps=4", "train.log_every_steps=3", "train.eval_every_epochs=100"]
    batch = smoke_config().train.global_batch
    halted = train(smoke_config(*overrides, "train.halt_after_steps=2"), tmp_path / "run")
    assert halted["trained_images"] == 2 * batch  # steps 1-2 were never logged
    resumed = train(smoke_config(*overrides), tmp_path / "run")
    assert resumed["status"] == "done" and resumed["trained_images"] == 4 * batch

def _main(workdir, *overrides, env=None):
    cmd = [sys.executable, "-m", "stepjax.main", "--config", SMOKE, "--workdir", str(workdir),
           "train.progress=False", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_process_resumes_to_the_same_result(tmp_path):
    overrides = ["train.total_steps=16", "train.checkpoint_every_steps=2", "train.log_every_steps=1",
                 "train.eval_every_epochs=100"]
    straight = _main(tmp_path / "straight", *overrides)
    _, err = straight.communicate(timeout=300)  # before the next start, which then finds its programs compiled
    assert straight.returncode == 0, err[-3000:]
    killed = _main(tmp_path / "killed", *overrides)
    deadline = time.time() + 300

    def logged_past_checkpoint():  # a checkpoint at step >= 4, and steps logged after the newest one
        saved = [int(p.name) for p in (tmp_path / "killed" / "checkpoints").glob("*") if p.name.isdigit()]
        metrics = tmp_path / "killed" / "metrics.jsonl"
        logged = [r["step"] for r in read_metrics(metrics)] if metrics.exists() else []
        return saved and max(saved) >= 4 and max(logged) > max(saved)

    while not logged_past_checkpoint():
        assert time.time() < deadline and killed.poll() is None, killed.communicate()[1][-2000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _main(tmp_path / "killed", *overrides)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from step" in err
    (sa, a), (sb, b) = _restored_state(tmp_path / "straight"), _restored_state(tmp_path / "killed")
    assert sa == sb == 16
    assert_same_tree(a["state"], b["state"], rtol=0, atol=0)
    # the steps trained again after the checkpoint are logged once
    logged = lambda w: [(r["step"], r["split"]) for r in read_metrics(w / "metrics.jsonl")]
    resumed = logged(tmp_path / "killed")
    assert len(set(resumed)) == len(resumed) and resumed == logged(tmp_path / "straight")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    overrides = ["train.total_steps=3", "train.eval_every_epochs=100"]
    port = _free_port()
    procs = [
        _main(tmp_path / "multi", *overrides, env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "STEPJAX_COORDINATOR": f"localhost:{port}",
            "STEPJAX_NUM_PROCESSES": "2", "STEPJAX_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    train(smoke_config("mesh.num_devices=2", *overrides), tmp_path / "single")
    (sm, pm), (ss, ps) = _restored_state(tmp_path / "multi"), _restored_state(tmp_path / "single")
    assert sm == ss == 3
    assert_same_tree(pm["state"], ps["state"], rtol=2e-4, atol=2e-5)


# ---- bad input: each error names the problem and the fix ----

@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout.strip()

    assert code_version(tmp_path) == "unknown"  # not a checkout
    monkeypatch.setenv(CODE_VERSION_ENV, "abc1234")  # a copy of the tree, with the version staged beside it
    assert code_version(tmp_path) == "abc1234"
    monkeypatch.delenv(CODE_VERSION_ENV)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    assert code_version(tmp_path) == git("rev-parse", "--short", "HEAD")
    assert code_changes(tmp_path) == ""
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == git("rev-parse", "--short", "HEAD") + "+dirty"
    assert code_changes(tmp_path) == ""  # a change outside the code paths is not the code that ran
    (tmp_path / "stepjax").mkdir()
    (tmp_path / "stepjax" / "b.py").write_text("y = 1\n")
    git("add", "stepjax/b.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "second")
    (tmp_path / "stepjax" / "b.py").write_text("y = 2\n")
    assert "-y = 1\n+y = 2\n" in code_changes(tmp_path)


def test_a_start_on_uncommitted_code_keeps_its_changes_in_the_record(tmp_path, monkeypatch):
    from stepjax.train import loop

    workdir = tmp_path / "run"
    monkeypatch.setattr(loop, "LOADED_CHANGES", "")
    train(smoke_config("train.total_steps=2"), workdir)
    assert not (workdir / "code.diff").exists()  # a clean start writes none
    monkeypatch.setattr(loop, "LOADED_CODE", "abc1234+dirty")
    monkeypatch.setattr(loop, "LOADED_CHANGES", "--- a/stepjax/x.py\n+++ b/stepjax/x.py\n")
    train(smoke_config("train.total_steps=4"), workdir)  # resumed on changed code
    diff = (workdir / "code.diff").read_text().splitlines()
    assert diff[0].startswith("# start ") and diff[0].endswith(" abc1234+dirty") and diff[1:] == [
        "--- a/stepjax/x.py", "+++ b/stepjax/x.py"]
    assert (workdir / "code.txt").read_text().splitlines()[-1] == diff[0][len("# start "):]


def test_unknown_experiment_lists_what_exists():
    with pytest.raises(ValueError, match="Unknown experiment 'cifar10_stepnett'.*cifar10_stepnet"):
        load_experiment("cifar10_stepnett")


def test_unknown_variant():
    with pytest.raises(ValueError, match="Unknown variant 'fast'.*smoke"):
        load_experiment("cifar10_se:fast")


def test_unknown_config_key():
    with pytest.raises(ValueError, match="Unknown config key 'train.epochz'.*train.epochs"):
        smoke_config("train.epochz=3")


def test_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match="global_batch=30 is not divisible by the 4 devices"):
        validate(smoke_config("train.global_batch=30"), 4)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=abc", r"optim.lr='abc': expected a number \(the default is"),
    ("train.progress=1", "train.progress=1: expected True or False"),
])
def test_an_override_of_the_wrong_kind_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        smoke_config(override)


@pytest.mark.parametrize("override,message", [
    ("train.epochs=-1", r"train.epochs=-1: must be positive \(or set train.total_steps\)"),
    ("train.global_batch=0", "train.global_batch=0: must be at least 1"),
    ("train.log_every_steps=0", "train.log_every_steps=0: must be at least 1"),
    ("train.total_steps=0", "train.total_steps=0: must be at least 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1: must not be negative"),
])
def test_validation_refuses_what_cannot_run(override, message):
    validate(smoke_config("train.total_steps=4"), 1)  # the same config without the bad value runs
    with pytest.raises(ValueError, match=message):
        validate(smoke_config(override), 1)


def test_stages_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match=r"widths \(8, 16\) .* one entry per stage \(3 stages"):
        build_model(smoke_config("model.widths=(8,16)"))


def test_missing_data_names_both_options(tmp_path):
    config = smoke_config("data.source='npz'", f"data.dir='{tmp_path / 'nowhere'}'")
    with pytest.raises((ValueError, FileNotFoundError), match="(?s)(?=.*tfds)(?=.*npz)"):
        train(config, tmp_path / "run")


def _write_npz(directory, images, labels):
    directory.mkdir()
    for split in ("train", "test"):
        np.savez(directory / f"{split}.npz", image=images, label=labels)


@pytest.mark.parametrize("images,labels,message", [
    (np.zeros((8, 32, 32), np.uint8), np.zeros(8, np.int64), "shape"),
    (np.zeros((8, 32, 32, 3), np.float32), np.zeros(8, np.int64), "uint8"),
    (np.zeros((8, 32, 32, 3), np.uint8), np.full(8, 10), "labels span .* needs labels in"),
])
def test_bad_npz_data(tmp_path, images, labels, message):
    _write_npz(tmp_path / "d", images, labels)
    config = smoke_config("data.source='npz'", f"data.dir='{tmp_path / 'd'}'")
    with pytest.raises(ValueError, match=message):
        train(config, tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    base = ["train.total_steps=8", "train.checkpoint_every_steps=2", "train.log_every_steps=1"]
    train(smoke_config(*base, "train.halt_after_steps=2"), tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="Loss became nan.*last good"):
        train(smoke_config(*base, "optim.lr=1e30"), tmp_path / "run_nan")
    # and in the run that had a good checkpoint: blowing up later keeps step 2 loadable
    config = smoke_config(*base, "optim.lr=1e30")
    with pytest.raises(NonFiniteLossError):
        train(config, tmp_path / "run")
    step, params = params_of(tmp_path / "run")
    assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    base = ["train.total_steps=6", "train.checkpoint_every_steps=2", "train.log_every_steps=1"]
    train(smoke_config(*base, "train.halt_after_steps=4"), tmp_path / "run")
    for f in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"garbage" * 20)
    with caplog.at_level(logging.WARNING):
        summary = train(smoke_config(*base), tmp_path / "run")
    [warning] = [r.getMessage() for r in caplog.records if "falling back to step 2" in r.getMessage()]
    assert "\n" not in warning and "tensorstore" not in warning and len(warning) < 400  # one short line
    assert summary["status"] == "done" and summary["steps"] == 6


def test_resuming_a_different_model_is_refused(tmp_path):
    train(smoke_config("train.total_steps=1"), tmp_path / "run")
    with pytest.raises(ValueError, match="different `model` config \\(model.controller: 'stepnet' in the run, "
                                         "'se' now\\); .* command.txt"):
        train(smoke_config("train.total_steps=1", "model.controller='se'"), tmp_path / "run")


def test_study_refuses_finished_runs_of_another_protocol(tmp_path, monkeypatch, capsys):
    # a run finished under older settings must not silently stand in for the current protocol
    monkeypatch.setitem(study.PLANS, "tiny", [(SMOKE, 0)])
    workdir = study.run_dir(tmp_path, SMOKE, 0)
    workdir.mkdir()
    (workdir / "config.json").write_text(smoke_config("optim.lr=0.5").to_json())
    (workdir / "summary.json").write_text(json.dumps({"status": "done", "steps": 16}))
    assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "another protocol" in err and "lr 0.5 step" in err and "nothing was trained" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json", "summary.json"]


def test_study_runs_the_seeds_asked_for(tmp_path, capsys):
    assert study.main(["--plan", "deep", "--seeds", "0", "--root", str(tmp_path), "--dry-run"]) == 0
    pending = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in pending] == ["seed=0"] * 3 and "cifar10_stepnet:deep" in pending[2]
    assert study.main(["--plan", "deep", "--seeds", "7", "--root", str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err == "stepjax: plan deep has no run of seeds [7]; its seeds are [0, 1, 2].\n"


def test_study_trains_then_evaluates_with_flip_tta(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PLANS, "tiny", [(SMOKE, 0)])
    assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == 0
    workdir = study.run_dir(tmp_path, SMOKE, 0)
    summary = json.loads((workdir / "summary.json").read_text())
    evaluation = read_evaluation(workdir, summary["steps"])
    last_test = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"][-1]
    # the single view repeats training's last evaluation; the flip figure is checked by hand
    assert evaluation["accuracy"] == summary["last_accuracy"] == last_test["accuracy"]
    np.testing.assert_allclose(evaluation["loss"], last_test["loss"], rtol=1e-5)
    config, model, _ = load_source(str(workdir))
    images, labels = load_images(config, 10**6)
    probs = sum(jax.nn.softmax(model.solve(jnp.asarray(x))[0]) for x in (images, images[:, :, ::-1]))
    np.testing.assert_allclose(evaluation["flip_accuracy"], np.mean(np.argmax(probs, -1) == labels), atol=1e-9)
    flip_loss = -np.mean(np.log(np.asarray(probs)[np.arange(len(labels)), labels] / 2))
    np.testing.assert_allclose(evaluation["flip_loss"], flip_loss, rtol=1e-4)
    assert abs(evaluation["flip_loss"] - evaluation["loss"]) > 1e-4  # the mirror image changes the prediction
    assert collect(tmp_path)[0]["flip_accuracy"] == evaluation["flip_accuracy"]
    (workdir / "evaluation.json").unlink()  # a rerun trains nothing and only evaluates again
    assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == 0
    assert json.loads((workdir / "summary.json").read_text()) == summary
    assert read_evaluation(workdir, summary["steps"]) == {**evaluation, "seconds": ANY}


def test_weight_decay_on_all_parameters_or_only_on_kernels():
    # with a zero gradient, no momentum and lr 1, the update is -wd * parameter where decay applies
    config = smoke_config("optim.weight_decay=0.5", "optim.momentum=0.0")
    params = nnx.state(build_model(config), nnx.Param)
    for only_kernels in (False, True):
        config.optim.decay_only_kernels = only_kernels
        tx = make_optimizer(config.optim, optax.constant_schedule(1.0))
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        names = set()
        for (path, update), (_, param) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(params), strict=True):
            name, value, param = path[-1], np.asarray(update.get_value()), np.asarray(param.get_value())
            names.add(name)
            decayed = not only_kernels or name in ("kernel", "feature_mix")
            np.testing.assert_allclose(value, -0.5 * param if decayed else 0.0 * param, err_msg=str(path))
        assert {"kernel", "feature_mix", "scale", "bias", "feature_bias"} <= names


def test_flip_tta_logged_by_training_and_an_older_run_resumes(tmp_path):
    # train.eval_flip logs each evaluation with flip TTA too: the same figure as the evaluator's
    workdir = tmp_path / "run"
    train(smoke_config("train.eval_flip=True", "train.total_steps=4"), workdir)
    last = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"][-1]
    evaluation = evaluate_run(workdir)
    assert last["flip_accuracy"] == evaluation["flip_accuracy"]
    np.testing.assert_allclose(last["flip_loss"], evaluation["flip_loss"], rtol=1e-5)
    assert collect(tmp_path)[0]["flip_accuracy"] == last["flip_accuracy"]
    # a run saved before the keys of ADDED_KEYS existed reads as trained with their old values and resumes
    saved = json.loads((workdir / "config.json").read_text())
    for key in ADDED_KEYS:
        section, leaf = key.split(".")
        del saved[section][leaf]
    (workdir / "config.json").write_text(json.dumps(saved))
    config = read_run_config(workdir)
    assert [config[k.split(".")[0]][k.split(".")[1]] for k in ADDED_KEYS] == list(ADDED_KEYS.values())
    assert train(smoke_config("train.total_steps=6"), workdir)["steps"] == 6
