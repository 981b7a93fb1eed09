"""The GPU campaign without a GPU: the lossless data code, the staging calls (split, arrival,
hash checks), the choice of the next item, the step measurements, and the whole path from the
plan through the runner (a tiny item on synthetic data) to the filed records and their report."""

import base64
import hashlib
import json
import os
import tarfile
import time
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from stepjax import results as results_report
from stepjax.campaign import filing, measure, plan, runner, slot, staging
from stepjax.campaign.__main__ import REPO
from stepjax.campaign.__main__ import main as campaign_main
from stepjax.config import load_experiment, read_run_config
from stepjax.records import read_analysis_record, write_analysis_record
from stepjax.train import load_run


def fake_cifar(folder, train=20, test=8):
    """A CIFAR-shaped npz copy (smooth images with noise, uint8 labels) and its sha256 by file name."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        ramp = np.linspace(0, 200, 32)[None, :, None, None] + np.linspace(0, 50, 32)[None, None, :, None]
        images = np.clip(ramp + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez_compressed(folder / f"{split}.npz", image=images, label=rng.integers(0, 10, n).astype(np.uint8))
    return {f"{s}.npz": staging.sha256_file(folder / f"{s}.npz") for s in staging.SPLITS}


def fake_run(base, record, steps=(1, 3)):
    """A run directory with a record and checkpoint steps (files standing in for orbax's)."""
    workdir = base / "runs" / record
    for step in steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
        (workdir / "checkpoints" / str(step) / "state").write_bytes(bytes(range(256)) * (step + 1))
    (workdir / "config.json").write_text("{}")
    (workdir / "metrics.jsonl").write_text("")
    return workdir


def tiny_wheel(folder):
    """A minimal pure-Python wheel that pip installs offline."""
    name, files = "stepjax_tiny_wheel", {"stepjax_tiny_wheel/__init__.py": b"VALUE = 7\n"}
    info = f"{name}-0.1.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    digest = {p: base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode() for p, d in files.items()}
    record = "".join(f"{p},sha256={digest[p]},{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(p, d)
    return path


def test_image_code_is_lossless_and_smaller():
    rng = np.random.default_rng(1)
    for shape in [(5, 32, 32, 3), (3, 1, 7, 3), (2, 6, 1, 3), (1, 1, 1, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(staging.decode_images(staging.encode_images(images)), images)
    smooth = np.clip(np.linspace(0, 255, 32)[None, :, None, None] + rng.normal(0, 3, (50, 32, 32, 3)), 0, 255).astype(np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    payload = staging.pack_dataset({"train": (smooth, labels)})
    assert len(payload) < 0.6 * smooth.nbytes  # the prediction removes the gradient, not the noise
    back_images, back_labels = staging.unpack_dataset(payload)["train"]
    np.testing.assert_array_equal(back_images, smooth)
    assert back_labels.dtype == np.uint8 and (back_labels == labels).all()


def test_calls_fill_the_room_left_by_the_extras():
    extras = [{"kind": "run", "name": "r", "size": 30}, {"kind": "wheel", "name": "w", "size": 10}]
    calls = staging.plan_calls(100, extras, capacity=40)
    assert calls[0]["extras"][0]["name"] == "w"  # wheels first: the first call installs them
    for call in calls:
        assert sum(e["size"] for e in call["extras"]) + (call["part"][1] if call["part"] else 0) <= 40
    parts = [c["part"] for c in calls if c["part"]]
    assert parts[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert sum(size for _, size in parts) == 100
    with pytest.raises(ValueError, match="larger than"):
        staging.plan_calls(10, [{"kind": "run", "name": "big", "size": 50}], capacity=40)


def staged(tmp_path):
    """CIFAR-shaped data, a wheel and a run directory staged in calls of a few KiB."""
    expected = fake_cifar(tmp_path / "src")
    workdir = fake_run(tmp_path / "here", "gpu/cifar10_se_gpu_s0")
    bundle = staging.bundle_run(workdir, tmp_path / "here", tmp_path / "run.tar.gz")
    extras = [("wheel", tiny_wheel(tmp_path)), ("run", bundle)]
    manifest = staging.stage(tmp_path / "src", tmp_path / "stage", capacity=24 * 1024, extras=extras, expected=expected,
                             code="abc1234")
    return manifest


def test_staging_round_trip(tmp_path):
    manifest = staged(tmp_path)
    root = tmp_path / "device"
    assert manifest["calls"] >= 3
    assert all(sum(f["size"] for f in manifest["files"] if f["call"] == k) <= 24 * 1024 for k in range(1, manifest["calls"] + 1))
    for k in range(1, manifest["calls"]):
        line = staging.receive(tmp_path / "stage" / f"call{k}", root)
        assert f"call {k} of {manifest['calls']}" in line and "sha256 checked" in line
        ready, status = staging.data_status(root)
        assert not ready and f"{manifest['calls']}" in status.split("send call(s)")[1]
        with pytest.raises(runner.CampaignError, match="incomplete"):  # the runner refuses, in one line
            runner.run_item(plan.find_item("a-gpu-s0"), tmp_path / "out", results=tmp_path / "results", root=root, budget_s=60)
    assert "CIFAR-10 ready" in staging.receive(tmp_path / "stage" / f"call{manifest['calls']}", root)
    assert staging.data_status(root)[0]
    for split in staging.SPLITS:
        with np.load(tmp_path / "src" / f"{split}.npz") as source, np.load(staging.data_dir(root) / f"{split}.npz") as copy:
            np.testing.assert_array_equal(copy["image"], source["image"])
            np.testing.assert_array_equal(copy["label"], source["label"])
    assert (root / "site" / "stepjax_tiny_wheel" / "__init__.py").read_text() == "VALUE = 7\n"
    assert staging.staged_code(root) == "abc1234"  # what the runs record where the tree has no git
    restored = root / "runs" / "gpu" / "cifar10_se_gpu_s0"
    assert (restored / "checkpoints" / "3" / "state").exists() and not (restored / "checkpoints" / "1").exists()


def test_arrival_refuses_a_corrupt_or_missing_file(tmp_path, monkeypatch):
    manifest = staged(tmp_path)
    root = tmp_path / "device"
    monkeypatch.setenv(staging.DEVICE_ROOT_ENV, str(root))
    part = next(f for f in manifest["files"] if f["kind"] == "part")
    path = tmp_path / "stage" / f"call{part['call']}" / part["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(staging.StagingError, match="sha256 differs"):
        staging.receive(path.parent, root)
    assert not list(root.glob(f"stage/*/{part['name']}"))  # nothing of a refused call is kept
    path.unlink()
    with pytest.raises(staging.StagingError, match="is missing"):
        staging.receive(path.parent, root)
    assert staging.main(["receive", str(path.parent)]) == 2
    assert not staging.data_status(root)[0]


def test_staging_refuses_other_source_files(tmp_path):
    fake_cifar(tmp_path / "src")
    with pytest.raises(ValueError, match="sha256 differs"):
        staging.check_sources(tmp_path / "src")  # the real copy's hashes
    with pytest.raises(FileNotFoundError, match="does not exist"):
        staging.check_sources(tmp_path / "nowhere")


def write_summary(results, record, status):
    (results / record).mkdir(parents=True, exist_ok=True)
    (results / record / "summary.json").write_text(json.dumps({"status": status}))


def test_next_item_follows_the_records(tmp_path):
    results = tmp_path / "results"
    first = plan.PLAN[0]
    assert plan.next_item(plan.PLAN, results) is first
    for training in first.trainings:
        write_summary(results, training.record, "done")
    assert plan.next_item(plan.PLAN, results) is first  # its analyses are still to do
    assert not plan.pending(first, results)["trainings"]
    for analysis in first.analyses:
        write_analysis_record(results / "analysis" / analysis.name, {})
    assert plan.next_item(plan.PLAN, results).key == "measure"
    (results / "measure").mkdir()
    (results / "measure" / "measure.json").write_text("{}")
    second = plan.next_item(plan.PLAN, results)
    assert second.key == "b-gpu-s1"
    write_summary(results, second.trainings[0].record, "preempted")  # a stopped run is unfinished
    assert plan.pending(second, results)["trainings"][0] == second.trainings[0]
    with pytest.raises(ValueError, match="No campaign item"):
        plan.find_item("z")


def test_plan_matches_the_experiments_and_the_budget():
    for variant, protocol in plan.PROTOCOLS.items():
        config = load_experiment("cifar10_resnet" + ("" if variant == "paper" else f":{variant}"))
        assert (config.train.epochs, config.train.global_batch, config.model.dtype) == \
               (protocol.epochs, protocol.batch, protocol.dtype), variant
        if variant != "smoke":
            assert config.model.preset == protocol.preset
    items = plan.PLAN + plan.EXTRA
    assert len({i.key for i in items}) == len(items)
    records = [t.record for i in items for t in i.trainings]
    assert len(set(records)) == len(records)
    for item in items:
        assert item.chunked or item.est_s <= plan.BUDGET_S, item.key
        for t in item.trainings:
            load_experiment(t.exp)  # every experiment exists
        for a in item.analyses:
            assert {a.model, a.compare} - {None} <= {t.record for t in item.trainings}
    assert [i.key[0] for i in plan.PLAN[:4]] == ["a", "m", "b", "b"]


def test_bundles_that_do_not_fit_are_named(tmp_path, monkeypatch):
    item = plan.Item("t", "t", (plan.Training("cifar10_resnet:cpu", 0),))
    ctx = runner.Context(tmp_path / "results", tmp_path / "root", tmp_path / "work", time.monotonic() + 60)
    fake_run(ctx.root, item.trainings[0].record)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(runner, "FILE_LIMIT", 100)
    written, left_out = runner.pack_bundles(item, ctx, tmp_path / "out", used=0)
    assert written == [] and "not brought back" in left_out[0] and not list((tmp_path / "out").iterdir())


def test_campaign_end_to_end_on_the_cpu(tmp_path):
    """plan -> runner (the check item: a tiny StepNet on synthetic data, and its analysis) ->
    records in an output folder within the device's limits -> filing -> the results report."""
    item = plan.find_item("check")
    results, out, base = tmp_path / "results", tmp_path / "out", tmp_path / "repo"
    summary = runner.run_item(item, out, results=results, root=tmp_path / "device", budget_s=900)
    assert [t["status"] for t in summary["trainings"]] == ["done"]
    assert [a["status"] for a in summary["analyses"]] == ["done"]
    assert summary["wall_s"] < summary["budget_s"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["campaign.json", "records.tar.gz", "run1.tar.gz"]
    assert all((out / f).stat().st_size <= runner.FILE_LIMIT for f in files)
    with tarfile.open(out / "records.tar.gz") as tar:
        names = tar.getnames()
    assert "check/cifar10_stepnet_smoke_s0/summary.json" in names and "analysis/check_stepnet/analysis.json.gz" in names

    lines = filing.file_returned(out, results=results, base=base)
    record = results / "check" / "cifar10_stepnet_smoke_s0"
    assert json.loads((record / "summary.json").read_text())["status"] == "done"
    assert read_analysis_record(results / "analysis" / "check_stepnet")["models"]
    assert len(list((results / "campaign").glob("*-check.json"))) == 1
    workdir = base / "runs" / "check" / "cifar10_stepnet_smoke_s0"
    assert staging.latest_checkpoint(workdir) is not None
    # trained in bfloat16, analysed (and here reloaded) in float32 from the same float32 parameters
    config, model, _ = load_run(workdir, dtype="float32")
    assert read_run_config(workdir).model.dtype == "bfloat16" and config.model.dtype == "float32"
    assert model.stem_conv.dtype == jnp.float32
    assert any("run1.tar.gz" in line for line in lines)
    assert not plan.unfinished(item, results)

    results_report.main(["--root", str(results / "check"), "--out", str(tmp_path / "RESULTS.md"),
                         "--figure", str(tmp_path / "curves.png"), "--per-run"])
    report = (tmp_path / "RESULTS.md").read_text()
    assert str(record) in report and "| done |" in report


def test_measurements_on_the_cpu(tmp_path):
    specs = [measure.spec("two vmapped", "cifar10_resnet:smoke", members=2),
             measure.spec("two side by side", "cifar10_resnet:smoke", copies=2)]
    timing = measure.Timing(seconds=0.2, batch_est_s=0.0, compile_limit_s=1200.0)  # a busy CPU compiles slowly
    done = measure.run_measure(tmp_path / "measure.json", time.monotonic() + 1500, dict(os.environ), specs, timing)
    report = json.loads((tmp_path / "measure.json").read_text())
    assert done == {"measured": 2, "planned": 2, "file": str(tmp_path / "measure.json")}, report
    vmapped, side = report["results"]
    assert vmapped["images_per_s"] > 0 and vmapped["compile_s"] > 0 and vmapped["step_ms"] > 0
    assert vmapped["per_member_images_per_s"] == pytest.approx(vmapped["images_per_s"] / 2)
    assert len(side["per_copy_images_per_s"]) == 2 and side["images_per_s"] == pytest.approx(sum(side["per_copy_images_per_s"]))
    assert set(report["ratios"]) == {name for name, _, _ in measure.RATIOS}


def test_stage_prints_the_calls(tmp_path):
    manifest = {"calls": 3, "files": [{"call": k, "size": staging.MIB} for k in (1, 2, 3)]}
    calls = slot.call_sequence(manifest, "a-gpu-s0")
    assert [c["carry"] for c in calls] == [["stage/call1"], ["stage/call2"], ["stage/call3"]]
    assert "run --out $OUT --item a-gpu-s0" in calls[-1]["command"] and "run" not in calls[0]["command"].split("receive")[1]
    assert calls[-1]["timeout_s"] == 600
    text = slot.render_calls(calls, manifest, plan.find_item("a-gpu-s0"), 30 * staging.MIB)
    assert text.count("`run` command=") == 3
    with pytest.raises(FileNotFoundError, match="make campaign-wheels"):
        slot.wheels(tmp_path)


def test_stage_command_for_an_item_without_data(tmp_path, capsys):
    for requirement in slot.WHEELS:  # stand-ins: staging only carries and hashes them
        name, version = requirement.split("==")
        (tmp_path / f"{name.lower().replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"wheel")
    code = campaign_main(["--results", str(tmp_path / "results"), "stage", "--item", "measure",
                          "--out", str(tmp_path / "stage"), "--wheels", str(tmp_path)])
    assert code == 0
    calls = (tmp_path / "stage" / "CALLS.md").read_text()
    assert calls.count("`run` command=") == 1 and "--item measure" in calls
    manifest = json.loads((tmp_path / "stage" / "call1" / staging.MANIFEST).read_text())
    assert manifest["payload"] is None and {f["kind"] for f in manifest["files"]} == {"wheel"}
    assert campaign_main(["--results", str(tmp_path / "results"), "status"]) == 0
    assert "next: a-gpu-s0" in capsys.readouterr().out
    assert campaign_main(["stage", "--item", "a-gpu-s0", "--out", str(tmp_path / "s2")]) == 2  # no --data: one line


def test_measured_ratios_and_targets():
    def result(name, rate, exp="cifar10_resnet", **extra):
        return {"name": name, "exp": exp, "overrides": [], "copies": 1, "images_per_s": rate, **extra}

    results = [result("gpu protocol plain (bf16 b256)", 12000.0, "cifar10_resnet:gpu"),
               result("gpu protocol stepnet (bf16 b256)", 8000.0, "cifar10_stepnet:gpu"),
               result("plain fp32 b128", 5000.0), result("plain bf16 b128 2 seeds vmapped", 9000.0,
                                                          per_member_images_per_s=4500.0),
               result("plain bf16 b128", 6000.0), result("plain bf16 b128 unrolled", 11000.0),
               {"name": "plain bf16 b128 command buffers off", "exp": "cifar10_resnet", "copies": 1, "error": "x"}]
    out = measure.derived(results)
    assert out["ratios"]["stepnet cost, gpu protocol (plain / stepnet images/s)"] == pytest.approx(1.5)
    assert out["ratios"]["2 seeds vmapped, per seed against one (plain bf16 b128)"] == pytest.approx(0.75)
    assert out["ratios"]["unrolled gain, plain bf16 b128"] == pytest.approx(11000 / 6000)
    assert out["ratios"]["command buffers off, plain bf16 b128"] is None  # failed: no figure
    assert out["ratios"]["se cost, gpu protocol"] is None  # not measured
    assert out["targets"]["StepNet <= 1.25x plain (gpu protocol)"]["met"] is False
    assert out["targets"]["plain ResNet-164 b128 >= 2x 5,205 images/s (fastest setting)"] == \
        {"images_per_s": 11000.0, "met": True}


def test_the_working_tree_leaves_each_device_call_room_for_the_data():
    tree = slot.tree_bytes(REPO)
    assert tree <= slot.TREE_BUDGET, (
        f"the working tree is {tree / staging.MIB:.1f} MiB, above the {slot.TREE_BUDGET / staging.MIB:.0f} MiB "
        "that leaves a device call room for the data: look for large tracked files (git ls-files -z | xargs -0 du -k "
        "| sort -n | tail); figures: python -m stepjax.figures docs/figures")
