"""Stiffness analysis against closed forms, a hand-built trajectory, synthetic statistics, and the
CLI on a smoke run."""

import json
import logging
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from stepjax import errors
from stepjax.analysis import (
    INDICATORS,
    Analysed,
    StageTrace,
    StatsOptions,
    Trace,
    TraceOptions,
    build_report,
    correlation_test,
    heun_error,
    implied_step,
    linearised_field,
    relative_increment,
    representational_ability,
    resolvable_permutations,
    secant_lipschitz,
    seeds,
    spearman,
    spectral_radius,
    trace_model,
    write_report,
)
from stepjax.analysis.__main__ import main as analysis_main
from stepjax.analysis.lottery import cached_scores, lottery_contrasts, lottery_name, placement_configs, run_lottery
from stepjax.analysis.lottery import parse_args as lottery_args
from stepjax.analysis.placement import nsi_placement, nsi_scores, recorded_scores
from stepjax.analysis.report import load_images, load_source
from stepjax.config import apply_overrides, load_experiment
from stepjax.models import Conv, make_model
from stepjax.records import ANALYSIS_RECORD, read_analysis_record, write_analysis_record
from stepjax.train import StopAfterRun, WorkdirLock, claim_dir

FAST = TraceOptions(power_iters=3, batch_size=12)  # the CLI test's settings: compilations are shared


def _similar(eigenblock, rng):
    """A non-normal matrix with the spectrum of `eigenblock`."""
    s = np.eye(len(eigenblock)) + 0.3 * rng.normal(size=eigenblock.shape)
    return s @ eigenblock @ np.linalg.inv(s)


def _linear_field(a):
    """f(y) = A_b y for a batch of matrices, on states (B, n)."""
    a = jnp.asarray(a, jnp.float32)
    return lambda y: jnp.einsum("bij,bj->bi", a, y)


def test_power_iteration_recovers_spectral_radius():
    rng = np.random.default_rng(0)
    real = np.diag([-3.0, 2.0, 1.5, -1.0, 0.5, 0.2, 0.1, 0.0])
    rotation = 2.0 * np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])  # eigenvalues 2 e^{+-0.7i}
    complex_pair = np.zeros((8, 8))
    complex_pair[:2, :2], complex_pair[2:, 2:] = rotation, np.diag([1.2, -1.0, 0.5, 0.3, 0.2, 0.1])
    f = _linear_field(np.stack([_similar(real, rng), _similar(complex_pair, rng)]))
    rho = np.asarray(spectral_radius(f, jnp.ones((2, 8)), num_iters=40))
    np.testing.assert_allclose(rho[0], 3.0, rtol=1e-3)
    np.testing.assert_allclose(rho[1], 2.0, rtol=1e-2)
    with pytest.raises(ValueError, match="at least 2"):
        spectral_radius(f, jnp.ones((2, 8)), num_iters=1)


def test_linearised_field_is_the_jacobian_or_its_transpose():
    rng = np.random.default_rng(2)
    a = jnp.asarray(_similar(np.diag([-3.0, 2.0, 1.0, 0.5, 0.2]), rng), jnp.float32)
    y, v = jnp.asarray(rng.normal(size=(2, 2, 5)), jnp.float32)
    smooth = lambda z: jnp.tanh(z @ a)
    np.testing.assert_allclose(linearised_field(smooth, y)(v), jax.jvp(smooth, (y,), (v,))[1], rtol=1e-5, atol=1e-6)

    @jax.custom_vjp
    def matmul(z):  # a layer with its own reverse-mode rule: forward mode cannot enter it
        return z @ a

    matmul.defvjp(lambda z: (z @ a, None), lambda _, g: (g @ a.T,))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(matmul, (y,), (v,))
    np.testing.assert_allclose(linearised_field(matmul, y)(v), v @ a.T, rtol=1e-5, atol=1e-6)  # J^T v
    for g in (lambda z: z @ a, matmul):  # J and J^T: the same spectral radius
        np.testing.assert_allclose(spectral_radius(linearised_field(g, y[:1]), y[:1], 40), [3.0], rtol=1e-3)


