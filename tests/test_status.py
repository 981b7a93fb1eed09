"""Where a run stands (`stepjax.train.status`, ``stepjax.study --status``), read from fabricated run
directories: no training, no lock taken."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from stepjax import errors, records, study
from stepjax.train import WorkdirLock, claim_dir, describe_status, lock_holder, run_status, set_aside_cut_run

NOW = 1_800_000_000.0


def fabricate(workdir, *, steps, evals=(), checkpoints=(), summary=None):
    """A run directory as training leaves it: config, metrics (8 images a step, 16 images/s), checkpoints."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"epochs": 4, "global_batch": 8, "eval_every_epochs": 1}}))
    records = [{"step": s, "split": "train", "time": NOW - 60 * (steps[-1] - s), "loss": 1.0, "images_per_sec": 16.0}
               for s in steps] + [{"step": s, "split": "test", "time": NOW, "accuracy": 0.5} for s in evals]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    for step in checkpoints:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    if summary is not None:
        (workdir / "summary.json").write_text(json.dumps(summary))
    return workdir


def fabricate_finished(exp, workdir, *, checkpoints=(100,)):
    """A finished, evaluated run of `exp` (its own config, so the study counts it for the plan)."""
    from stepjax.config import load_experiment

    fabricate(workdir, steps=[100], checkpoints=checkpoints, summary={"status": "done", "steps": 100})
    (workdir / "config.json").write_text(load_experiment(exp).to_json())
    (workdir / "evaluation.json").write_text(json.dumps({"step": 100, "accuracy": 0.5, "flip_accuracy": 0.5}))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_nobody_trains_is_stopped_and_names_the_checkpoint_it_resumes_from(tmp_path):
    workdir = fabricate(tmp_path / "run", steps=[10, 20, 30], evals=[25], checkpoints=[20])
    status = run_status(workdir)
    assert (status.state, status.step, status.checkpoint, status.total_steps) == ("stopped", 30, 20, 100)
    assert describe_status(status, now=NOW + 120) == "stopped at step 30 of 100, last logged 2 min ago, resumes from step 20"


def test_a_run_cut_before_its_first_checkpoint_says_how_to_restart(tmp_path):
    status = run_status(fabricate(tmp_path / "run", steps=[10]))
    assert status.total_steps is None  # no evaluation yet: the length of an epoch is not known
    assert describe_status(status, now=NOW).endswith("no checkpoint: the study and the lottery set it aside and train "
                                                     "it afresh; a single training needs --discard-record")


