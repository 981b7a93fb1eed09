"""Run records: where a run directory is filed, and what is copied."""

import json

import pytest

from stepjax.records import RECORD_FILES, file_run, main, record_path


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