def test_secant_heun_and_implied_step_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 6, 6))
    f = _linear_field(a)
    y = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    f0 = f(y)
    a_f = np.einsum("bij,bj->bi", a, np.asarray(f0))
    a2_y = np.einsum("bij,bj->bi", a, np.einsum("bij,bj->bi", a, np.asarray(y)))
    norm = lambda v: np.linalg.norm(v, axis=-1)
    for eps in (1e-2, 0.1, 1.0):  # exact for every offset (up to float32 rounding): the map is linear
        np.testing.assert_allclose(secant_lipschitz(f, y, f0, eps), norm(a_f) / norm(np.asarray(f0)), rtol=2e-4)
    tol = 1e-2
    for h in (0.3, jnp.asarray([0.1, 0.5, 1.0])[:, None]):
        error = heun_error(f, y, f0, h)
        h_sample = np.broadcast_to(np.asarray(h).reshape(-1), (3,))
        np.testing.assert_allclose(error, h_sample**2 / 2 * norm(a2_y) / norm(np.asarray(y)), rtol=1e-4)
        # h* = h (tol/e)^(1/2) = sqrt(2 tol ||y|| / ||A^2 y||): the classical step does not depend on h
        classical = np.sqrt(2 * tol * norm(np.asarray(y)) / norm(a2_y))
        np.testing.assert_allclose(implied_step(h_sample, error, tol), classical, rtol=1e-4)


def test_relative_increment_by_hand():
    y0 = jnp.asarray([[3.0, 4.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
    y1 = jnp.asarray([[3.0, 4.5], [1.0, 2.0]]).reshape(2, 1, 1, 2)
    np.testing.assert_allclose(relative_increment(y0, y1), [0.5 / 5.0, 2.0], rtol=1e-6)


def _constant_field_resnet(stem, drift, shortcut):
    """A basic-block ResNet whose trajectory is known by hand: every convolution is zero, so (BN
    at its initial running statistics) the stem outputs `stem`, every vector field is the constant
    `drift` (the second BN's bias) and every shortcut projection outputs `shortcut`."""
    model = make_model("resnet20", num_classes=3, depths=(3, 3, 3), widths=(4, 8, 8), stem_width=4)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Conv):
            module.kernel[...] = jnp.zeros_like(module.kernel[...])
    model.stem_norm.bias[...] = jnp.full_like(model.stem_norm.bias[...], stem)
    for stage in model.stages:
        steps = [stage.steps] + ([] if stage.first is None else [stage.first])
        for step in steps:
            step.vector_field.norms[1].bias[...] = jnp.full_like(step.vector_field.norms[1].bias[...], drift)
        if stage.first is not None:
            norm = stage.first.change_of_variables.norm
            norm.bias[...] = jnp.full_like(norm.bias[...], shortcut)
    model.eval()
    return model


def test_nsi_on_constructed_trajectory_and_shapes():
    b, c, p = 1.0, 0.5, 2.0
    model = _constant_field_resnet(b, c, p)
    trace = trace_model(model, np.zeros((5, 8, 8, 3), np.float32), options=FAST)
    # stage 1 keeps its shape (states b, b+c, b+2c); stages 2, 3 start with a projection to p, then p+c, p+2c
    expected = [[c / b, c / (b + c), c / (b + 2 * c)], [c / (p + c), c / (p + 2 * c)], [c / (p + c), c / (p + 2 * c)]]
    assert [s.blocks for s in trace.stages] == [(1, 2, 3), (2, 3), (2, 3)]
    for stage, values, width in zip(trace.stages, expected, (4, 8, 8)):
        np.testing.assert_allclose(stage.indicators["relative_increment"], np.tile(values, (5, 1)), rtol=1e-5)
        # what the gates read: GAP(f) = c in every channel; GAP|f| / (GAP|f| + GAP|y|) with y = c / (a)
        np.testing.assert_allclose(stage.gate_inputs["gap_f"], c, rtol=1e-5)
        np.testing.assert_allclose(stage.gate_inputs["gap_relative"], np.tile([c / (c + c / v) for v in values], (5, 1)),
                                   rtol=1e-4)
        np.testing.assert_allclose(stage.indicators["spectral_radius"], 0.0, atol=1e-6)  # f is constant
        assert stage.step_size.shape == (5, len(values), width)
        assert set(stage.indicators) == set(INDICATORS)
        assert all(v.shape == (5, len(values)) for v in stage.indicators.values())


@pytest.mark.parametrize("preset, controller, widths", [
    ("resnet164", "se", (2, 4, 4)),  # the smoke architecture, as in the CLI test
    ("resnet164", "dia", (2, 4, 4)),  # a cell shared by a stage, state carried from step to step
    ("resnet20", "stepnet", (4, 8, 8)),  # history in the controller state; a first stage without projection
])
def test_trace_reproduces_the_network_and_the_mean_gate_control(preset, controller, widths):
    model = make_model(preset, num_classes=10, controller=controller, depths=(2, 2, 2), widths=widths, stem_width=4)
    model.eval()
    images = np.random.default_rng(0).normal(size=(20, 8, 8, 3)).astype(np.float32)
    trace = trace_model(model, images, options=FAST)  # 20 images in batches of 12: the last one padded
    logits, outputs = model.solve(jnp.asarray(images))
    np.testing.assert_allclose(trace.logits, logits, rtol=1e-4, atol=1e-5)
    for stage, out in zip(trace.stages, outputs):
        chosen = np.moveaxis(np.asarray(out.step_size), 0, 1)  # (samples, blocks, channels)
        np.testing.assert_allclose(stage.step_size, chosen[:, np.asarray(stage.blocks) - 1], rtol=1e-5)
    gated = trace_model(model, images, options=FAST, gate=trace.gate_mean)
    for stage, original in zip(gated.stages, trace.stages):
        np.testing.assert_allclose(stage.step_size, np.broadcast_to(original.step_size.mean(0), stage.step_size.shape),
                                   rtol=1e-5)
    model.train()
    with pytest.raises(ValueError, match="evaluation mode"):
        trace_model(model, images)


def test_spearman_zero_one_partial_and_ties():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 4000))
    assert abs(spearman(x, y)) < 0.05
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    ties = np.round(x[:200]), np.round(y[:200] + x[:200])
    assert spearman(*ties) == pytest.approx(scipy.stats.spearmanr(*ties).statistic)
    z = rng.normal(size=4000)
    confounded = z + 0.5 * x, z + 0.5 * y  # correlated only through z
    assert spearman(*confounded) > 0.5
    assert abs(spearman(*confounded, controls=z)) < 0.05
    assert np.isnan(spearman(np.ones(10), x[:10]))


