"""Experiments: lookup by name, ``name:arg`` variants, command-line overrides, validation.

An experiment is a file ``experiments/<name>.py`` with ``get_config(arg) -> ConfigDict``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

import ml_collections

from stepjax.errors import UserError

EXPERIMENTS_DIR = Path(os.environ.get("STEPJAX_EXPERIMENTS", Path(__file__).resolve().parents[1] / "experiments"))


def available_experiments(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of the experiment files in `directory`."""
    return sorted(p.stem for p in Path(directory).glob("*.py") if not p.stem.startswith("_"))


def _load_module(path: Path):
    if str(path.parent) not in sys.path:  # experiment files import their shared builders
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"stepjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(name: str, directory: Path = EXPERIMENTS_DIR) -> str:
    """The first line of an experiment file's docstring."""
    doc = _load_module(Path(directory) / f"{name}.py").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def load_experiment(exp: str, directory: Path = EXPERIMENTS_DIR) -> ml_collections.ConfigDict:
    """The config of ``exp`` = ``name`` or ``name:arg`` (or a path to a ``.py`` file).

    **Arguments:**

    - `exp`: experiment name with optional variant.
    - `directory`: where experiment files live.

    **Returns:**

    The `ConfigDict` from the file's ``get_config(arg)`` with ``config.experiment`` set.
    """
    name, _, arg = exp.partition(":")
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


# Keys added after runs were saved, with the value that reproduces how those runs were trained.
ADDED_KEYS = {
    "model.scan": True,
    "model.zero_init_residual": False,
    "optim.decay_only_kernels": False,
    "train.eval_flip": False,
}


def read_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run directory was trained with (its ``config.json``), with the keys added since
    (`ADDED_KEYS`) filled in as that run behaved, so that an older run resumes, reloads and compares
    like a new one.

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
    return config


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
        if isinstance(node[leaf], ml_collections.ConfigDict) and isinstance(value, dict):
            node[leaf].update(value)
            continue
        with node.ignore_type():
            node[leaf] = value
    return config


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Check what can be checked before anything runs; errors say what to change."""
    train = config.train
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
