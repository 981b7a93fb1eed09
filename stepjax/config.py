"""Experiments: lookup by name, ``family:arg`` parsing, command-line overrides, validation.

An experiment family is a file ``experiments/<family>.py`` with ``get_config(arg) -> ConfigDict``,
where `arg` is the text after the colon, e.g. ``cifar10:controller=se,variant=cpu``
(`parse_arg`). The names of single experiments used before the families (``cifar10_se:cpu``)
are aliases (`ALIASES`) and give the same configs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
from pathlib import Path

import ml_collections

from stepjax.data import DATA_DIR_ENV
from stepjax.errors import UserError

EXPERIMENTS_DIR = Path(os.environ.get("STEPJAX_EXPERIMENTS", Path(__file__).resolve().parents[1] / "experiments"))

# the experiment names before the families -> the family and arguments each stands for;
# ``name:VARIANT`` adds ``variant=VARIANT``
ALIASES = {
    "cifar10_resnet": "cifar10:controller=constant",
    "cifar10_se": "cifar10:controller=se",
    "cifar10_cbam": "cifar10:controller=cbam",
    "cifar10_eca": "cifar10:controller=eca",
    "cifar10_srm": "cifar10:controller=srm",
    "cifar10_dia": "cifar10:controller=dia",
    "cifar10_stepnet": "cifar10:controller=stepnet",
    "cifar10_stepnet_nohistory": "cifar10:controller=stepnet,history=False",
    "cifar10_channel_step": "cifar10:controller=channel_step",
    "cifar100_resnet": "cifar100:controller=constant",
    "cifar100_se": "cifar100:controller=se",
    "cifar100_stepnet": "cifar100:controller=stepnet",
    "imagenet_resnet50_resnet": "imagenet_resnet50:controller=constant",
    "imagenet_resnet50_se": "imagenet_resnet50:controller=se",
    "imagenet_resnet50_stepnet": "imagenet_resnet50:controller=stepnet",
}


def parse_arg(arg: str | None, **defaults) -> dict:
    """The ``key=value,key=value`` string of an experiment family as a dict (big_vision's style).

    **Arguments:**

    - `arg`: the string, or None (all defaults).
    - `defaults`: keys every config reads, with their default values; other keys are passed on.

    **Returns:**

    `defaults` updated with the keys of `arg`, values parsed as Python literals (else strings).
    """
    parsed = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(
                f"Experiment argument {item!r} is not key=value; write e.g. cifar10:controller=se,variant=cpu."
            )
        parsed[key.strip()] = _parse_value(text.strip())
    return parsed


def available_experiments(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    """The experiment families (files in `directory`) and the older single-experiment names."""
    return sorted(p.stem for p in Path(directory).glob("*.py") if not p.stem.startswith("_")) + sorted(ALIASES)


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"stepjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(name: str, directory: Path = EXPERIMENTS_DIR) -> str:
    """The first line of a family file's docstring, or what an alias stands for."""
    if name in ALIASES:
        return f"= {ALIASES[name]}"
    doc = _load_module(Path(directory) / f"{name}.py").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _resolve_alias(name: str, arg: str) -> tuple[str, str]:
    family, _, fixed = ALIASES[name].partition(":")
    return family, fixed + (f",variant={arg}" if arg else "")


def load_experiment(exp: str, directory: Path = EXPERIMENTS_DIR) -> ml_collections.ConfigDict:
    """The config of ``exp`` = ``family``, ``family:arg``, an alias (``name`` or ``name:variant``,
    see `ALIASES`), or a path to a ``.py`` file with its ``:arg``.

    **Arguments:**

    - `exp`: the experiment, e.g. ``cifar10:controller=se,variant=cpu`` or ``cifar10_se:cpu``.
    - `directory`: where the family files live.

    **Returns:**

    The `ConfigDict` from the file's ``get_config(arg)``, with ``config.experiment = exp``.
    """
    name, _, arg = exp.partition(":")
    if name in ALIASES:
        name, arg = _resolve_alias(name, arg)
    path = Path(name) if name.endswith(".py") else Path(directory) / f"{name}.py"
    if not path.is_file():
        raise UserError(
            f"Unknown experiment {name!r}. Available: {', '.join(available_experiments(directory))}. "
            "Run `make list` for descriptions."
        )
    config = _load_module(path).get_config(arg or None)
    with config.unlocked():
        config.experiment = exp
    return config


def command_config(exp: str, overrides=(), environ=os.environ) -> ml_collections.ConfigDict:
    """The config a command runs: experiment `exp` with the command-line `overrides` applied
    (`apply_overrides`), reading the local npz copy that ``STEPJAX_DATA_DIR`` names (set by
    ``make ... DATA=dir``) as the config says: the experiment's tfds source becomes
    ``data.source='npz'`` (an override still wins), and an npz source without a directory gets
    ``data.dir``, so that the run's ``config.json`` records what was read.

    **Arguments:**

    - `exp`: the experiment (`load_experiment`); `overrides`: ``key=value`` strings.
    - `environ`: the environment to read ``STEPJAX_DATA_DIR`` from.

    **Returns:**

    The `ConfigDict`.
    """
    directory = environ.get(DATA_DIR_ENV)
    config = load_experiment(exp)
    if directory and config.data.source == "tfds":
        config.data.source = "npz"
    config = apply_overrides(config, list(overrides))
    if directory and config.data.source == "npz" and config.data.dir is None:
        config.data.dir = os.path.abspath(directory)
    return config


# Keys added after runs were saved, with the value that reproduces how those runs were trained.
ADDED_KEYS = {
    "model.scan": True,
    "model.zero_init_residual": False,
    "optim.decay_only_kernels": False,
    "train.eval_flip": False,
    "train.fast_compile": False,
}


def read_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run directory was trained with (its ``config.json``), with the keys added since
    (`ADDED_KEYS`) filled in as that run behaved, and the npz directory of a run saved before
    ``data.dir`` recorded it taken from its ``command.txt``, so that an older run resumes, reloads
    and compares like a new one.

    **Arguments:**

    - `workdir`: a run directory written by `stepjax.train.train`.

    **Returns:**

    The `ConfigDict`.
    """
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"{workdir} has no config.json: not a stepjax run directory; check the path.")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    for key, value in ADDED_KEYS.items():
        section, leaf = key.split(".")
        if section in config and leaf not in config[section]:
            config[section][leaf] = value
    if "data" in config and config.data.get("source") == "npz" and config.data.get("dir") is None:
        config.data.dir = _command_data_dir(workdir)
    return config


def _command_data_dir(workdir) -> str | None:
    """The ``STEPJAX_DATA_DIR`` a run was started with, as its ``command.txt`` records it: the data
    directory of a run saved before ``data.dir`` recorded it (`command_config`)."""
    path = Path(workdir) / "command.txt"
    for word in shlex.split(path.read_text()) if path.exists() else ():
        name, sep, value = word.partition("=")
        if not sep:  # the end of the environment assignments
            break
        if name == DATA_DIR_ENV:
            return value
    return None


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _leaf_keys(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Set ``key.sub=value`` overrides (values parsed as Python literals, else strings).

    Unknown keys are an error that lists the valid keys.
    """
    known = set(_leaf_keys(config))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"Override {item!r} is not of the form key=value (e.g. train.epochs=10).")
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise UserError(f"Unknown config key {key!r}. Valid keys: {', '.join(sorted(known))}.")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        value = _parse_value(text)
        _check_kind(key, node[leaf], value)
        if isinstance(node[leaf], ml_collections.ConfigDict) and isinstance(value, dict):
            node[leaf].update(value)
            continue
        with node.ignore_type():
            node[leaf] = value
    return config


