"""Run records: where a run directory is filed, and what is copied."""

import json
import shutil

import pytest

from stepjax import records
from stepjax.records import RECORD_FILES, file_run, finished_run, main, record_path
from stepjax.study import finished_steps


def test_record_path_mirrors_runs(tmp_path):
    assert record_path(tmp_path / "runs" / "study" / "a_s0", tmp_path / "r") == tmp_path / "r" / "study" / "a_s0"
    assert record_path(tmp_path / "elsewhere" / "b", tmp_path / "r") == tmp_path / "r" / "b"


def test_file_run_copies_the_record_only(tmp_path):
    run = tmp_path / "runs" / "pilot" / "x"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "checkpoints" / "10" / "state").write_text("big")
    for name in RECORD_FILES:
        (run / name).write_text(json.dumps({"name": name}))
    dest = file_run(run, tmp_path / "results" / "pilot" / "x")
    assert sorted(p.name for p in dest.iterdir()) == sorted(RECORD_FILES)
    # a file that the run no longer has leaves the record too
    (run / "evaluation.json").unlink()
    file_run(run, dest)
    assert not (dest / "evaluation.json").exists()


def test_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        file_run(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_a_finished_run_is_found_in_its_record_once_its_directory_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    run = tmp_path / "runs" / "deep" / "x_s0"
    run.mkdir(parents=True)
    for status in ("preempted", "done"):
        (run / "config.json").write_text("{}")
        (run / "summary.json").write_text(json.dumps({"status": status, "steps": 8}))
        file_run(run)
    assert finished_run(run) == run
    (run / "summary.json").write_text(json.dumps({"status": "preempted"}))  # the live directory wins
    assert finished_run(run) is None
    shutil.rmtree(run)  # a new checkout: the run directory is gone, its record is not
    assert finished_run(run) == tmp_path / "results" / "deep" / "x_s0"
    assert finished_steps(run) == 8
    outside = tmp_path / "elsewhere" / "x_s0"  # filed by its name alone: the record is not its own
    (tmp_path / "results" / "x_s0").mkdir(parents=True)
    (tmp_path / "results" / "x_s0" / "summary.json").write_text(json.dumps({"status": "done"}))
    assert finished_run(outside) is None


def test_an_analysis_record_is_compressed_json_read_back_the_same(tmp_path):
    report = {"note": "x", "figures": {"nsi": {"values": [0.1234, 1e-05, None]}}}
    path = records.write_analysis_record(tmp_path / "a", report)
    assert path.name == records.ANALYSIS_RECORD and path.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert records.read_analysis_record(tmp_path / "a") == report == records.read_analysis_record(path)
    again = records.write_analysis_record(tmp_path / "b", report)
    assert again.read_bytes() == path.read_bytes()  # no time stamp: the same report gives the same bytes
    assert records.analysis_record(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no analysis record .*make analyze"):
        records.read_analysis_record(tmp_path)
