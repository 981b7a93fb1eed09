"""Rank correlations with permutation nulls and bootstrap intervals, Holm's adjustment for many
tests and the exact McNemar test of two classifiers (NumPy, vectorised).

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


def _ranks(x, axis=-1):
    return rankdata(np.asarray(x, np.float64), axis=axis)


def _design(controls, n: int) -> np.ndarray:
    """The regression design ``(..., n, q)``: an intercept and the ranks of `controls`, given as
    None, ``(n,)`` or ``(n, p)`` (shared by every leading index) or ``(..., n, p)`` (one set per
    leading index)."""
    if controls is None:
        return np.ones((n, 1))
    z = np.asarray(controls, np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.shape[-2] != n:
        raise ValueError(f"controls have {z.shape[-2]} samples, the data {n}: pass controls shaped (n,), (n, p) "
                         "or (..., n, p).")
    return np.concatenate([np.ones(z.shape[:-1] + (1,)), _ranks(z, axis=-2)], axis=-1)


def _residualise(r, design, pinv):
    """`r` ``(..., m, n)`` minus its least-squares fit on `design` ``(..., n, q)`` (`pinv` its
    pseudo-inverse ``(..., q, n)``), each of the ``m`` rows fitted on its own."""
    return r - (r @ np.swapaxes(pinv, -1, -2)) @ np.swapaxes(design, -1, -2)


def _residual_ranks(x, design, pinv):
    """Ranks of `x` along the last axis minus their fit on `design`."""
    return _residualise(_ranks(x)[..., None, :], design, pinv)[..., 0, :]


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
    fit on an intercept and the ranks of the controls. NaN where `x` or `y` is constant.

    **Arguments:**

    - `x`, `y`: arrays ``(..., n)``.
    - `controls`: None; ``(n,)`` or ``(n, p)`` covariates shared by every leading index; or
      ``(..., n, p)``, one set per leading index.

    **Returns:**

    An array of the leading shape.
    """
    n = np.shape(x)[-1]
    design = _design(controls, n)
    pinv = np.linalg.pinv(design)
    return _pearson_centred(_residual_ranks(x, design, pinv), _residual_ranks(y, design, pinv))


def correlation_test(x, y, controls=None, *, num_permutations: int = 1000, seed: int = 0) -> CorrelationTest:
    """`spearman` with a two-sided Freedman-Lane permutation null.

    Everything happens on ranks: the ranks of `y` are split into their fit on the design (an
    intercept and the ranks of the controls) and the residuals; a permutation of the residuals,
    added back to the fit, gives a new `y`, whose partial correlation with the ranks of `x` given
    the controls is one draw of the null (Freedman & Lane 1983). Without controls this is the
    plain permutation test (the ranks of `y` relabelled). All leading indices use the same
    permutations, so statistics pooled over them (their mean) get a joint null.

    **Arguments:**

    - `x`, `y`, `controls`: as in `spearman`.
    - `num_permutations`: size of the null sample.
    - `seed`: seed of the permutations.

    **Returns:**

    A `CorrelationTest`.
    """
    n = np.shape(x)[-1]
    design = _design(controls, n)
    pinv = np.linalg.pinv(design)
    rx, ry = _residual_ranks(x, design, pinv), _residual_ranks(y, design, pinv)
    rho = _pearson_centred(rx, ry)
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(n), (num_permutations, 1)), axis=1)
    chunk = max(1, int(4e6 // max(1, rx.size)))  # bounds the (..., chunk, n) arrays to ~4e6 numbers
    null = np.concatenate([
        # the fit of y is in the design's span: residualising fit + permuted residuals leaves the latter's part
        _pearson_centred(rx[..., None, :], _residualise(ry[..., perms[start : start + chunk]], design, pinv))
        for start in range(0, num_permutations, chunk)
    ], axis=-1)
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

    - `statistic`: maps the resampled arrays, each with a new leading axis of resamples
      ``(R, ...)``, to an array ``(R, *statistic_shape)`` (vectorised over resamples; they are
      passed in chunks).
    - `arrays`: the data; the same resampled indices are applied to each along `axis`.
    - `axis`: the axis of independent units (samples).
    - `num_resamples`, `confidence`, `seed`: bootstrap settings.

    **Returns:**

    An array ``(2, *statistic_shape)``: the lower and upper bounds (NaN where every resample is
    NaN).
    """
    n = np.shape(arrays[0])[axis]
    indices = np.random.default_rng(seed).integers(0, n, (num_resamples, n))
    chunk = max(1, int(4e6 // max(1, np.size(arrays[0]))))  # bounds each chunk to ~4e6 numbers per array
    draws = np.concatenate([
        statistic(*(np.moveaxis(np.take(a, indices[start : start + chunk], axis=axis), axis % np.ndim(a), 0)
                    for a in arrays))
        for start in range(0, num_resamples, chunk)
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


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of the p-values along the last axis (a family per leading
    index), controlling the family-wise error rate: the k-th smallest of m p-values is multiplied
    by ``m - k + 1``, then made monotone and capped at 1. NaN p-values (untested entries) stay
    NaN and do not count in m.

    **Arguments:**

    - `p_values`: array ``(..., m)``.

    **Returns:**

    The adjusted p-values, of the same shape; reject where ``adjusted <= alpha``.
    """
    p = np.asarray(p_values, np.float64)
    tested = ~np.isnan(p)
    order = np.argsort(np.where(tested, p, np.inf), axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1)
    factors = tested.sum(-1, keepdims=True) - np.arange(p.shape[-1])
    adjusted_sorted = np.minimum(1.0, np.fmax.accumulate(ranked * factors, axis=-1))
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, adjusted_sorted, axis=-1)
    return np.where(tested, adjusted, np.nan)


class McNemar(NamedTuple):
    """Result of `mcnemar_exact`: `only_a` (images only the first model gets right), `only_b`
    (only the second), and the two-sided exact `p_value`."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar_exact(correct_a, correct_b) -> McNemar:
    """Exact McNemar test of two classifiers on the same images: under the null that both are
    equally accurate, each discordant image is right for either one with probability 1/2, so the
    count of one kind is binomial(discordant, 1/2); two-sided binomial p-value (1 without
    discordant images).

    **Arguments:**

    - `correct_a`, `correct_b`: boolean arrays ``(N,)``, per image whether each model is right.

    **Returns:**

    A `McNemar`.
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact needs the two models on the same images; got {a.shape} and {b.shape}.")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return McNemar(only_a, only_b, float(p))