def _check_kind(key: str, default, value) -> None:
    """A number stays a number and a flag a flag (`apply_overrides`), so that ``optim.lr=abc``
    is refused in one line instead of failing inside a traced step."""
    if default is None or value is None:
        return
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(f"{key}={value!r}: expected True or False.")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and (
            isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{key}={value!r}: expected a number (the default is {default!r}).")


_AT_LEAST_ONE = ("global_batch", "eval_batch", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                 "eval_every_epochs")


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Check what can be checked before anything runs; errors say what to change."""
    train = config.train
    for key in _AT_LEAST_ONE:
        if train[key] < 1:
            raise UserError(f"train.{key}={train[key]}: must be at least 1.")
    if train.total_steps is None and train.epochs <= 0:
        raise UserError(f"train.epochs={train.epochs}: must be positive (or set train.total_steps).")
    if train.total_steps is not None and train.total_steps < 1:
        raise UserError(f"train.total_steps={train.total_steps}: must be at least 1.")
    if config.optim.lr < 0:
        raise UserError(f"optim.lr={config.optim.lr}: must not be negative.")
    if train.global_batch % device_count:
        raise UserError(
            f"train.global_batch={train.global_batch} is not divisible by the {device_count} devices; "
            f"choose a multiple of {device_count} (e.g. train.global_batch={device_count * max(1, train.global_batch // device_count)})."
        )
    if train.eval_batch % device_count:
        raise UserError(f"train.eval_batch={train.eval_batch} is not divisible by the {device_count} devices.")
    if config.optim.schedule not in ("step", "cosine"):
        raise UserError(f"optim.schedule={config.optim.schedule!r}: choose 'step' or 'cosine'.")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise UserError(f"model.dtype={config.model.dtype!r}: choose 'float32' or 'bfloat16'.")
