"""Analyse models from run directories (or fresh initialisations) and write the JSON and figures."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepjax import data
from stepjax.analysis import figures
from stepjax.analysis.metrics import StatsOptions, curve_statistics, representational_ability, step_size_statistics
from stepjax.analysis.stats import mcnemar_exact
from stepjax.analysis.trace import DEFAULT_NSI, INDICATORS, Trace, TraceOptions, trace_model
from stepjax.config import command_config
from stepjax.errors import UserError
from stepjax.models import build_model
from stepjax.records import read_analysis_record, write_analysis_record
from stepjax.train import load_run

RECONSTRUCTION_NOTE = (
    "StepNet here is OUR RECONSTRUCTION (the authors' module is not public); the NSI formula and the "
    "representational-ability metric are our choices among the candidates of PAPER.md."
)
INIT_PREFIX = "init:"


def load_source(source: str):
    """A model to analyse, in evaluation mode.

    **Arguments:**

    - `source`: a run directory written by `stepjax.train.train`, or ``init:EXP`` for a freshly
      initialised model of experiment ``EXP`` (e.g. ``init:cifar10_se:cpu``).

    **Returns:**

    `(config, model, step)`; `step` is 0 for a fresh model. The model computes in float32 whatever
    the training's compute dtype (the indicators difference nearby states), and `config` says so.
    """
    if source.startswith(INIT_PREFIX):
        config, step = command_config(source[len(INIT_PREFIX):]), 0
        config.model.dtype = "float32"
        model = build_model(config)
    else:
        if not Path(source).is_dir():
            raise UserError(
                f"{source} is not a directory. Pass a run directory (train one with `make train EXP=...`) "
                f"or {INIT_PREFIX}EXP for a freshly initialised model."
            )
        config, model, step = load_run(source, dtype="float32")
        # a restored run is replicated over the training mesh; the analysis runs on one device
        nnx.update(model, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), nnx.state(model)))
    model.eval()
    return config, model, step


def random_init(config):
    """The untrained model of `config` (same architecture and seed), in evaluation mode."""
    model = build_model(config)
    model.eval()
    return model


def model_label(config, step: int) -> str:
    """A short description: controller (StepNet marked as our reconstruction), preset, placement,
    training state and, for a trained model, its seed (two seeds of one model tell apart)."""
    m = config.model
    names = {"stepnet": "StepNet (our reconstruction)", "constant": "plain (h = 1)",
             "channel_step": "trained constant step per channel (control)"}
    name = names.get(m.controller, m.controller.upper())
    options = dict(m.controller_options)
    parts = [name + (f" {options}" if options else ""), m.preset]
    if m.placement != "all":
        parts.append(f"placement {m.placement}")
    parts.append(f"trained {step} steps, seed {config.seed}" if step else "random init")
    return ", ".join(parts)


def load_images(config, num_samples: int, *, split: str = "test", data_dir: str | None = None, seed: int = 0):
    """A fixed random subset of a split, normalised as in training, and its labels (a random subset
    and not the first images: a split may be stored sorted by class).

    **Arguments:**

    - `config`: a run config (its ``data`` group is used).
    - `num_samples`: how many (at most the split's size).
    - `split`: ``"test"`` or ``"train"``.
    - `data_dir`: read an npz copy from this directory instead of ``config.data``'s source.
    - `seed`: seed of the subset.

    **Returns:**

    `(images float32 (N, H, W, C), labels int (N,))`.
    """
    cfg = config.data.copy_and_resolve_references()
    if data_dir:
        cfg.source, cfg.dir = "npz", data_dir
    images, labels = data.load_split(cfg, split)
    info = data.dataset_info(cfg)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(labels))[:num_samples])
    return np.asarray(data.normalize(images[chosen], info.mean, info.std), np.float32), np.asarray(labels[chosen])


@dataclasses.dataclass
class Analysed:
    """One analysed model: its report `key`, `label`, `source`, training `step`, `trace`,
    accuracy on the analysed samples and, per sample, whether it is `correct` (None if unknown)."""

    key: str
    label: str
    source: str
    step: int
    trace: Trace
    accuracy: float
    correct: np.ndarray | None = None


_log = logging.getLogger("stepjax")


def _traced(key, label, model, images, options, gate=None):
    _log.info("tracing %s (%s) on %d images", key, label, len(images))
    return trace_model(model, images, options=options, gate=gate)


def _analysed(key, label, source, step, trace, labels):
    correct = np.argmax(trace.logits, -1) == labels
    return Analysed(key, label, source, step, trace, float(np.mean(correct)), correct)


def analyse(source: str, *, compare: str | None = None, num_samples: int = 1000, split: str = "test",
            data_dir: str | None = None, controls: bool = True, options: TraceOptions = TraceOptions()) -> list:
    """Trace a model, optionally a second one on the same images, and the controls.

    **Arguments:**

    - `source`: the model (see `load_source`).
    - `compare`: a second model to overlay, or None. It must use the same dataset.
    - `num_samples`, `split`, `data_dir`: the images (see `load_images`).
    - `controls`: also trace the randomly initialised network (unless the model is one) and the
      network with each gate replaced by its dataset mean (unless its steps do not vary across
      samples, as in a plain ResNet).
    - `options`: a `TraceOptions`.

    **Returns:**

    A list of `Analysed` (keys ``main``, then ``random_init`` and ``mean_gate``, then ``compare``).
    """
    config, model, step = load_source(source)
    images, labels = load_images(config, num_samples, split=split, data_dir=data_dir, seed=options.seed)
    label = model_label(config, step)
    main = _traced("main", label, model, images, options)
    out = [_analysed("main", label, source, step, main, labels)]
    if controls and step:
        init_label = f"{model_label(config, 0)} [control]"
        out.append(_analysed("random_init", init_label, source, 0,
                             _traced("random_init", init_label, random_init(config), images, options), labels))
    if controls and any(np.ptp(stage.step_size, axis=0).max() > 0 for stage in main.stages):
        gate_label = f"{label} [control: gate = dataset mean]"
        out.append(_analysed("mean_gate", gate_label, source, step,
                             _traced("mean_gate", gate_label, model, images, options, main.gate_mean), labels))
    if compare is not None:
        other_config, other, other_step = load_source(compare)
        if other_config.data.name != config.data.name:
            raise UserError(f"--compare uses dataset {other_config.data.name!r}, the model {config.data.name!r}.")
        other_label = model_label(other_config, other_step)
        out.append(_analysed("compare", other_label, compare, other_step,
                             _traced("compare", other_label, other, images, options), labels))
    return out


def _nsi_figure(models: list, indicator: str, num_curves: int, title: str) -> dict:
    stages = []
    for s, stage in enumerate(models[0].trace.stages):
        entries = []
        for m in models:
            values = m.trace.stages[s].indicators[indicator]
            entries.append({"key": m.key, "label": m.label, "mean": values.mean(0).tolist(),
                            "min": values.min(0).tolist(), "max": values.max(0).tolist(),
                            "samples": values[:num_curves].tolist()})
        stages.append({"stage": s + 1, "blocks": list(stage.blocks), "models": entries})
    return {"title": title, "indicator": indicator, "label": INDICATORS[indicator].label, "stages": stages}


def _step_size_figure(model: Analysed, sort_by: str, num_rows: int, num_columns: int) -> dict:
    stats = step_size_statistics(model.trace)
    stages, high = [], 0.0
    for s, stage in enumerate(model.trace.stages):
        panels = []
        for k, block in enumerate(stage.blocks):
            h = stage.step_size[:num_rows, k, :num_columns]
            order = np.argsort(stage.indicators[sort_by][:num_rows, k])
            panels.append({"block": block, "cv_samples": stats[s]["cv_samples"][k], "matrix": h[order].tolist()})
            high = max(high, float(h.max()))
        stages.append({"stage": s + 1, "panels": panels})
    return {"title": f"step sizes per block ({num_rows} samples x first {num_columns} channels): {model.label}",
            "sort_by": sort_by,
            "vmin": 0.0, "vmax": high, "stages": stages}


def _constant_step(ability: dict) -> bool:
    """Whether every correlation of a model is undefined (its step is the same everywhere)."""
    return all(math.isnan(r["within_block"]["mean_rho"]) and math.isnan(r["across_blocks"]["rho"])
               for r in ability.values())


def mean_gate_test(models: list) -> dict | None:
    """The per-image paired comparison of the model (``main``) with its mean-gate control: exact
    McNemar on which images each gets right (`stats.mcnemar_exact`); None without the control."""
    by_key = {m.key: m for m in models}
    main, control = by_key.get("main"), by_key.get("mean_gate")
    if main is None or control is None or main.correct is None or control.correct is None:
        return None
    test = mcnemar_exact(main.correct, control.correct)
    return {"test": "exact McNemar", "num_samples": int(len(main.correct)), "model_accuracy": main.accuracy,
            "control_accuracy": control.accuracy, "model_only_correct": test.only_a,
            "control_only_correct": test.only_b, "p_value": test.p_value}


def _correlation_row(label: str, name: str, result: dict) -> dict:
    w, a = result["within_block"], result["across_blocks"]
    gate = result.get("within_block_gate_partial", {})
    return {
        "model": label, "indicator": name, "uses_step": INDICATORS[name].uses_step,
        "within_rho": w["mean_rho"], "within_ci": w["mean_ci"], "within_p": w["mean_p_value"],
        "significant": [w["num_significant_positive"], w["num_significant_negative"]],
        "num_tested": w["num_tested"], "correction": "holm",
        "gate_partial_rho": gate.get("mean_rho", math.nan), "gate_partial_p": gate.get("mean_p_value", math.nan),
        "across_rho": a["rho"], "partial_rho": a["partial_rho"], "partial_ci": a["partial_ci"],
        "partial_p": a["partial_p_value"],
    }


def _correlation_figure(models: list, ability: dict, alpha: float) -> dict:
    rows = [_correlation_row(m.label, name, result) for m in models if not _constant_step(ability[m.key])
            for name, result in ability[m.key].items()]
    note = (
        "Spearman correlation of the channel-mean step h with each indicator. Within-block: mean over blocks "
        "of the correlation across samples, bootstrap CI over samples, permutation p (samples relabelled); "
        f"'blocks p<=a' counts blocks with rho > 0 (+) or < 0 (-) whose permutation p, Holm-adjusted over the "
        f"row's tested blocks (family-wise error rate {alpha}), is <= {alpha}. Part of a within-block correlation "
        "is built in: SE's gate is a function of GAP(f) and StepNet's also reads GAP|f|/(GAP|f|+GAP|y|), "
        "summaries of the same f and y that the relative derivative ||f||/||y|| measures; 'gate inputs "
        "partialled' is the mean over blocks of "
        "the correlation partial on what the gate reads (RMS over channels of GAP(f), and the channel mean of "
        "GAP|f|/(GAP|f|+GAP|y|)), with its Freedman-Lane permutation p: about 0 where the correlation is only "
        "built in. The spectral radius, the secant Lipschitz estimate and h* are not computed from what the "
        "gate reads. Across-block: correlation of block means; partial = controlling for depth, Freedman-Lane "
        "permutation p and bootstrap CI over blocks. Without *, a classical controller would give negative rho "
        "(smaller steps where the indicator is larger) and positive rho with h*; * marks functions of h, whose "
        "correlation with h is partly mechanical and no evidence either way. Models whose step never varies "
        "(a plain ResNet) have no rows. " + RECONSTRUCTION_NOTE
    )
    return {"title": "representational ability: do the chosen steps track stiffness?", "note": note, "rows": rows,
            "mean_gate_test": mean_gate_test(models)}


def _ability(model: Analysed, stats: StatsOptions) -> dict:
    """`representational_ability` of one model, with a progress line on each side (minutes at depth)."""
    blocks = sum(len(stage.blocks) for stage in model.trace.stages)
    _log.info("statistics of %s: %d indicators x %d blocks, %d permutations and %d bootstrap draws each",
              model.key, len(INDICATORS), blocks, stats.num_permutations, stats.num_bootstrap)
    start = time.monotonic()
    result = representational_ability(model.trace, stats)
    _log.info("statistics of %s done (%.0f s)", model.key, time.monotonic() - start)
    return result


def build_report(models: list, *, stats: StatsOptions = StatsOptions(), num_curves: int = 50,
                 settings: dict | None = None) -> dict:
    """The JSON-ready report of analysed models: per model the accuracy, step-size statistics,
    NSI curve statistics and representational ability, and for the mean-gate control its
    ``paired_test`` against the model (`mean_gate_test`); under ``figures`` the data of every figure.

    **Arguments:**

    - `models`: the `Analysed` list from `analyse`.
    - `stats`: a `StatsOptions`.
    - `num_curves`: per-sample curves kept per model in the NSI figures.
    - `settings`: recorded under ``settings``.

    **Returns:**

    A dict (NaN where a statistic is undefined; `write_report` turns NaN into null).
    """
    by_key = {m.key: m for m in models}
    ability = {m.key: _ability(m, stats) for m in models}
    overlay = [by_key[k] for k in ("main", "compare") if k in by_key]
    figs = {
        f"nsi_{name}": _nsi_figure(overlay, name, num_curves, f"NSI candidate {INDICATORS[name].label}")
        for name in INDICATORS
    }
    controls = [by_key[k] for k in ("main", "random_init", "mean_gate") if k in by_key]
    if len(controls) > 1:
        figs["nsi_controls"] = _nsi_figure(controls, DEFAULT_NSI, num_curves // 2, "NSI of the model and its controls")
    for m in overlay:
        figs[f"step_sizes_{m.key}"] = _step_size_figure(m, "implied_step", num_rows=32, num_columns=64)
    figs["correlations"] = _correlation_figure(models, ability, stats.alpha)
    paired = {"mean_gate": {"paired_test": figs["correlations"]["mean_gate_test"]}} if "mean_gate" in by_key else {}
    return {
        "note": RECONSTRUCTION_NOTE,
        "settings": {**(settings or {}), "stats": dataclasses.asdict(stats)},
        "models": {
            m.key: {
                "label": m.label, "source": m.source, "step": m.step, "accuracy": m.accuracy,
                "num_samples": int(m.trace.logits.shape[0]),
                "step_size": step_size_statistics(m.trace),
                "nsi_summary": {name: curve_statistics(m.trace, name) for name in INDICATORS},
                "representational_ability": ability[m.key],
                **paired.get(m.key, {}),
            }
            for m in models
        },
        "figures": figs,
    }


PLOTTERS = {"nsi": figures.plot_nsi, "step_sizes": figures.plot_step_sizes, "correlations": figures.plot_correlations}


def _json_ready(value):
    """NaN and infinities as null, floats to 4 significant digits (figure data, not raw arrays)."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def render_report(report: dict, out_dir, *, draw: bool = True) -> list[Path]:
    """Draw an analysis report (`build_report`, or a saved record, `stepjax.records.read_analysis_record`): ``correlations.md``
    and, with `draw`, one PNG per figure into `out_dir`.

    **Returns:**

    The paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if draw:
        _log.info("drawing %d figures into %s", len(report["figures"]), out_dir)
    for name, figure in report["figures"].items() if draw else ():
        path = out_dir / f"{name}.png"
        PLOTTERS[next(p for p in PLOTTERS if name.startswith(p))](figure, path)
        written.append(path)
    markdown = out_dir / "correlations.md"
    markdown.write_text(figures.correlation_markdown(report["figures"]["correlations"]))
    return [markdown, *written]


def write_report(report: dict, record_dir, out_dir) -> list[Path]:
    """Write the report's record (`stepjax.records.ANALYSIS_RECORD`) into `record_dir` (under
    ``results/``) and draw it into `out_dir` (`render_report`).

    **Returns:**

    The paths written.
    """
    path = write_analysis_record(record_dir, _json_ready(report))
    return [path, *render_report(read_analysis_record(path), out_dir)]
