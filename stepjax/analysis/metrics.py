"""Summaries of a `Trace`: step-size statistics, NSI curve statistics and the
representational-ability metric (ours, see ``docs/ANALYSIS.md``)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from stepjax.analysis.stats import (
    bootstrap_interval,
    coefficient_of_variation,
    correlation_test,
    holm,
    permutation_p_value,
    spearman,
)
from stepjax.analysis.trace import GATE_INPUTS, INDICATORS, Trace


@dataclasses.dataclass(frozen=True)
class StatsOptions:
    """Settings of the permutation nulls and bootstrap intervals."""

    num_permutations: int = 1000
    num_bootstrap: int = 500
    confidence: float = 0.95
    alpha: float = 0.05
    seed: int = 0


def _nanmean(x, axis=None):
    with warnings.catch_warnings():  # all-NaN (a constant step size) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def step_size_statistics(trace: Trace) -> list[dict]:
    """Per stage and analysed block: the mean step, and its coefficient of variation across
    samples (of the channel-mean step), across channels (mean over samples) and across samples
    per channel (mean over channels).

    **Returns:**

    One dict of per-block lists per stage.
    """
    out = []
    for stage in trace.stages:
        h = stage.step_size  # (N, K, C)
        out.append({
            "blocks": list(stage.blocks),
            "mean": h.mean(axis=(0, 2)).tolist(),
            "cv_samples": coefficient_of_variation(h.mean(-1), axis=0).tolist(),
            "cv_channels": _nanmean(coefficient_of_variation(h, axis=-1), axis=0).tolist(),
            "cv_samples_per_channel": _nanmean(coefficient_of_variation(h, axis=0), axis=-1).tolist(),
        })
    return out


def curve_statistics(trace: Trace, indicator: str) -> list[dict]:
    """Summary of the NSI curves of one indicator, per stage: the mean over samples and blocks,
    the mean per-block spread across samples (std), the peak of the mean curve, its spikiness
    (mean absolute change between neighbouring blocks over its mean) and the ratio of its last
    block to its median."""
    out = []
    for stage in trace.stages:
        values = stage.indicators[indicator]
        curve = values.mean(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            spikiness = np.abs(np.diff(curve)).mean() / curve.mean() if len(curve) > 1 else np.nan
            last_ratio = curve[-1] / np.median(curve)
        out.append({
            "mean": float(values.mean()), "spread": float(values.std(axis=0).mean()), "peak": float(curve.max()),
            "spikiness": float(spikiness), "last_over_median": float(last_ratio),
        })
    return out


def _flatten(trace: Trace, indicator: str):
    """Channel-mean steps and one indicator over all analysed blocks: two ``(K, N)`` arrays."""
    h = np.concatenate([s.step_size.mean(-1) for s in trace.stages], axis=1).T
    values = np.concatenate([s.indicators[indicator] for s in trace.stages], axis=1).T
    return h.astype(np.float64), values.astype(np.float64)


def _flatten_gate_inputs(trace: Trace):
    """The `GATE_INPUTS` statistics over all analysed blocks, ``(K, N, len(GATE_INPUTS))``, or None
    when the trace does not have them."""
    if any(s.gate_inputs is None for s in trace.stages):
        return None
    return np.stack([np.concatenate([s.gate_inputs[name] for s in trace.stages], axis=1).T
                     for name in GATE_INPUTS], axis=-1).astype(np.float64)


def _within_statistic(h, values):
    """Per resample ``(R, K, N)``: the per-block correlations and their mean, ``(R, K + 1)``."""
    rho = spearman(h, values)
    return np.concatenate([rho, _nanmean(rho, axis=-1)[..., None]], axis=-1)


def _significant(test, alpha) -> dict:
    """Counts of blocks significant at `alpha` by sign, with Holm's adjustment over the blocks and
    without; the adjusted p-values."""
    adjusted = holm(test.p_value)
    counts = {}
    for p, suffix in ((adjusted, ""), (test.p_value, "_uncorrected")):
        counts[f"num_significant_positive{suffix}"] = int(np.sum((p <= alpha) & (test.rho > 0)))
        counts[f"num_significant_negative{suffix}"] = int(np.sum((p <= alpha) & (test.rho < 0)))
    return {"p_value_holm": adjusted.tolist(), "correction": "holm", **counts}


def resolvable_permutations(num_blocks: int, options: StatsOptions) -> int:
    """Permutations enough for a block to pass Holm's adjustment over `num_blocks` blocks: the
    smallest permutation p-value is ``1 / (P + 1)`` and Holm multiplies it by the number of blocks,
    so with ``P + 1 < num_blocks / alpha`` no block can be significant, whatever the data (1000
    permutations and 51 blocks of ResNet-164 give at best 0.051). Gives ``P + 1 >= 2 num_blocks /
    alpha``, or `options.num_permutations` if that is more."""
    return max(options.num_permutations, math.ceil(2 * num_blocks / options.alpha) - 1)


def _within_block(h, values, options: StatsOptions) -> dict:
    """Per block, Spearman across samples (rows of the ``(K, N)`` arrays), and their mean; blocks
    counted significant after Holm's adjustment over the tested blocks, with enough permutations
    for that to be possible (`resolvable_permutations`)."""
    test = correlation_test(h, values, num_permutations=resolvable_permutations(len(h), options), seed=options.seed)
    ci = bootstrap_interval(_within_statistic, h, values, axis=1, num_resamples=options.num_bootstrap,
                            confidence=options.confidence, seed=options.seed)
    mean_rho = _nanmean(test.rho)
    return {
        "rho": test.rho.tolist(), "p_value": test.p_value.tolist(), "ci": ci[:, :-1].tolist(),
        "mean_rho": float(mean_rho), "mean_ci": ci[:, -1].tolist(),
        "mean_p_value": float(permutation_p_value(mean_rho, _nanmean(test.null, axis=0))),
        **_significant(test, options.alpha),
        "num_tested": int(np.sum(~np.isnan(test.rho))),
    }


def gate_partial_correlation(h, values, gate_inputs, options: StatsOptions = StatsOptions()) -> dict:
    """The within-block correlation of the step with an indicator beyond what the gate reads: per
    block, the partial Spearman correlation of `h` and `values` across samples given the gate's
    own input statistics (`GATE_INPUTS`), with a Freedman-Lane permutation p-value, and the mean
    over blocks with its joint null. Where the correlation is built in (the step and the
    indicator both follow the statistic the gate reads) it is about 0.

    **Arguments:**

    - `h`, `values`: ``(K, N)``, the channel-mean step and the indicator, per block and sample.
    - `gate_inputs`: ``(K, N, p)``, the statistics partialled out.
    - `options`: a `StatsOptions`.

    **Returns:**

    ``{"rho", "p_value", "mean_rho", "mean_p_value", "controls"}``, JSON-ready.
    """
    test = correlation_test(h, values, gate_inputs, num_permutations=options.num_permutations, seed=options.seed)
    mean_rho = _nanmean(test.rho)
    return {"rho": test.rho.tolist(), "p_value": test.p_value.tolist(), "mean_rho": float(mean_rho),
            "mean_p_value": float(permutation_p_value(mean_rho, _nanmean(test.null, axis=0))),
            "controls": list(GATE_INPUTS)}


def _across_statistic(h_means, value_means, depth):
    """Per resample of blocks ``(R, K)``: the plain and the depth-partial correlation, ``(R, 2)``."""
    return np.stack([spearman(h_means, value_means), spearman(h_means, value_means, controls=depth[..., None])], -1)


def _across_blocks(h, values, options: StatsOptions) -> dict:
    """Spearman of the block means, plain and partial on depth, with permutation nulls over
    blocks and bootstrap intervals over blocks (the blocks are the samples here: their means
    over hundreds of images hardly move when the images are resampled)."""
    depth = np.arange(h.shape[0], dtype=np.float64)
    means = h.mean(axis=1), values.mean(axis=1)
    plain = correlation_test(*means, num_permutations=options.num_permutations, seed=options.seed)
    partial = correlation_test(*means, depth, num_permutations=options.num_permutations, seed=options.seed)
    ci = bootstrap_interval(_across_statistic, *means, depth, axis=0, num_resamples=options.num_bootstrap,
                            confidence=options.confidence, seed=options.seed)
    return {
        "rho": float(plain.rho), "p_value": float(plain.p_value), "ci": ci[:, 0].tolist(),
        "partial_rho": float(partial.rho), "partial_p_value": float(partial.p_value), "partial_ci": ci[:, 1].tolist(),
        "bootstrap_unit": "blocks",
    }


def representational_ability(trace: Trace, options: StatsOptions = StatsOptions()) -> dict:
    """How well the chosen step sizes track each stiffness indicator (the metric is ours).

    Within a block: Spearman correlation across samples of the channel-mean step and the
    indicator, a permutation null that relabels samples (shared by all blocks, so the mean over
    blocks gets a joint null), a bootstrap interval over samples, and the blocks significant
    after Holm's adjustment over the tested blocks. Where the trace records the gate's inputs,
    also the same correlation partial on them (`gate_partial_correlation`): the gates read
    summaries of ``f`` (and StepNet of ``y``), so a correlation with an indicator such as
    ``||f||/||y||`` is partly built in. Across blocks: Spearman correlation of the block means,
    and the partial correlation controlling for the block's depth (position among the analysed
    blocks), with Freedman-Lane permutation nulls and bootstrap intervals over blocks. NaN where
    the step is constant (a plain ResNet, a fixed gate).

    **Arguments:**

    - `trace`: a `Trace`.
    - `options`: a `StatsOptions`.

    **Returns:**

    A dict indicator -> ``{"within_block": ..., "across_blocks": ...}`` of JSON-ready values
    (and ``"within_block_gate_partial"`` where the trace has the gate's inputs).
    """
    out, gate_inputs = {}, _flatten_gate_inputs(trace)
    for name in INDICATORS:
        h, values = _flatten(trace, name)
        out[name] = {"within_block": _within_block(h, values, options),
                     "across_blocks": _across_blocks(h, values, options)}
        if gate_inputs is not None:
            out[name]["within_block_gate_partial"] = gate_partial_correlation(h, values, gate_inputs, options)
    return out
