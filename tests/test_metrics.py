"""Tests for stepjax.train.metrics."""

import glob
import os
import socket
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from stepjax.train.metrics import MetricWriter, Progress, drop_records_after, format_summary, read_metrics


def _records(path) -> list[bytes]:
    """The TFRecords of one event file, each with its framing (length, CRCs)."""
    with open(path, "rb") as f:
        data = f.read()
    records, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        records.append(data[offset : offset + 16 + length])
        offset += 16 + length  # length + its CRC, payload + its CRC
    return records


def _read_events(directory) -> list[event_pb2.Event]:
    """Parses the TFRecord-framed event files written under `directory`."""
    return [event_pb2.Event.FromString(record[12:-4])
            for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))) for record in _records(path)]


def test_jsonl_round_trip(tmp_path):
    before = time.time()
    writer = MetricWriter(tmp_path)
    writer.write(10, {"loss": jnp.float32(0.5), "accuracy": np.float64(0.25)}, split="train")
    writer.write(20, {"accuracy": 0.75, "step_sizes": jnp.array([1.0, 0.5])}, split="test")
    records = read_metrics(tmp_path / "metrics.jsonl")  # readable before close: flushed
    writer.close()

    assert [r["step"] for r in records] == [10, 20]
    assert [r["split"] for r in records] == ["train", "test"]
    assert all(before <= r["time"] <= time.time() for r in records)
    assert records[0]["loss"] == 0.5 and records[0]["accuracy"] == 0.25
    assert records[1]["step_sizes"] == [1.0, 0.5]
    assert isinstance(records[0]["loss"], float)


def test_writer_appends_on_resume(tmp_path):
    for step in (1, 2):
        writer = MetricWriter(tmp_path)
        writer.write(step, {"loss": float(step)}, split="train")
        writer.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    # A restart within the same second must not overwrite the previous event file.
    assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 2
    steps = [e.step for e in _read_events(tmp_path / "tb") if e.summary.value]
    assert sorted(steps) == [1, 2]


def test_truncated_last_line_tolerated(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, {"loss": 1.0}, split="train")
    writer.write(2, {"loss": 2.0}, split="train")
    writer.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text()[:-15])  # a write cut short by a kill
    assert [r["step"] for r in read_metrics(path)] == [1]

    writer = MetricWriter(tmp_path)  # a resumed run drops the partial line before appending
    writer.write(3, {"loss": 3.0}, split="train")
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 3]


def test_records_after_the_resumed_step_are_dropped(tmp_path):
    writer = MetricWriter(tmp_path)
    for step, split in [(1, "train"), (2, "train"), (2, "test"), (3, "train"), (4, "train")]:
        writer.write(step, {"loss": float(step)}, split=split)
    writer.close()
    path = tmp_path / "metrics.jsonl"
    before = path.read_text().splitlines()
    assert drop_records_after(path, 4) == 0 and path.read_text().splitlines() == before
    assert drop_records_after(path, 2) == 2
    assert path.read_text().splitlines() == before[:3]  # the kept records, as they were written
    assert drop_records_after(tmp_path / "absent.jsonl", 0) == 0


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_bad_metrics_rejected(tmp_path):
    writer = MetricWriter(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        writer.write(1, {"step": 3.0}, split="train")
    with pytest.raises(TypeError, match="'name'"):
        writer.write(1, {"name": "resnet"}, split="train")
    writer.close()


def test_tensorboard_scalars(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(5, {"loss": 0.5, "per_block": [1.0, 2.0]}, split="train")
    writer.write(7, {"accuracy": 0.9}, split="test")
    events = _read_events(tmp_path / "tb")  # readable before close: flushed
    writer.close()

    scalars = {
        (value.tag, event.step): value.simple_value
        for event in events
        for value in event.summary.value
    }
    assert scalars == {("train/loss", 5): 0.5, ("test/accuracy", 7): pytest.approx(0.9)}


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(workdir, enabled=False)
    writer.write(1, {"loss": 1.0}, split="train")
    writer.close()
    assert not workdir.exists()


def test_progress(capsys):
    progress = Progress(100, initial_step=10, desc="train")
    progress.update(20, loss=1.2345, accuracy=0.5, images_per_sec=123.4)
    progress.update(100, loss=0.5, accuracy=0.75, images_per_sec=130.0)
    progress.close()
    err = capsys.readouterr().err
    assert "100/100" in err
    assert "loss=0.5000" in err and "acc=0.7500" in err and "img/s=130.0" in err

    disabled = Progress(100, enabled=False)
    disabled.update(50, loss=1.0, accuracy=0.1, images_per_sec=1.0)
    disabled.close()
    assert capsys.readouterr().err == ""


def test_format_summary():
    summary = {
        "best_accuracy": 0.9312, "best_epoch": 160,
        "last_accuracy": 0.9295, "last_epoch": 164,
        "steps": 64000, "wall_time_s": 7392.4, "images_per_sec": 412.34,
    }
    assert format_summary(summary) == (
        "best test accuracy  93.12 % (epoch 160)\n"
        "last test accuracy  92.95 % (epoch 164)\n"
        "training            64000 steps in 2h 03m 12s, 412.3 images/s"
    )
    no_eval = {**summary, "best_accuracy": None, "last_accuracy": None, "wall_time_s": 65}
    assert format_summary(no_eval).splitlines()[:2] == [
        "best test accuracy  n/a",
        "last test accuracy  n/a",
    ]
    assert "1m 05s" in format_summary(no_eval)
    with pytest.raises(KeyError, match="images_per_sec"):
        format_summary({k: v for k, v in summary.items() if k != "images_per_sec"})



def test_event_files_are_byte_for_byte_those_of_tensorboardx(tmp_path):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import summary_pb2

    from stepjax.train.events import EventFile

    events = [(1796000000.25, 0, {"train/loss": 2.5}), (1796000001.5, 50, {"train/loss": 0.0, "train/acc": -1e-3}),
              (1796000002.0, 2**40, {"test/accuracy": 0.8125, "test/\u00e9": float("inf")})]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    ours = EventFile(tmp_path / "a" / "events", suffix=".x")
    theirs = EventsWriter(str(tmp_path / "b" / "events"), filename_suffix=".x")
    for wall_time, step, scalars in events:
        ours.write_scalars(step, scalars, wall_time=wall_time)
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        theirs.write_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=values)))
    ours.close()
    theirs.close()
    (a,), (b,) = glob.glob(str(tmp_path / "a" / "*")), glob.glob(str(tmp_path / "b" / "*"))
    assert os.path.basename(a).split(".")[:3] == os.path.basename(b).split(".")[:3] == ["events", "out", "tfevents"]
    assert a.endswith(f".{socket.gethostname()}.x") and b.endswith(f".{socket.gethostname()}.x")
    # the first record (the file version) differs only in its wall time; the scalar records are the same bytes
    assert [e.file_version for e in _read_events(tmp_path / "a")[:1] + _read_events(tmp_path / "b")[:1]] == ["brain.Event:2"] * 2
    assert _records(a)[1:] == _records(b)[1:] and len(_records(a)) == 4