def test_a_run_holding_only_a_save_cut_short_is_not_pending(tmp_path):
    """Killed during its first save, before any record: training would refuse it, so the status
    must not call it pending, and the plans set it aside."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "250.orbax-checkpoint-tmp-1800000000").mkdir(parents=True)
    status = run_status(workdir)
    assert (status.state, status.step, status.checkpoint) == ("stopped", None, None)
    assert "no checkpoint: the study and the lottery set it aside" in describe_status(status, now=NOW)
    assert set_aside_cut_run(workdir).parent == tmp_path / ".cut"


def test_a_run_whose_lock_is_held_is_training_with_the_time_left(tmp_path):
    workdir = fabricate(tmp_path / "run", steps=[10, 20, 30], evals=[25], checkpoints=[20])
    lock = WorkdirLock(workdir)
    lock.acquire()
    try:
        status = run_status(workdir)
    finally:
        lock.release()
    assert status.state == "training" and status.holder["pid"] == os.getpid()
    assert status.remaining_s() == (100 - 30) * 8 / 16.0
    assert describe_status(status, now=NOW).endswith(f"by pid {os.getpid()} on {socket.gethostname()}, "
                                                     "about 1 min left at 16 images/s")
    assert run_status(workdir).state == "stopped"  # released


def test_a_lock_left_by_a_dead_process_holds_nothing_and_one_from_another_host_does(tmp_path):
    (tmp_path / "writer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "since": "then"}))
    assert lock_holder(tmp_path) is None
    assert lock_holder(tmp_path / "missing") is None
    (tmp_path / "writer.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    assert lock_holder(tmp_path) == {"host": "elsewhere", "pid": 1, "since": "then"}


def test_finished_and_untouched_runs(tmp_path):
    done = fabricate(tmp_path / "done", steps=[100], summary={"status": "done", "steps": 100, "best_accuracy": 0.8123})
    assert describe_status(run_status(done)) == "done, best 81.23 %"
    assert run_status(tmp_path / "never").state == "pending"


def test_the_study_reports_its_plan_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.PLANS, "tiny", [("cifar10_resnet:smoke", 0), ("cifar10_resnet:smoke", 1)])
    fabricate(study.run_dir(tmp_path, "cifar10_resnet:smoke", 0), steps=[10, 20], evals=[25], checkpoints=[20])
    assert study.main(["--plan", "tiny", "--root", str(tmp_path), "--status"]) == errors.DONE
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        [str(study.run_dir(tmp_path, "cifar10_resnet:smoke", 0)), "stopped", "at"],
        [str(study.run_dir(tmp_path, "cifar10_resnet:smoke", 1)), "pending"]]
    assert not study.run_dir(tmp_path, "cifar10_resnet:smoke", 1).exists()


def test_the_lottery_reports_its_placements_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from stepjax.analysis.lottery import main as lottery

    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    root = tmp_path / "lottery"
    key = {"source": "init:cifar10_se:smoke", "indicator": "relative_increment", "num_samples": 500, "split": "train"}
    fabricate(root / "nsi_top", steps=[10], summary={"status": "done", "steps": 10, "best_accuracy": 0.5})
    (root / "nsi_scores.json").write_text(json.dumps({"key": key, "scores": [None, 0.5, None, 0.9, None, 0.1]}))
    before = sorted(p for p in tmp_path.rglob("*"))
    assert lottery(["--exp", "cifar10_se:smoke", "--ratio", "0.34", "--num-random", "1", "--nsi-workdir",
                    "init:cifar10_se:smoke", "--root", str(root), "--out", str(tmp_path / "figure"), "--status"]) == errors.DONE
    head, *lines = capsys.readouterr().out.splitlines()
    assert head == f"lottery cifar10_se_smoke_ratio0.34 (runs in {root})"  # which lottery, when make deep-status lists three
    assert [line.split()[:2] for line in lines] == [
        ["none", "pending"], ["all", "pending"], ["nsi_top", "done,"], ["nsi_bottom", "pending"], ["random_0", "pending"]]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no record, figure or lock


def test_only_a_run_cut_before_its_first_checkpoint_is_set_aside_and_never_filed(tmp_path, capsys):
    root = tmp_path / "runs" / "deep"
    resumable = fabricate(root / "resumable", steps=[10, 20], checkpoints=[20])
    cut = fabricate(root / "cut", steps=[10])
    assert set_aside_cut_run(resumable) is None and set_aside_cut_run(root / "pending") is None
    aside = set_aside_cut_run(cut)
    assert not cut.exists() and aside.parent == root / ".cut" and aside.name.startswith("cut.")
    assert (aside / "metrics.jsonl").exists()  # nothing deleted
    assert records.main([str(tmp_path / "runs"), "--root", str(tmp_path / "results")]) == 0
    assert sorted(p.name for p in (tmp_path / "results" / "deep").iterdir()) == ["resumable"]


def test_the_study_trains_a_cut_run_afresh(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(study.PLANS, "tiny", [("cifar10_resnet:smoke", 0)])
    cut = fabricate(study.run_dir(tmp_path, "cifar10_resnet:smoke", 0), steps=[5])
    assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == errors.DONE
    assert json.loads((cut / "summary.json").read_text())["status"] == "done"
    assert [p.name.split(".")[0] for p in (tmp_path / ".cut").iterdir()] == [cut.name]
    assert f"{cut} was cut at step 5, before its first checkpoint, so it cannot resume: moved aside to" in caplog.text


def test_the_lottery_trains_a_cut_placement_afresh(tmp_path, monkeypatch):
    from stepjax.analysis.lottery import placement_configs, run_lottery
    from stepjax.config import load_experiment

    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    configs = placement_configs(load_experiment("cifar10_se:smoke"), ratio=0.34, num_random=0,
                                scores=[float("nan"), 0.5, float("nan"), 0.9, float("nan"), 0.1])
    fabricate(tmp_path / "lottery" / "nsi_top", steps=[5])
    fresh = []

    def fake_train(cfg, workdir):
        fresh.append(not workdir.exists())
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(cfg.to_json())
        summary = {"status": "done", "best_accuracy": 0.5, "last_accuracy": 0.5}
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    run_lottery(configs, tmp_path / "lottery", train_fn=fake_train)
    assert fresh == [True] * len(configs)
    assert [p.name.split(".")[0] for p in (tmp_path / "lottery" / ".cut").iterdir()] == ["nsi_top"]


def test_the_study_analyses_each_pair_of_its_finished_runs_once(tmp_path, monkeypatch, capsys):
    """SE against plain and StepNet against SE, per seed, once both runs are finished and their
    checkpoints are here; one already filed is not run again, and `--status` lists each."""
    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    plan = [(f"cifar10_{c}:deep", s) for s in (0, 1) for c in ("resnet", "se", "stepnet")]
    monkeypatch.setitem(study.PLANS, "tiny", plan)
    runs = {(exp, seed): study.run_dir(tmp_path, exp, seed) for exp, seed in plan}
    for (exp, seed), workdir in runs.items():
        if (exp, seed) != ("cifar10_stepnet:deep", 1):  # still to train
            fabricate_finished(exp, workdir, checkpoints=() if seed == 1 else (100,))  # seed 1: an earlier checkout
    records.write_analysis_record(tmp_path / "results" / "analysis" / "deep_se_vs_plain_s0", {})
    started = []

    class Analysis:  # the analysis process, not run
        def __init__(self, argv):
            started.append(argv[1:])

        def wait(self):
            return errors.DONE

    monkeypatch.setattr(study.subprocess, "Popen", Analysis)
    monkeypatch.setitem(study.PLANS, "tiny", [p for p in plan if p != ("cifar10_stepnet:deep", 1)])
    other = WorkdirLock(claim_dir(tmp_path / "deep_stepnet_vs_se_s0"))  # another study process runs it
    other.acquire()
    try:
        assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == errors.DONE
    finally:
        other.release()
    assert started == []
    assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == errors.DONE
    se, stepnet = runs[("cifar10_se:deep", 0)], runs[("cifar10_stepnet:deep", 0)]
    assert started == [["-m", "stepjax.analysis", "--workdir", str(stepnet), "--compare", str(se), "--num-samples",
                        "500", "--out", "docs/figures/analysis/deep_stepnet_vs_se_s0"]]
    monkeypatch.setitem(study.PLANS, "tiny", plan)
    capsys.readouterr()
    assert study.main(["--plan", "tiny", "--root", str(tmp_path), "--status"]) == errors.DONE
    states = dict(line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("analysis "))
    assert states["deep_se_vs_plain_s0"] == "done"
    assert states["deep_stepnet_vs_se_s0"] == "ready"  # its fake analysis filed nothing
    assert states["deep_se_vs_plain_s1"].startswith(f"cannot run: no checkpoint in {runs[('cifar10_se:deep', 1)]} and ")
    assert states["deep_stepnet_vs_se_s1"] == f"waiting for {runs[('cifar10_stepnet:deep', 1)]}"


def test_the_study_analyses_a_pair_as_soon_as_its_runs_are_finished(tmp_path, monkeypatch):
    """SE seed 0 completes its pair with plain seed 0: their analysis runs before plain seed 1 trains."""
    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    plan = [("cifar10_resnet:deep", 0), ("cifar10_se:deep", 0), ("cifar10_resnet:deep", 1)]
    monkeypatch.setitem(study.PLANS, "tiny", plan)
    fabricate_finished("cifar10_resnet:deep", study.run_dir(tmp_path, "cifar10_resnet:deep", 0))
    started = []

    class Child:  # a training finishes its run at once; an analysis is not run
        def __init__(self, argv):
            module, options = argv[2], dict(zip(argv[3::2], argv[4::2]))
            started.append((module, options.get("--workdir")))
            if module == "stepjax.main":
                fabricate_finished(options["--config"], Path(options["--workdir"]))

        def wait(self):
            return errors.DONE

    monkeypatch.setattr(study.subprocess, "Popen", Child)
    assert study.main(["--plan", "tiny", "--root", str(tmp_path)]) == errors.DONE
    se, plain_s1 = (str(study.run_dir(tmp_path, exp, seed)) for exp, seed in plan[1:])
    assert started == [("stepjax.main", se), ("stepjax.analysis", se), ("stepjax.main", plain_s1)]
