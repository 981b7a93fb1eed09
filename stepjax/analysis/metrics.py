"""Summaries of a `Trace`: step-size statistics, NSI curve statistics and the
representational-ability metric (ours, see ``docs/ANALYSIS.md``)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from stepjax.analysis.stats import (
    bootstrap_interval,
    coefficient_of_variation,
    correlation_test,
    permutation_p_value,
    spearman,
)
from stepjax.analysis.trace import INDICATORS, Trace


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


def _within_statistic(h, values):
    rho = spearman(h, values)
    return np.append(rho, _nanmean(rho))


def _within_block(h, values, options: StatsOptions) -> dict:
    """Per block, Spearman across samples (rows of the ``(K, N)`` arrays), and their mean."""
    test = correlation_test(h, values, num_permutations=options.num_permutations, seed=options.seed)
    ci = bootstrap_interval(_within_statistic, h, values, axis=1, num_resamples=options.num_bootstrap,
                            confidence=options.confidence, seed=options.seed)
    mean_rho = _nanmean(test.rho)
    return {
        "rho": test.rho.tolist(), "p_value": test.p_value.tolist(), "ci": ci[:, :-1].tolist(),
        "mean_rho": float(mean_rho), "mean_ci": ci[:, -1].tolist(),
        "mean_p_value": float(permutation_p_value(mean_rho, _nanmean(test.null, axis=0))),
        "num_significant_positive": int(np.sum((test.p_value <= options.alpha) & (test.rho > 0))),
        "num_significant_negative": int(np.sum((test.p_value <= options.alpha) & (test.rho < 0))),
        "num_tested": int(np.sum(~np.isnan(test.rho))),
    }


def _across_blocks(h, values, options: StatsOptions) -> dict:
    """Spearman of the block means, plain and partial on depth; bootstrap over samples."""
    depth = np.arange(h.shape[0], dtype=np.float64)
    means = h.mean(axis=1), values.mean(axis=1)
    plain = correlation_test(*means, num_permutations=options.num_permutations, seed=options.seed)
    partial = correlation_test(*means, depth, num_permutations=options.num_permutations, seed=options.seed)

    def statistic(h, values):
        a, b = h.mean(axis=1), values.mean(axis=1)
        return np.array([spearman(a, b), spearman(a, b, controls=depth)])

    ci = bootstrap_interval(statistic, h, values, axis=1, num_resamples=options.num_bootstrap,
                            confidence=options.confidence, seed=options.seed)
    return {
        "rho": float(plain.rho), "p_value": float(plain.p_value), "ci": ci[:, 0].tolist(),
        "partial_rho": float(partial.rho), "partial_p_value": float(partial.p_value), "partial_ci": ci[:, 1].tolist(),
    }


def representational_ability(trace: Trace, options: StatsOptions = StatsOptions()) -> dict:
    """How well the chosen step sizes track each stiffness indicator (the metric is ours).

    Within a block: Spearman correlation across samples of the channel-mean step and the
    indicator, a permutation null that relabels samples (shared by all blocks, so the mean over
    blocks gets a joint null), and a bootstrap interval over samples. Across blocks: Spearman
    correlation of the block means, and the partial correlation controlling for the block's depth
    (position among the analysed blocks), with permutation nulls over blocks and bootstrap
    intervals over samples. NaN where the step is constant (a plain ResNet, a fixed gate).

    **Arguments:**

    - `trace`: a `Trace`.
    - `options`: a `StatsOptions`.

    **Returns:**

    A dict indicator -> ``{"within_block": ..., "across_blocks": ...}`` of JSON-ready values.
    """
    out = {}
    for name in INDICATORS:
        h, values = _flatten(trace, name)
        out[name] = {"within_block": _within_block(h, values, options),
                     "across_blocks": _across_blocks(h, values, options)}
    return out
