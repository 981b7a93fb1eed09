"""NSI-guided placement of the controller: the blocks where a trained reference model's NSI is
largest (or smallest), as an explicit list for `stepjax.models.resolve_placement`."""

from __future__ import annotations

import numpy as np

from stepjax.analysis.report import load_images, load_source
from stepjax.analysis.trace import DEFAULT_NSI, INDICATORS, TraceOptions, trace_model
from stepjax.errors import UserError
from stepjax.models import NSI_PREFIX, get_spec, is_nsi_placement
from stepjax.records import ANALYSIS_RECORD, analysis_record, read_analysis_record

NSI_SAMPLES = 500


def nsi_scores(model, images, *, indicator: str = DEFAULT_NSI, options: TraceOptions = TraceOptions()) -> np.ndarray:
    """Mean of an indicator over `images`, per block, indexed like `resolve_placement`'s lists.

    **Arguments:**

    - `model`: a `ResNet` in evaluation mode.
    - `images`: normalised inputs.
    - `indicator`: a name in `INDICATORS`.
    - `options`: a `TraceOptions`.

    **Returns:**

    An array with one entry per block of the network (global, 0-based, counting across stages);
    NaN for the shape-changing blocks, where the indicators are not defined.
    """
    if indicator not in INDICATORS:
        raise UserError(f"Unknown indicator {indicator!r}; choose one of {sorted(INDICATORS)}.")
    trace = trace_model(model, images, options=options)
    depths = [stage.num_steps for stage in model.stages]
    scores = np.full(sum(depths), np.nan)
    for offset, stage in zip(np.cumsum([0] + depths[:-1]), trace.stages):
        scores[offset + np.asarray(stage.blocks) - 1] = stage.indicators[indicator].mean(axis=0)
    return scores


def recorded_scores(record, *, indicator: str = DEFAULT_NSI) -> tuple[np.ndarray, dict]:
    """`nsi_scores` of the analysed model of an analysis record, read from the record instead of
    traced again: the ranking stays available once the model's run directory is gone.

    **Arguments:**

    - `record`: an analysis record directory (``results/analysis/NAME``, written by
      ``python -m stepjax.analysis``) or its record file (`stepjax.records.ANALYSIS_RECORD`).
    - `indicator`: a name in `INDICATORS`.

    **Returns:**

    `(scores, settings)`: the per-block means of the record's main model, indexed like
    `nsi_scores` (NaN for the shape-changing blocks), and the record's settings (its images:
    ``num_samples`` of the ``split``).
    """
    path = analysis_record(record)
    if path is None:
        raise UserError(f"{record} holds no {ANALYSIS_RECORD}: pass an analysis record (results/analysis/NAME, "
                        "written by `make analyze`) or a run directory.")
    analysis = read_analysis_record(path)
    figure = analysis["figures"].get(f"nsi_{indicator}")
    if figure is None:
        raise UserError(f"{path} has no figure of indicator {indicator!r}; it has "
                        f"{sorted(k[len('nsi_'):] for k in analysis['figures'] if k[len('nsi_'):] in INDICATORS)}.")
    stages = []
    for stage in figure["stages"]:
        (main,) = [m for m in stage["models"] if m["key"] == "main"]
        scores = np.full(max(stage["blocks"]), np.nan)  # the last block of a stage always has a value
        scores[np.asarray(stage["blocks"]) - 1] = main["mean"]
        stages.append(scores)
    return np.concatenate(stages), analysis["settings"]


def nsi_placement(scores, ratio: float, *, top: bool = True) -> list[int]:
    """The ``round(ratio * num_blocks)`` blocks with the largest (`top`) or smallest scores.

    **Arguments:**

    - `scores`: from `nsi_scores` (NaN blocks are never chosen).
    - `ratio`: the fraction of all blocks to equip, as for ``placement='random'``.
    - `top`: largest scores if true, smallest otherwise.

    **Returns:**

    Sorted global block indices.
    """
    scores = np.asarray(scores, np.float64)
    count = round(ratio * len(scores))
    valid = np.flatnonzero(~np.isnan(scores))
    if not 0.0 <= ratio <= 1.0 or count > len(valid):
        raise UserError(
            f"ratio {ratio} asks for {count} of {len(scores)} blocks, but the NSI is defined on {len(valid)} "
            "(not on the shape-changing first block of a stage); use a ratio of at most "
            f"{len(valid) / len(scores):.2f}."
        )
    order = valid[np.argsort(scores[valid], kind="stable")]
    chosen = order[::-1][:count] if top else order[:count]
    return sorted(int(i) for i in chosen)


def resolve_nsi_placement(config):
    """`config` with an NSI-guided ``model.placement='nsi:SOURCE'`` replaced by the explicit list of
    blocks it selects; any other placement is left as it is.

    ``'nsi:SOURCE'`` puts the controller in the ``round(placement_ratio * num_blocks)`` blocks of
    largest mean NSI (`DEFAULT_NSI`) of the reference model SOURCE (a run directory or
    ``init:EXP``), measured on `NSI_SAMPLES` training images (not on the test set, which
    would select the architecture on test data). The command that asks for it
    (``python -m stepjax.main``) resolves it once, before the model is built, so that the run's
    ``config.json`` holds the blocks and reloading the run never traces the reference again.

    **Arguments:**

    - `config`: an experiment config.

    **Returns:**

    `config`, changed in place.
    """
    m = config.model
    if not is_nsi_placement(m.placement):
        return config
    reference, model, _ = load_source(m.placement[len(NSI_PREFIX):])
    scores = nsi_scores(model, load_images(reference, NSI_SAMPLES, split="train")[0])
    depths = get_spec(m.preset, depths=m.depths).depths
    if len(scores) != sum(depths):
        raise UserError(f"the NSI reference {m.placement!r} has {len(scores)} blocks, this model {sum(depths)}.")
    with m.ignore_type():
        m.placement = nsi_placement(scores, m.placement_ratio)
    return config