def test_permutation_null_has_the_right_size_and_power():
    rng = np.random.default_rng(0)
    alpha, draws = 0.1, 400
    x, y = rng.normal(size=(2, draws, 25))
    null_p = correlation_test(x, y, num_permutations=199, seed=1).p_value
    rate = np.mean(null_p <= alpha)
    assert abs(rate - alpha) < 3.5 * np.sqrt(alpha * (1 - alpha) / draws), rate
    related = correlation_test(x, x + 0.5 * y, num_permutations=199, seed=1).p_value
    assert np.mean(related <= alpha) > 0.95
    z = rng.normal(size=25)
    partial_p = correlation_test(x + z, y + z, z, num_permutations=199, seed=2).p_value
    assert abs(np.mean(partial_p <= alpha) - alpha) < 3.5 * np.sqrt(alpha * (1 - alpha) / draws)


@pytest.mark.parametrize("num_blocks", [7, 54])  # the analysed blocks of ResNet-20 and about those of ResNet-164
def test_freedman_lane_partial_test_has_its_nominal_size(num_blocks):
    # 2,000 null data sets at once (leading axis): block means of the step and of an indicator that both
    # trend with depth (the control) but are unrelated given it; 199 permutations each
    rng = np.random.default_rng(num_blocks)
    sims, alpha = 2000, 0.05
    depth = np.arange(num_blocks, dtype=np.float64)
    trend = 0.5 * (depth - depth.mean()) / depth.std()
    x, y = trend + rng.normal(size=(2, sims, num_blocks))
    p = correlation_test(x, y, depth, num_permutations=199, seed=3).p_value
    assert 0.03 <= np.mean(p <= alpha) <= 0.07, np.mean(p <= alpha)
    if num_blocks == 7:  # the same test with one control set per data set, (sims, n, 1), gives the same p-values
        per_set = correlation_test(x, y, np.broadcast_to(depth[:, None], (sims, num_blocks, 1)),
                                   num_permutations=199, seed=3)
        np.testing.assert_allclose(per_set.p_value, p)
        with pytest.raises(ValueError, match="controls have 2000 samples, the data 7"):
            correlation_test(x, y, np.broadcast_to(depth, (sims, num_blocks)))  # (sims, n): a set per data set needs (sims, n, 1)


