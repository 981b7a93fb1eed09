"""Presets: published parameter counts, shapes, placement, and any controller on any preset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepjax.models import FAST_COMPILE, PRESETS, RandomPlacement, get_spec, make_model, resolve_placement
from stepjax.models.__main__ import PUBLISHED, param_count
from stepjax.ode import EulerStep

TINY = dict(depths=(2, 3, 2), widths=(2, 4, 4), stem_width=4)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_parameter_counts_match_published(key):
    preset, classes, controller = key
    count = param_count(preset, classes, controller) / 1e6
    assert abs(count - PUBLISHED[key]) / PUBLISHED[key] < 0.01, (key, count)


def forward(model, x=X):
    """Logits and step outputs, compiled without XLA's backend optimisations: the tests compare
    these programs with each other within tolerances, and compiling is most of their time."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s, copy=True).solve(x), compiler_options=FAST_COMPILE)(state, x)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs(preset):
    overrides = dict(widths=(2, 2, 2, 2), depths=(2, 2, 2, 2), stem_width=4) if preset == "resnet50" else TINY
    model = make_model(preset, num_classes=7, controller="se", **overrides)
    logits, outputs = forward(model, jnp.zeros((2, 16, 16, 3)) if preset == "resnet50" else X)
    assert logits.shape == (2, 7)
    assert [o.step_size.shape[0] for o in outputs] == list(overrides["depths"])


def test_full_depth_resnet164_forward():
    logits, outputs = forward(make_model("resnet164", num_classes=10, controller="stepnet"))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert [o.step_size.shape for o in outputs] == [(18, 2, 64), (18, 2, 128), (18, 2, 256)]


def test_a_model_built_again_is_the_same_model_in_its_own_arrays():
    # the second build reuses the first one's compiled initialisation (`make_model`)
    first, again = (nnx.state(make_model("resnet164", num_classes=5, controller="se", seed=3, **TINY)) for _ in range(2))
    other_seed = nnx.state(make_model("resnet164", num_classes=5, controller="se", seed=4, **TINY))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, c) for a, c in zip(jax.tree.leaves(first), jax.tree.leaves(other_seed)))
    for a in jax.tree.leaves(first):
        a.delete()  # as a donating training step does: the other build must not lose its arrays
    assert all(np.isfinite(np.asarray(b)).all() for b in jax.tree.leaves(again))


@pytest.fixture(scope="module")
def plain_logits():
    return forward(make_model("resnet164", num_classes=5, controller="constant", seed=3, **TINY))[0]


@pytest.mark.parametrize("controller", ["cbam", "dia"])
def test_zero_placement_is_the_plain_network(controller, plain_logits):
    masked = make_model("resnet164", num_classes=5, controller=controller, placement="none", seed=3, **TINY)
    on = make_model("resnet164", num_classes=5, controller=controller, placement="all", seed=3, **TINY)
    np.testing.assert_allclose(forward(masked)[0], plain_logits, rtol=1e-6, atol=1e-6)
    assert not np.allclose(forward(on)[0], plain_logits)


def test_scan_and_loop_models_agree_and_train_mode_updates_stats():
    a = make_model("resnet164", num_classes=5, controller="dia", scan=True, **TINY)
    b = make_model("resnet164", num_classes=5, controller="dia", scan=False, **TINY)
    np.testing.assert_allclose(forward(a)[0], forward(b)[0], rtol=1e-5, atol=1e-5)
    before = jax.tree.map(np.array, nnx.state(a, nnx.BatchStat))
    a(X)  # eager call in train mode updates running statistics, including the scanned blocks'
    after = nnx.state(a, nnx.BatchStat)
    changed = jax.tree.map(lambda u, v: not np.allclose(u, v), before, after)
    assert all(jax.tree.leaves(changed))


def test_dia_cell_is_shared_within_a_stage():
    model = make_model("resnet164", num_classes=5, controller="dia", **TINY)
    stage = model.stages[0]
    assert stage.first.controller.shared is stage.steps.controller.shared
    assert stage.steps.controller.shared.input_path.reduce.kernel.shape == (8, 2)


def test_resolve_placement():
    assert resolve_placement("all", (2, 1)) == ((True, True), (True,))
    assert resolve_placement("none", (2, 1)) == ((False, False), (False,))
    assert resolve_placement([0, 2], (2, 1)) == ((True, False), (True,))
    masks = resolve_placement(RandomPlacement(0.4, 1), (18, 18, 18))
    assert sum(map(sum, masks)) == round(0.4 * 54)
    assert masks == resolve_placement(RandomPlacement(0.4, 1), (18, 18, 18))
    assert masks != resolve_placement(RandomPlacement(0.4, 2), (18, 18, 18))
    # the draws of the recorded ResNet-20 lottery (results/lottery/cifar10_se_cpu_ratio0.4: random_0, random_1)
    for seed, blocks in ((0, [2, 4, 5, 7]), (1, [2, 3, 6, 8])):
        assert np.flatnonzero(np.concatenate(resolve_placement(RandomPlacement(0.4, seed), (3, 3, 3)))).tolist() == blocks


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="Unknown model preset 'resnet7'.*resnet164"):
        get_spec("resnet7")
    with pytest.raises(ValueError, match="out of range"):
        resolve_placement([60], (18, 18, 18))
    with pytest.raises(ValueError, match="Unknown placement"):
        resolve_placement("most", (2, 2))
    with pytest.raises(ValueError, match="Bad override"):
        get_spec("resnet20", colour="red")


