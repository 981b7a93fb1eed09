"""Experiment families and their arguments, the older experiment names, the data directory of
``STEPJAX_DATA_DIR`` recorded in the config, and the NSI-guided placement resolved by the command."""

import json
import sys
from pathlib import Path

import pytest

from stepjax import data
from stepjax.analysis.placement import nsi_placement, nsi_scores
from stepjax.analysis.report import load_images, load_source
from stepjax.config import ALIASES, available_experiments, command_config, load_experiment, read_run_config
from stepjax.main import main
from stepjax.models import build_model

# The config of every experiment name before the families (and of each of its variants), as
# `load_experiment(name).to_dict()` gave it at commit 658dbf6, through JSON (tuples as lists), with
# STEPJAX_DATA_DIR unset.
OLD_CONFIGS = json.loads((Path(__file__).parent / "experiment_configs.json").read_text())


def as_json(config) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def test_every_old_experiment_name_gives_its_old_config():
    assert {name.partition(":")[0] for name in OLD_CONFIGS} <= set(ALIASES)  # none dropped; later ones added
    for name, old in OLD_CONFIGS.items():
        assert as_json(load_experiment(name)) == old, name


def test_family_arguments_name_the_controller_its_options_and_the_variant():
    config = load_experiment("cifar10:controller=stepnet,history=False,variant=cpu")
    assert config.experiment == "cifar10:controller=stepnet,history=False,variant=cpu"
    assert as_json(config) == {**OLD_CONFIGS["cifar10_stepnet_nohistory:cpu"], "experiment": config.experiment}
    plain = load_experiment("cifar100")
    assert (plain.model.controller, plain.model.preset, plain.data.name) == ("constant", "resnet164", "cifar100")
    with pytest.raises(ValueError, match="'cpu' is not key=value; write e.g. cifar10:controller=se,variant=cpu"):
        load_experiment("cifar10:cpu")
    with pytest.raises(ValueError, match=r"Unknown variant 'cpu'; use '', 'smoke' "):
        load_experiment("imagenet_resnet50:variant=cpu")
    with pytest.raises(ValueError, match="Bad options .*'reduce'.* for controller 'se'"):
        build_model(load_experiment("cifar10:controller=se,variant=smoke,reduce=4"))
    assert {"cifar10", "cifar100", "imagenet_resnet50", "cifar10_se"} <= set(available_experiments())


def test_loading_an_experiment_leaves_sys_path_alone():
    before = list(sys.path)
    load_experiment("cifar10_se:cpu")
    assert sys.path == before


def test_data_dir_of_the_environment_is_written_into_the_config(tmp_path):
    environ = {data.DATA_DIR_ENV: str(tmp_path)}
    config = command_config("cifar10_se:cpu", environ=environ)
    assert (config.data.source, config.data.dir) == ("npz", str(tmp_path))
    assert command_config("cifar10_se:cpu", ["data.source='tfds'"], environ=environ).data.source == "tfds"
    smoke = command_config("cifar10_se:smoke", environ=environ)
    assert (smoke.data.source, smoke.data.dir) == ("synthetic", None)
    chosen = command_config("cifar10_se:smoke", ["data.source='npz'"], environ=environ)
    assert chosen.data.dir == str(tmp_path)
    assert as_json(command_config("cifar10_se:cpu", environ={})) == OLD_CONFIGS["cifar10_se:cpu"]


def test_a_run_saved_without_data_dir_reads_it_from_its_command(tmp_path):
    config = load_experiment("cifar10_se:cpu")
    config.data.source = "npz"  # as the experiment set it when STEPJAX_DATA_DIR was set
    (tmp_path / "config.json").write_text(config.to_json())
    (tmp_path / "command.txt").write_text(
        f"{data.DATA_DIR_ENV}=/data/cifar10 python -m stepjax.main --config cifar10_se:cpu data.dir=/elsewhere\n"
    )
    assert read_run_config(tmp_path).data.dir == "/data/cifar10"
    (tmp_path / "command.txt").write_text("python -m stepjax.main --config cifar10_se:cpu\n")
    assert read_run_config(tmp_path).data.dir is None


def test_main_resolves_an_nsi_placement_into_the_run_config(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    reference = "init:cifar10_se:smoke"
    workdir = tmp_path / "run"
    code = main(["--config", "cifar10_se:smoke", "--workdir", str(workdir), "train.progress=False",
                 "train.halt_after_steps=0", f"model.placement='nsi:{reference}'", "model.placement_ratio=0.34"])
    assert code == 3  # stopped before its first step, as asked
    saved = read_run_config(workdir)
    config, model, _ = load_source(reference)
    expected = nsi_placement(nsi_scores(model, load_images(config, 500, split="train")[0]), 0.34)
    assert list(saved.model.placement) == expected and len(expected) == 2
    build_model(saved)  # the run reloads without tracing the reference again
    unresolved = load_experiment("cifar10_se:smoke")
    unresolved.model.placement = f"nsi:{reference}"
    with pytest.raises(ValueError, match="Unknown placement 'nsi:"):  # the model never resolves it itself
        build_model(unresolved)