def _synthetic_trace(step_size, values, gate_inputs=None):
    """A `Trace` of 3 stages from ``(K, N)`` arrays: the channel-mean step (one channel), one array for
    every indicator, and optionally ``(K, N, p)`` gate inputs (named as `GATE_INPUTS`)."""
    k = step_size.shape[0]
    edges = np.cumsum([0, k // 3, k // 3, k - 2 * (k // 3)])
    stages = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        extra = {}
        if gate_inputs is not None:
            from stepjax.analysis import GATE_INPUTS  # here: the module's other tests run on code without it

            extra["gate_inputs"] = {name: gate_inputs[lo:hi, :, i].T for i, name in enumerate(GATE_INPUTS)}
        stages.append(StageTrace(tuple(range(1, hi - lo + 1)), {name: values[lo:hi].T for name in INDICATORS},
                                 step_size[lo:hi].T[..., None], **extra))
    return Trace(tuple(stages), np.zeros((step_size.shape[1], 10)), ())


def test_across_block_intervals_resample_blocks():
    # 7 blocks whose means differ and relate to the step only loosely; 100 images per block with a small
    # per-image spread, so the block means (and the correlation of their ranks) hardly move when the
    # images are resampled: the uncertainty lies in which blocks there are
    rng = np.random.default_rng(0)
    h_means = rng.normal(size=7)
    value_means = 0.5 * h_means + rng.normal(size=7)
    h = h_means[:, None] + 0.01 * rng.normal(size=(7, 100))
    values = value_means[:, None] + 0.01 * rng.normal(size=(7, 100))
    ability = representational_ability(_synthetic_trace(h, values), StatsOptions(num_permutations=99, num_bootstrap=300))
    across = ability["relative_derivative"]["across_blocks"]
    for rho, ci in ((across["rho"], across["ci"]), (across["partial_rho"], across["partial_ci"])):
        assert ci[0] <= rho <= ci[1]
        assert ci[1] - ci[0] > 0.3, ci  # a correlation of 7 points is uncertain, not a point
    assert across["bootstrap_unit"] == "blocks"


def test_significant_blocks_are_counted_after_holm_adjustment():
    # 12 blocks with the same moderate correlation (rho about 0.33 over 60 images: per-block p about 0.01),
    # the images in a different order in each block so that the shared permutations give each its own p
    rng = np.random.default_rng(4)
    x = rng.normal(size=60)
    y = x + 2.5 * rng.normal(size=60)
    assert 0.30 < spearman(x, y) < 0.36
    order = np.stack([rng.permutation(60) for _ in range(12)])
    ability = representational_ability(_synthetic_trace(x[order], y[order]),
                                       StatsOptions(num_permutations=999, num_bootstrap=10))
    within = ability["relative_derivative"]["within_block"]
    assert max(within["p_value"]) <= 0.05  # each block significant on its own
    assert within["num_significant_positive"] == 0  # none after Holm over the 12: 12 * 0.01 > 0.05
    assert within["num_significant_positive_uncorrected"] == 12 and within["correction"] == "holm"
    from stepjax.analysis.stats import holm

    # Holm by hand: sorted 0.005 * 4, 0.01 * 3, 0.03 * 2, 0.04 * 1 -> 0.02, 0.03, 0.06, max(0.04, 0.06)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([[0.01, np.nan, 0.02], [0.5, 0.9, 0.001]]),
                               [[0.02, np.nan, 0.02], [1.0, 1.0, 0.003]])
    np.testing.assert_allclose(within["p_value_holm"], holm(within["p_value"]))


def test_every_block_of_a_deep_network_can_pass_holm():
    # 51 blocks (ResNet-164) with a strong correlation each: 1000 permutations give p >= 1/1001 and
    # Holm's 51 * 1/1001 > 0.05 would count none; the count raises the permutations until all pass
    rng = np.random.default_rng(5)
    x = rng.normal(size=(51, 200))
    options = StatsOptions(num_permutations=1000, num_bootstrap=10)
    assert resolvable_permutations(51, options) == 2039 and resolvable_permutations(7, options) == 1000
    within = representational_ability(_synthetic_trace(x, x + rng.normal(size=x.shape)), options)[
        "relative_derivative"]["within_block"]
    assert within["num_significant_positive"] == 51 and max(within["p_value_holm"]) <= 51 / 2040


def test_gate_partial_control_removes_a_built_in_correlation():
    # the step and the indicator both follow the statistic the gate reads (s) and nothing else: the
    # within-block correlation is strong and entirely built in
    rng = np.random.default_rng(1)
    s = rng.normal(size=(7, 1000))
    unread = rng.normal(size=(7, 1000))  # what the gate does not read
    gate_inputs = np.stack([s, rng.normal(size=(7, 1000))], axis=-1)  # a second, irrelevant statistic
    h = 1 / (1 + np.exp(s)) + 0.02 * rng.normal(size=s.shape)
    options = StatsOptions(num_permutations=199, num_bootstrap=10)
    built_in = representational_ability(_synthetic_trace(h, np.exp(s) + 0.3 * unread, gate_inputs), options)
    result = built_in["relative_derivative"]
    assert result["within_block"]["mean_rho"] < -0.6
    control = result["within_block_gate_partial"]
    assert abs(control["mean_rho"]) < 0.05 and control["mean_p_value"] > 0.01, control  # its sd: 0.012
    assert control["controls"] == ["gap_f", "gap_relative"]
    # a step that also follows the unread part keeps its correlation under the control
    tracking = 1 / (1 + np.exp(s + unread)) + 0.02 * rng.normal(size=s.shape)
    from stepjax.analysis import gate_partial_correlation  # here: the module's other tests run on code without it

    kept = gate_partial_correlation(tracking, np.exp(s) + 0.3 * unread, gate_inputs, options)
    assert kept["mean_rho"] < -0.3 and kept["mean_p_value"] < 0.01


def test_mean_gate_control_gets_an_exact_mcnemar_test(tmp_path):
    from stepjax.analysis.stats import mcnemar_exact

    # 8 images right only with the model's gate, 1 only with the mean gate, 11 right with both:
    # p = 2 P(Binomial(9, 1/2) <= 1) = 2 * 10 / 512
    model_correct = np.array([True] * 8 + [False] + [True] * 11)
    control_correct = np.array([False] * 8 + [True] + [True] * 11)
    assert mcnemar_exact(model_correct, control_correct) == (8, 1, pytest.approx(20 / 512))
    assert mcnemar_exact(model_correct, model_correct).p_value == 1.0
    rng = np.random.default_rng(0)
    stages = tuple(StageTrace((2, 3), {name: rng.uniform(0.1, 1.0, (20, 2)) for name in INDICATORS},
                              rng.uniform(0.4, 0.6, (20, 2, 4))) for _ in range(3))
    trace = Trace(stages, rng.normal(size=(20, 10)), ())
    models = [Analysed("main", "SE", "synthetic", 10, trace, 0.95, model_correct),
              Analysed("mean_gate", "SE [control: gate = dataset mean]", "synthetic", 10, trace, 0.6, control_correct)]
    report = build_report(models, stats=StatsOptions(num_permutations=10, num_bootstrap=5), num_curves=3)
    test = report["models"]["mean_gate"]["paired_test"]
    assert test["test"] == "exact McNemar" and test["p_value"] == pytest.approx(20 / 512)
    assert (test["model_only_correct"], test["control_only_correct"], test["num_samples"]) == (8, 1, 20)
    write_report(report, tmp_path / "record", tmp_path)
    text = (tmp_path / "correlations.md").read_text()
    assert "8 images right only with the model's own gate, 1 only with the mean gate; exact McNemar " \
           "(two-sided) p = 0.0391." in text
    assert read_analysis_record(tmp_path / "record")["models"]["mean_gate"]["paired_test"]["p_value"] == 0.03906


def test_report_of_a_model_with_constant_steps(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stepjax")
    rng = np.random.default_rng(0)
    stages = tuple(StageTrace((2, 3), {name: rng.uniform(0.1, 1.0, (8, 2)) for name in INDICATORS}, np.ones((8, 2, 4)))
                   for _ in range(3))
    plain = Analysed("main", "plain (h = 1)", "synthetic", 10, Trace(stages, rng.normal(size=(8, 10)), ()), 0.5)
    report = build_report([plain], stats=StatsOptions(num_permutations=10, num_bootstrap=5), num_curves=3)
    assert report["figures"]["correlations"]["rows"] == []  # nothing varies: every correlation undefined
    assert report["models"]["main"]["step_size"][0]["cv_samples"] == [0.0, 0.0]
    paths = write_report(report, tmp_path / "record", tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)
    assert (tmp_path / "record" / ANALYSIS_RECORD).exists()
    assert "no model with varying step sizes" in (tmp_path / "correlations.md").read_text()
    progress = [r.getMessage() for r in caplog.records]  # the long phases at depth say where they are
    assert progress[0] == f"statistics of main: {len(INDICATORS)} indicators x 6 blocks, 10 permutations and 5 bootstrap draws each"
    assert progress[1].startswith("statistics of main done (")
    assert progress[2] == f"drawing {len(report['figures'])} figures into {tmp_path}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from stepjax.train import train

    workdir = tmp_path_factory.mktemp("analysis") / "run"
    config = apply_overrides(load_experiment("cifar10_se:smoke"),
                             ["train.progress=False", "train.total_steps=2"])
    train(config, workdir)
    return workdir


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert analysis_main(["--workdir", str(tmp_path / "nowhere")]) == errors.REFUSED
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stepjax: {tmp_path / 'nowhere'} is not a directory. Pass a run directory (train one with "
        "`make train EXP=...`) or init:EXP for a freshly initialised model."]
    (tmp_path / "empty").mkdir()
    assert analysis_main(["--workdir", str(tmp_path / "empty")]) == errors.REFUSED
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stepjax: {tmp_path / 'empty'} has no config.json: not a stepjax run directory; check the path."]
    with pytest.raises(SystemExit):
        lottery_args(["--exp", "cifar10_se:smoke", "--nsi-workdir", "x", "--num-random", "-2"])
    assert "'-2' is not a count" in capsys.readouterr().err


def test_cli_on_a_smoke_run_writes_json_and_figures(smoke_run, tmp_path):
    out = tmp_path / "figures"
    assert analysis_main(["--workdir", str(smoke_run), "--num-samples", "12", "--batch-size", str(FAST.batch_size),
                          "--power-iters", str(FAST.power_iters), "--permutations", "20", "--bootstrap", "10",
                          "--num-curves", "5", "--out", str(out)]) == 0
    assert (out / "correlations.md").exists()
    report = read_analysis_record(Path(os.environ["STEPJAX_RESULTS"]) / "analysis" / "figures")
    assert set(report["models"]) == {"main", "random_init", "mean_gate"}
    assert "OUR RECONSTRUCTION" in report["note"]
    nsi = report["figures"]["nsi_relative_increment"]
    assert [s["blocks"] for s in nsi["stages"]] == [[2], [2], [2]]  # every smoke stage starts with a projection
    assert len(nsi["stages"][0]["models"][0]["samples"]) == 5
    # the mean gate removes every per-sample variation of h: within-block correlations are undefined
    assert report["models"]["mean_gate"]["representational_ability"]["implied_step"]["within_block"]["mean_rho"] is None
    for name in report["figures"]:
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "| model |" in (out / "correlations.md").read_text()
    # the record's NSI is the model's own, on the record's images: a lottery can rank blocks from it
    record = Path(os.environ["STEPJAX_RESULTS"]) / "analysis" / "figures"
    scores, settings = recorded_scores(record)
    config, model, _ = load_source(str(smoke_run))
    images = load_images(config, settings["num_samples"], split=settings["split"])[0]
    np.testing.assert_allclose(scores, nsi_scores(model, images, options=FAST), atol=5e-5)  # kept to 4 decimals
    ranking, key = cached_scores(str(record), [tmp_path / "lottery"], indicator="relative_increment", num_samples=500)
    assert key["split"] == "test" and key["num_samples"] == 12 and np.array_equal(ranking, scores, equal_nan=True)
    with pytest.raises(ValueError, match="no figure of indicator 'nope'"):
        recorded_scores(record, indicator="nope")


def test_sigusr1_stops_the_lottery_after_the_run_in_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    scores = [np.nan, 0.5, np.nan, 0.9, np.nan, 0.1]
    configs = placement_configs(load_experiment("cifar10_se:smoke"), ratio=0.34, num_random=1, scores=scores)
    calls = []

    def fake_train(cfg, workdir):  # the signal arrives while the second run trains; that run finishes
        calls.append(workdir.name)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        summary = {"status": "done", "best_accuracy": 0.5, "last_accuracy": 0.5}
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(cfg.to_json())
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    with StopAfterRun() as after:
        results = run_lottery(configs, tmp_path, train_fn=fake_train, stop_after=after)
    assert after.requested and calls == ["none", "all"]
    assert [r["status"] for r in results.values()] == ["done", "done", "pending", "pending", "pending"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # restored
    assert len(run_lottery(configs, tmp_path, train_fn=fake_train)) == 5 and calls[2:] == list(configs)[2:]


def test_two_lottery_processes_share_its_runs_and_a_seed_names_its_own_lottery(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    scores = [np.nan, 0.5, np.nan, 0.9, np.nan, 0.1]
    configs = placement_configs(load_experiment("cifar10_se:smoke"), ratio=0.34, num_random=0, scores=scores)
    root, calls = tmp_path / "lottery", []

    def fake_train(cfg, workdir):
        calls.append(workdir.name)
        summary = {"status": "done", "best_accuracy": 0.5, "last_accuracy": 0.5}
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(cfg.to_json())
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    other = WorkdirLock(claim_dir(root / "nsi_top"))  # as a second lottery process holds it while it trains
    other.acquire()
    try:
        results = run_lottery(configs, root, train_fn=fake_train)
    finally:
        other.release()
    assert calls == ["none", "all", "nsi_bottom"] and results["nsi_top"]["status"] == "pending"
    assert run_lottery(configs, root, train_fn=fake_train)["nsi_top"]["status"] == "done" and calls[-1] == "nsi_top"
    # the other process finishes its run while this one trains: this one's results (its record) have it
    root = tmp_path / "lottery_b"
    other = WorkdirLock(claim_dir(root / "nsi_top"))
    other.acquire()

    def train_while_the_other_finishes(cfg, workdir):
        if workdir.name == "nsi_bottom":
            fake_train(cfg, root / "nsi_top")
            other.release()
        return fake_train(cfg, workdir)

    try:
        results = run_lottery(configs, root, train_fn=train_while_the_other_finishes)
    finally:
        other.release()
    assert results["nsi_top"]["status"] == "done" and results["nsi_top"]["best_accuracy"] == 0.5
    assert lottery_name("cifar10_se:deep", 0.4, 0) == "cifar10_se_deep_ratio0.4"
    assert lottery_name("cifar10_se:deep", 0.4, 1) == "cifar10_se_deep_ratio0.4_s1"


def test_nsi_placement_and_lottery_bookkeeping(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPJAX_RESULTS", str(tmp_path / "results"))
    scores = [np.nan, 0.5, np.nan, 0.9, np.nan, 0.1]  # the smoke net: 3 stages of 2 blocks
    assert nsi_placement(scores, 0.34) == [1, 3]
    assert nsi_placement(scores, 0.34, top=False) == [1, 5]
    with pytest.raises(errors.UserError, match="at most 0.50"):  # a command reports it in one line
        nsi_placement(scores, 0.8)
    config = load_experiment("cifar10_se:smoke")
    configs = placement_configs(config, ratio=0.34, num_random=2, scores=scores)
    assert list(configs) == ["none", "all", "nsi_top", "nsi_bottom", "random_0", "random_1"]
    calls = []

    def fake_train(cfg, workdir):
        calls.append(workdir.name)
        summary = {"status": "done", "best_accuracy": 0.5 + 0.01 * len(calls), "last_accuracy": 0.5}
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(cfg.to_json())
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    results = run_lottery(configs, tmp_path, train_fn=fake_train)
    assert calls == list(configs)
    filed = tmp_path / "results"  # outside runs/, a record is filed by its directory's name
    assert all(json.loads((filed / name / "summary.json").read_text())["status"] == "done" for name in configs)
    assert results["nsi_top"]["blocks"] == [1, 3] and results["all"]["ratio"] == 1.0
    assert results["random_0"]["ratio"] == results["nsi_top"]["ratio"] == pytest.approx(2 / 6)
    assert run_lottery(configs, tmp_path, train_fn=fake_train) == results and len(calls) == len(configs)  # resumed
    # a new checkout: the run directories under runs/ are gone, their records are read instead
    root = tmp_path / "runs" / "lottery" / "x"
    first = run_lottery(configs, root, train_fn=fake_train)
    (tmp_path / "runs").rename(tmp_path / "gone")
    calls.clear()
    again = run_lottery(configs, root, train_fn=fake_train)
    assert calls == [] and again["nsi_top"]["workdir"] == str(filed / "lottery" / "x" / "nsi_top")
    assert {n: r["best_accuracy"] for n, r in again.items()} == {n: r["best_accuracy"] for n, r in first.items()}
    with pytest.raises(ValueError, match="has the NSI ranking changed"):  # checked, not taken
        run_lottery(placement_configs(config, ratio=0.34, num_random=2, scores=scores[::-1]), root, train_fn=fake_train)
    calls.clear()
    # best accuracies 51 .. 56 % in training order: none, all, nsi_top, nsi_bottom, random_0, random_1
    contrasts = lottery_contrasts(results)
    assert contrasts["random"] == {"n": 2, "mean": pytest.approx(55.5), "sd": pytest.approx(0.5 ** 0.5, abs=1e-4),
                                   "max": pytest.approx(56.0)}
    assert contrasts["random mean - all"] == pytest.approx(3.5)
    assert contrasts["random placements above all"] == "2 of 2"
    assert contrasts["nsi_top - all"] == pytest.approx(1.0) and contrasts["nsi_top - none"] == pytest.approx(2.0)
    assert contrasts["nsi_top - nsi_bottom"] == pytest.approx(-1.0)
    assert contrasts["nsi_top - random mean"] == pytest.approx(-2.5)
    assert contrasts["random placements below nsi_top"] == "0 of 2"

    def stopped_train(cfg, workdir):  # a SIGTERM during the first run to train
        calls.append(workdir.name)
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(cfg.to_json())
        return {"status": "preempted", "best_accuracy": 0.3, "last_accuracy": 0.3}

    calls.clear()
    results = run_lottery(configs, tmp_path / "stopped", train_fn=stopped_train, reuse=None)
    assert calls == ["none"], "an interrupted run must stop the lottery, not start the next one"
    assert results["none"]["status"] == "preempted" and results["all"]["status"] == "pending"
    assert lottery_contrasts(results) == {"random": {"n": 0, "mean": None, "sd": None, "max": None}}  # nothing finished


def test_lottery_reuses_only_the_same_training(tmp_path):
    configs = placement_configs(load_experiment("cifar10_se:smoke"), ratio=0.34, num_random=1,
                                scores=[np.nan, 0.5, np.nan, 0.9, np.nan, 0.1])

    def finished_run(name, config, status="done"):
        workdir = tmp_path / "study" / name
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(config.to_json())
        (workdir / "summary.json").write_text(json.dumps({"status": status, "best_accuracy": 0.7, "last_accuracy": 0.7}))
        return workdir

    plain = finished_run("plain", load_experiment("cifar10_resnet:smoke"))  # the constant step == SE nowhere
    calls = []

    def fake_train(cfg, workdir):
        calls.append(workdir.name)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json())
        return {"status": "done", "best_accuracy": 0.5, "last_accuracy": 0.5}

    results = run_lottery(configs, tmp_path / "lottery", train_fn=fake_train, reuse={"none": str(plain)})
    assert "none" not in calls and len(calls) == len(configs) - 1
    assert results["none"]["workdir"] == str(plain) and results["none"]["best_accuracy"] == 0.7
    assert results["none"]["blocks"] == []
    other_seed = finished_run("seed1", apply_overrides(load_experiment("cifar10_se:smoke"), ["seed=1"]))
    with pytest.raises(ValueError, match="seed: 1 instead of 0"):
        run_lottery(configs, tmp_path / "lottery", train_fn=fake_train, reuse={"all": str(other_seed)})
    with pytest.raises(ValueError, match="blocks: \\[\\] instead of"):  # plain is not SE everywhere
        run_lottery(configs, tmp_path / "lottery", train_fn=fake_train, reuse={"all": str(plain)})
    running = finished_run("running", load_experiment("cifar10_se:smoke"), status="preempted")
    with pytest.raises(ValueError, match="not a finished run"):
        run_lottery(configs, tmp_path / "lottery", train_fn=fake_train, reuse={"all": str(running)})
    with pytest.raises(ValueError, match="does not train"):
        run_lottery(configs, tmp_path / "lottery", train_fn=fake_train, reuse={"top": str(plain)})


def _fake_model(label, source, accuracy, rho, step=100):
    ability = {k: {"within_block": {"mean_rho": rho}} for k in ("relative_derivative", "spectral_radius", "implied_step")}
    nsi = [{"mean": 0.1 * (s + 1), "peak": 0.2 * (s + 1)} for s in range(3)]
    return {"label": f"{label}, resnet20, trained {step} steps" if step else f"{label}, resnet20, random init",
            "source": source, "step": step, "accuracy": accuracy, "num_samples": 10,
            "step_size": [{"mean": [0.5, 0.7]}] * 3, "nsi_summary": {"relative_increment": nsi},
            "representational_ability": ability}


def test_seed_table_counts_each_run_once_with_its_mean_gate_control(tmp_path):
    reports = []
    for seed, (acc, rho) in enumerate([(0.80, -0.2), (0.84, -0.4)]):
        main_model = _fake_model("SE", f"runs/se_s{seed}", acc, rho)
        reports.append({"models": {
            "main": main_model, "random_init": _fake_model("SE", f"runs/se_s{seed}", 0.1, 0.0, step=0),
            "mean_gate": {**main_model, "accuracy": acc - 0.01},
            "compare": _fake_model("plain (h = 1)", f"runs/plain_s{seed}", 0.82, None)}})
    # StepNet analysed against SE seed 0 again: that SE run must keep its mean-gate figure
    reports.append({"models": {"main": _fake_model("StepNet", "runs/stepnet_s0", 0.85, -0.3),
                               "compare": _fake_model("SE", "runs/se_s0", 0.80, -0.2)}})
    for i, report in enumerate(reports):
        write_analysis_record(tmp_path / str(i), report)
    table = seeds.rows(reports)
    assert sorted(r["source"] for r in table) == ["runs/plain_s0", "runs/plain_s1", "runs/se_s0", "runs/se_s1",
                                                  "runs/stepnet_s0"]
    se0 = next(r for r in table if r["source"] == "runs/se_s0")
    np.testing.assert_allclose(se0["mean-gate change (points)"], -1.0)
    assert seeds.main([str(tmp_path / str(i)) for i in range(3)] + ["--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| `se_s0` | `se_s1` | `stepnet_s0` | `plain_s0` | `plain_s1` |" in text
    assert "| accuracy % on them | 80.00 | 84.00 | 85.00 | 82.00 | 82.00 |" in text
    assert "| figure | SE, resnet20 (n=2) | StepNet, resnet20 (n=1) | plain (h = 1), resnet20 (n=2) |" in text
    assert "| within-block rho, relative derivative | -0.300 ± 0.141 | -0.300 |  |" in text  # sd of -0.2, -0.4
    assert "| mean-gate change (points) | -1.00 ± 0.00 |  |  |" in text
    with pytest.raises(SystemExit, match="No analysis.json.gz"):
        seeds.main([str(tmp_path / "missing")])


def test_model_labels_name_every_deep_controller_in_words():
    from stepjax.analysis.report import model_label
    from stepjax.config import load_experiment

    labels = {c: model_label(load_experiment(f"cifar10_{c}:deep"), 100) for c in ("resnet", "se", "stepnet", "channel_step")}
    assert labels["channel_step"].startswith("trained constant step per channel (control), resnet164")
    assert labels["stepnet"].startswith("StepNet (our reconstruction)")
    assert labels["resnet"].startswith("plain (h = 1)") and labels["se"].startswith("SE,")
    assert model_label(load_experiment("cifar10_se:deep"), 0).endswith("random init")
    seed2 = apply_overrides(load_experiment("cifar10_channel_step:deep"), ["seed=2"])
    assert model_label(seed2, 6248).endswith(", trained 6248 steps, seed 2")  # two seeds of one model differ