def test_bfloat16_compute_keeps_float32_parameters():
    model = make_model("resnet164", num_classes=5, controller="stepnet", dtype=jnp.bfloat16, **TINY)
    logits, outputs = forward(model)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_saved_states_enter_the_shape_preserving_steps():
    model = make_model("resnet164", num_classes=5, controller="se", **TINY)
    model.eval()
    _, outputs = model.solve(X, save_states=True)
    assert [o.states.shape for o in outputs] == [(1, 2, 8, 8, 8), (2, 2, 4, 4, 16), (1, 2, 2, 2, 16)]


def test_one_seed_gives_every_controller_the_same_backbone():
    # what lets the results pair runs of different controllers by seed
    def backbone(controller, seed=3):
        params = nnx.state(make_model("resnet20", num_classes=10, controller=controller, seed=seed), nnx.Param)
        flat = nnx.to_flat_state(params)
        return {path: v.get_value() for path, v in flat if "controller" not in path}

    plain = backbone("constant")
    assert len(plain) > 20
    for controller in ("se", "stepnet", "cbam"):
        other = backbone(controller)
        assert other.keys() == plain.keys()
        assert all(np.array_equal(other[k], plain[k]) for k in plain), controller
    assert not np.array_equal(backbone("constant", seed=4)[next(iter(plain))], next(iter(plain.values())))


def test_zero_init_residual_starts_every_step_at_the_identity():
    # every vector field is exactly zero at initialisation, so no controller changes the output
    def logits(controller, zero_init=True):
        model = make_model("resnet164", num_classes=5, controller=controller, seed=3, zero_init_residual=zero_init, **TINY)
        return forward(model)[0]

    plain = logits("constant")
    for controller in ("se", "stepnet"):
        np.testing.assert_allclose(logits(controller), plain, rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits("se", zero_init=False), logits("constant", zero_init=False))
    # post-activation fields zero their last BatchNorm's scale, pre-activation ones their last convolution
    for preset, last in (("resnet164", lambda f: f.norms[-1].scale), ("preact_resnet164", lambda f: f.convs[-1].kernel)):
        field = make_model(preset, num_classes=5, seed=3, zero_init_residual=True, **TINY).stages[0].steps.vector_field
        assert not np.any(np.asarray(last(field).get_value()))
        assert np.all(np.asarray(field.norms[0].scale.get_value()) == 1.0)


def _unfolded(monkeypatch):
    """Every step taken through ``f0`` (`EulerStep.propose` then `advance`), as the analysis takes it."""
    monkeypatch.setattr(EulerStep, "folds_field", property(lambda self: False))


def _mixing_every_feature(model):
    """StepNet starts from ``GAP(f)`` alone, where its other features' gradients are 0: give each
    feature a weight (the same for every call)."""
    def mixed(path, value):
        if "feature_mix" not in jax.tree_util.keystr(path):
            return value
        return 0.5 * jax.random.normal(jax.random.key(value.size), value.shape, value.dtype)
    nnx.update(model, jax.tree_util.tree_map_with_path(mixed, nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("preset, controller", [("resnet164", "se"), ("resnet20", "eca"), ("resnet164", "dia"),
                                                ("resnet20", "channel_step"), ("resnet164", "stepnet")])
def test_a_channel_gate_folded_into_the_step_is_the_step_through_f0(preset, controller, monkeypatch):
    """The oracle is the step through ``f0``: the same logits, step sizes, BatchNorm statistics and
    gradients (float32 rounding) in training, the same logits in evaluation, on both fields. A
    post-activation step folds with its state known non-negative (`EulerStep.nonnegative_state`),
    the step through ``f0`` does not: StepNet's gradient into the state is checked that way too."""
    x = 2.0 * jax.random.normal(jax.random.key(5), (4, 8, 8, 3)) + 0.5
    labels = jnp.arange(4) % 5

    def train_and_eval():
        model = make_model(preset, num_classes=5, controller=controller, seed=2, **TINY)
        _mixing_every_feature(model)

        def loss(model):
            logits, outputs = model.solve(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, outputs)

        (value, (logits, outputs)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        stats = nnx.state(model, nnx.BatchStat)
        model.eval()
        return [value, logits, [o.step_size for o in outputs], stats, nnx.state(grads, nnx.Param), forward(model)[0]]

    assert all(step.folds_field for stage in make_model(preset, num_classes=5, controller=controller, **TINY).stages
               for step in (stage.first, stage.steps) if step is not None)
    folded = train_and_eval()
    _unfolded(monkeypatch)
    through_f0 = train_and_eval()
    for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(through_f0), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * max(float(jnp.max(jnp.abs(b))), 1.0))
    assert not np.allclose(folded[-1], forward(make_model(preset, num_classes=5, controller="constant", seed=2, **TINY))[0])


@pytest.mark.parametrize("preset, controller", [("preact_resnet164", "se"), ("resnet164", "srm"),
                                                ("resnet164", "constant")])
def test_a_step_folds_its_field_only_for_a_channel_gate_on_a_field_that_ends_in_batch_norm(preset, controller):
    model = make_model(preset, num_classes=5, controller=controller, **TINY)
    assert not any(stage.steps.folds_field for stage in model.stages)
