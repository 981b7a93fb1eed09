"""Rank correlations with permutation nulls and bootstrap intervals (NumPy, vectorised).

Every function correlates along the last axis; leading axes are independent problems (for
instance one per block) that share the same permutations, so a permutation is a relabelling of
samples and statistics pooled over the leading axes (their mean) get a valid joint null.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
from scipy.stats import rankdata


class CorrelationTest(NamedTuple):
    """Result of `correlation_test`; arrays have the leading shape of the inputs.

    - `rho`: the observed (partial) Spearman correlation.
    - `p_value`: two-sided permutation p-value, ``(1 + #{|null| >= |rho|}) / (1 + M)``.
    - `null`: the permutation distribution, shape ``(..., M)``.
    """

    rho: np.ndarray
    p_value: np.ndarray
    null: np.ndarray


def _ranks(x):
    return rankdata(np.asarray(x, np.float64), axis=-1)


def _residual_ranks(x, controls):
    """Ranks of `x` along the last axis, minus their least-squares fit on an intercept and the
    ranks of `controls` (``(n,)`` or ``(n, p)``)."""
    r = _ranks(x)
    n = r.shape[-1]
    columns = [np.ones(n)]
    if controls is not None:
        z = np.asarray(controls, np.float64).reshape(n, -1)
        columns += [_ranks(c) for c in z.T]
    design = np.stack(columns, axis=-1)
    fit = np.linalg.lstsq(design, np.moveaxis(r, -1, 0).reshape(n, -1), rcond=None)[0]
    return r - np.moveaxis((design @ fit).reshape(r.shape[-1:] + r.shape[:-1]), 0, -1)


def _pearson_centred(a, b):
    """Pearson correlation of residual ranks (already centred); NaN where one is constant (its
    squared norm is then rounding noise, far below the 1/2 of two distinct ranks)."""
    saa, sbb = (a * a).sum(-1), (b * b).sum(-1)
    constant = (saa < 1e-9) | (sbb < 1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(constant, np.nan, (a * b).sum(-1) / np.sqrt(np.where(constant, 1.0, saa * sbb)))


def spearman(x, y, controls=None) -> np.ndarray:
    """Spearman rank correlation along the last axis; partial on `controls` if given.

    The partial correlation correlates the residuals of the ranks of `x` and `y` after a linear
    fit on the ranks of the controls. NaN where `x` or `y` is constant.

    **Arguments:**

    - `x`, `y`: arrays ``(..., n)``.
    - `controls`: None, or ``(n,)`` / ``(n, p)`` covariates shared by every leading index.

    **Returns:**

    An array of the leading shape.
    """
    return _pearson_centred(_residual_ranks(x, controls), _residual_ranks(y, controls))


def correlation_test(x, y, controls=None, *, num_permutations: int = 1000, seed: int = 0) -> CorrelationTest:
    """`spearman` with a two-sided permutation null.

    Without controls the null permutes `x` against `y`; with controls it permutes the residual
    ranks of `x` (Freedman-Lane). All leading indices use the same permutations.

    **Arguments:**

    - `x`, `y`, `controls`: as in `spearman`.
    - `num_permutations`: size of the null sample.
    - `seed`: seed of the permutations.

    **Returns:**

    A `CorrelationTest`.
    """
    rx, ry = _residual_ranks(x, controls), _residual_ranks(y, controls)
    rho = _pearson_centred(rx, ry)
    rng = np.random.default_rng(seed)
    n = rx.shape[-1]
    null = np.stack([_pearson_centred(rx[..., rng.permutation(n)], ry) for _ in range(num_permutations)], -1)
    return CorrelationTest(rho, permutation_p_value(rho, null), null)


def permutation_p_value(observed, null) -> np.ndarray:
    """Two-sided p-value of `observed` against a null sample on the last axis of `null`
    (NaN where the observed value is NaN)."""
    observed = np.asarray(observed, np.float64)
    extreme = np.abs(null) >= np.abs(observed)[..., None] - 1e-12
    p = (1.0 + extreme.sum(-1)) / (1.0 + null.shape[-1])
    return np.where(np.isnan(observed), np.nan, p)


def bootstrap_interval(statistic: Callable, *arrays, axis: int = -1, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling along `axis`.

    **Arguments:**

    - `statistic`: maps the arrays to an array of any shape.
    - `arrays`: the data; the same resampled indices are applied to each along `axis`.
    - `axis`: the axis of independent units (samples).
    - `num_resamples`, `confidence`, `seed`: bootstrap settings.

    **Returns:**

    An array ``(2, *statistic_shape)``: the lower and upper bounds (NaN where every resample is
    NaN).
    """
    n = np.shape(arrays[0])[axis]
    rng = np.random.default_rng(seed)
    draws = np.stack([
        statistic(*(np.take(a, idx, axis=axis) for a in arrays))
        for idx in (rng.integers(0, n, n) for _ in range(num_resamples))
    ])
    tail = 50.0 * (1.0 - confidence)
    with warnings.catch_warnings():  # all-NaN entries (constant step sizes) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(draws, [tail, 100.0 - tail], axis=0)


def coefficient_of_variation(x, axis) -> np.ndarray:
    """``std / |mean|`` along `axis` (NaN where the mean is zero)."""
    x = np.asarray(x, np.float64)
    mean = np.abs(x.mean(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, x.std(axis=axis) / mean, np.nan)
