"""The numerical core against oracles: a hand-written residual loop, diffrax, finite differences."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepjax.layers import Dense
from stepjax.ode import (
    ConstantStepSize,
    DiffraxErrorController,
    DiffraxStepController,
    ErrorStepController,
    EulerStage,
    EulerStep,
    LearnedStepSize,
    StepController,
    StepSchedule,
)

WIDTH = 5


class TanhField(nnx.Module):
    """f(y) = tanh(y W + b), a vector field with parameters."""

    def __init__(self, rngs):
        self.linear = Dense(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, y):
        return jnp.tanh(self.linear(y))


def make_stage(controller_fn, num_steps=4, scan=True, transition=False, seed=0, projection=None):
    def make_step(first, rngs):
        cov = Dense(WIDTH, WIDTH, rngs=rngs, use_bias=False) if first else None
        return EulerStep(TanhField(rngs), controller_fn(), change_of_variables=cov, projection=projection)

    return EulerStage(make_step, num_steps, transition=transition, rngs=nnx.Rngs(seed), scan=scan)


def field_params(stage, k):
    """Kernel and bias of step k of a stage without transition."""
    lin = stage.steps.vector_field.linear
    return lin.kernel[...][k], lin.bias[...][k]


Y0 = jax.random.normal(jax.random.key(1), (3, WIDTH))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("projection", [None, jax.nn.relu])
def test_constant_step_is_bitwise_the_residual_loop(projection, scan):
    """h = 1 is the residual network, to the bit, against the residual loop written the same way:
    as a Python loop, or as a `lax.scan` over the blocks for the scanned stage (XLA may compile a
    dot inside a loop body differently from an unrolled one: on an AMD EPYC the scanned stage
    and the Python loop differ in the last bit, on an Intel Xeon they did not)."""
    stage = make_stage(lambda: ConstantStepSize(1.0), projection=projection, scan=scan)
    kernels, biases = (jnp.stack(a) for a in zip(*(field_params(stage, k) for k in range(4))))

    def block(y, wb):
        y = y + jnp.tanh(y @ wb[0] + wb[1])
        return (y if projection is None else projection(y)), None

    if scan:
        y = jax.jit(lambda y: jax.lax.scan(block, y, (kernels, biases))[0])(Y0)
    else:
        y = Y0
        for wb in zip(kernels, biases):
            y = block(y, wb)[0]
    graphdef, state = nnx.split(stage)
    out = jax.jit(lambda s, y: nnx.merge(graphdef, s)(y))(state, Y0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y))


def test_transition_step_uses_change_of_variables():
    stage = make_stage(lambda: ConstantStepSize(0.5), transition=True, num_steps=3)
    p = stage.first.change_of_variables.kernel[...]
    lin = stage.first.vector_field.linear
    y = Y0 @ p + 0.5 * jnp.tanh(Y0 @ lin.kernel[...] + lin.bias[...])
    for k in range(2):
        w, b = field_params(stage, k)
        y = y + 0.5 * jnp.tanh(y @ w + b)
    np.testing.assert_allclose(stage(Y0), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("controller_fn", [lambda: ConstantStepSize(0.7), lambda: StepSchedule([0.1, 0.2, 0.3, 0.4, 0.5]),
                                           lambda: LearnedStepSize(0.9)])
def test_scan_and_loop_agree(controller_fn):
    a = make_stage(controller_fn, num_steps=5, scan=True, transition=True)
    b = make_stage(controller_fn, num_steps=5, scan=False, transition=True)
    np.testing.assert_allclose(a(Y0), b(Y0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transition", [False, True])
def test_stage_taken_one_step_at_a_time_is_its_solve(transition):
    stage = make_stage(lambda: StepSchedule([0.1, 0.2, 0.3, 0.4]), transition=transition)
    y, state = Y0, None
    for k in range(stage.num_steps):  # the pieces the stiffness analysis drives
        step = stage.step(k)
        proposal = step.propose(y, state, jnp.asarray(k), stage.placement[k])
        np.testing.assert_allclose(proposal.h, 0.1 * (k + 1), rtol=1e-6)
        y, state = step.advance(proposal.base, proposal.h, proposal.f0), proposal.controller_state
    np.testing.assert_allclose(y, stage.solve(Y0)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="step 4 of a stage of 4"):
        stage.step(4)


def test_step_schedule_indexes_by_step():
    schedule = [0.1, 0.2, 0.3, 0.4]
    stage = make_stage(lambda: StepSchedule(schedule))
    _, out = stage.solve(Y0)
    np.testing.assert_allclose(out.step_size[:, 0, 0], schedule, rtol=1e-6)


def test_matches_diffrax_euler_with_shared_weights():
    h, num_steps = 0.25, 6
    stage = make_stage(lambda: ConstantStepSize(h), num_steps=num_steps)
    # share weights: every step gets step 0's field
    lin = stage.steps.vector_field.linear
    w, b = lin.kernel[...][0], lin.bias[...][0]
    lin.kernel[...] = jnp.broadcast_to(w, lin.kernel[...].shape)
    lin.bias[...] = jnp.broadcast_to(b, lin.bias[...].shape)
    term = diffrax.ODETerm(lambda t, y, args: jnp.tanh(y @ w + b))
    sol = diffrax.diffeqsolve(term, diffrax.Euler(), 0.0, h * num_steps, h, Y0,
                              stepsize_controller=diffrax.ConstantStepSize())
    np.testing.assert_allclose(stage(Y0), sol.ys[-1], rtol=1e-6, atol=1e-6)


def _solve_with(controller, y0, t1=1.0):
    term = diffrax.ODETerm(lambda t, y, args: -2.0 * y + jnp.sin(3.0 * t))
    return diffrax.diffeqsolve(
        term, diffrax.Euler(), 0.0, t1, None, y0, stepsize_controller=DiffraxStepController.from_module(controller),
        max_steps=256,
    ).ys[-1]


def test_diffrax_bridge_takes_the_learned_step():
    y1 = _solve_with(LearnedStepSize(0.25), jnp.ones(2))
    y = jnp.ones(2)
    for k in range(4):
        y = y + 0.25 * (-2.0 * y + jnp.sin(3.0 * 0.25 * k))
    np.testing.assert_allclose(y1, y, rtol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_diffrax_bridge_gradient_matches_finite_difference(per_sample):
    jax.config.update("jax_enable_x64", True)
    try:
        y0 = jnp.array([1.0, -0.5], dtype=jnp.float64)

        def loss(theta):
            controller = LearnedStepSize(theta, per_sample=per_sample)
            return jnp.sum(_solve_with(controller, y0, t1=1.1) ** 2)

        theta = jnp.asarray(0.3, jnp.float64)
        grad = jax.grad(loss)(theta)
        eps = 1e-6
        fd = (loss(theta + eps) - loss(theta - eps)) / (2 * eps)
        assert abs(float(grad)) > 1e-3
        np.testing.assert_allclose(grad, fd, rtol=1e-5)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_diffrax_bridge_rejects_multi_element_steps():
    class Wide(StepController):
        def adapt_step_size(self, t0, y0, f0, state):
            return jnp.full(y0.shape, 0.1), state

    with pytest.raises(ValueError, match="one step size per solve"):
        _solve_with(Wide(), jnp.ones(2))


class IController(ErrorStepController):
    """diffrax's default `PIDController` (an I controller) written on the protocol; with
    `counting`, it also reads the vector field and counts the attempts it judged."""

    def __init__(self, rtol, atol, *, counting=False):
        super().__init__(rtol, atol)
        self.uses_vector_field = counting

    def init(self, y0):
        return (jnp.zeros(()), jnp.array(True), jnp.zeros((), jnp.int32))

    def judge_step(self, attempt, controller_state):
        _, _, count = controller_state
        inv_error = 1 / self.scaled_norm(attempt, attempt.y_error)
        keep_step = inv_error > 1
        factor = jnp.clip(0.9 * inv_error ** (1 / attempt.error_order), jnp.where(keep_step, 1, 0.2), jnp.where(keep_step, 10, 0.9))
        if self.uses_vector_field:  # f0, f1 are the field at the attempt's ends
            count = count + (jnp.all(attempt.f0 == -attempt.y0) & jnp.all(attempt.f1 == -attempt.y1_candidate))
        return keep_step, ((attempt.t1 - attempt.t0) * factor, keep_step, count)

    def adapt_step_size(self, t0, y0, f0, controller_state):
        assert (f0 is not None) == self.uses_vector_field
        return controller_state[0], controller_state


def _adaptive_solve(controller, vector_field, y0):
    return diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, 20.0, 0.05, y0, stepsize_controller=controller, saveat=diffrax.SaveAt(steps=True), max_steps=2048)


def test_diffrax_bridge_runs_an_error_controller_as_diffrax_does():
    jax.config.update("jax_enable_x64", True)
    try:
        field = lambda t, y, args: jnp.stack([y[1], 8.0 * (1 - y[0] ** 2) * y[1] - y[0]])  # van der Pol
        y0 = jnp.array([2.0, 0.0])
        ours = _adaptive_solve(DiffraxStepController.from_module(IController(1e-6, 1e-6)), field, y0)
        ref = _adaptive_solve(diffrax.PIDController(rtol=1e-6, atol=1e-6), field, y0)
        assert ref.stats["num_rejected_steps"] > 5  # rejections are exercised
        for key in ("num_accepted_steps", "num_rejected_steps"):
            assert ours.stats[key] == ref.stats[key]
        np.testing.assert_array_equal(ours.ts, ref.ts)  # every accepted step, bitwise
        np.testing.assert_array_equal(ours.ys, ref.ys)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_diffrax_bridge_hands_the_vector_field_to_a_controller_that_reads_it():
    field = lambda t, y, args: -y
    bridge = DiffraxStepController.from_module(IController(1e-4, 1e-4, counting=True))
    assert isinstance(bridge, DiffraxErrorController) and bridge.extra_evaluations(7) == 8

    def solve(controller, dt0=0.05):
        saveat = diffrax.SaveAt(t1=True, controller_state=True)
        return diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, 3.0, dt0, jnp.ones(2), stepsize_controller=controller, saveat=saveat)

    with pytest.raises(ValueError, match="bind"):
        solve(bridge)
    with pytest.raises(ValueError, match="dt0"):
        solve(bridge.bind(field), dt0=None)
    sol = solve(bridge.bind(field))
    (_, _, count), f = sol.controller_state
    assert sol.stats["num_steps"] > 3 and count == sol.stats["num_steps"]  # every attempt saw f at both ends
    np.testing.assert_array_equal(f, -sol.ys[-1])  # the carried f is the field at the point reached


def test_bad_stage_arguments():
    with pytest.raises(ValueError, match="placement has 2 entries"):
        EulerStage(lambda first, r: None, 3, transition=False, rngs=nnx.Rngs(0), placement=[True, False])
    with pytest.raises(ValueError, match="at least 2 steps"):
        EulerStage(lambda first, r: None, 1, transition=True, rngs=nnx.Rngs(0))
