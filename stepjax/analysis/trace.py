"""Walk a `ResNet` block by block and record the step sizes and stiffness indicators of each block.

A block is the explicit Euler step ``x_{k+1} = g(P(x_k) + h_k * f_k(x_k))`` (``g`` = ReLU for
post-activation networks, ``P`` the shortcut projection of a stage's shape-changing first block,
identity otherwise). The indicators need ``f_k`` to map a space to itself, so they are computed
for every block with identity ``P``: blocks 2..K of a stage that changes shape (the paper's 17
points per stage of ResNet-164), all blocks of one that does not. The step size is recorded for
the same blocks; the dataset-mean gate for all of them.

The walk is the model's own forward pass taken apart at its public seams: `ResNet.stem`, then per
stage `EulerStage.step(k)` as `EulerStep.propose` and `EulerStep.advance` (where a fixed gate may
replace ``h``), then `ResNet.classify`; it computes nothing of the network itself, so it measures
the network that was trained.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepjax.analysis import indicators as ind
from stepjax.controllers import step_features

_log = logging.getLogger("stepjax")


@dataclasses.dataclass(frozen=True)
class Indicator:
    """How an indicator is reported: its `label`, and whether it is a function of the step taken
    (`uses_step`: its correlation with ``h`` is then partly mechanical)."""

    label: str
    uses_step: bool


INDICATORS = {
    "relative_increment": Indicator("(a) relative increment ||x_{k+1}-x_k||/||x_k||", True),
    "relative_derivative": Indicator("(a') relative derivative ||f(x_k)||/||x_k|| (h = 1)", False),
    "secant_lipschitz": Indicator("(b) secant Lipschitz L", False),
    "secant_step": Indicator("(b) h * L", True),
    "spectral_radius": Indicator("(c) spectral radius rho(df/dx)", False),
    "stability_number": Indicator("(c) stability number h * rho", True),
    "heun_error": Indicator("(d) Euler-vs-Heun local error e", True),
    "implied_step": Indicator("(d) classical step h* = h (tol/e)^1/2", False),
}
DEFAULT_NSI = "relative_increment"

# What the gates read, summarised per sample: partialled out of the within-block correlations
# (`stepjax.analysis.metrics.gate_partial_correlation`), which are otherwise partly built in.
GATE_INPUTS = {
    "gap_f": "RMS over channels of GAP(f) (SE's gate is a function of GAP(f))",
    "gap_relative": "mean over channels of GAP|f| / (GAP|f| + GAP|y|) (a feature of StepNet's gate)",
}


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    """Settings of the indicators.

    - `eps`: secant offset relative to ``||x||``.
    - `tol`: tolerance on the relative local error in ``h*``.
    - `power_iters`: power iterations for the spectral radius.
    - `seed`: seed of the power iteration's starting vectors.
    - `batch_size`: samples per forward pass.
    """

    eps: float = 1e-2
    tol: float = 1e-2
    power_iters: int = 20
    seed: int = 0
    batch_size: int = 250


class StageTrace(NamedTuple):
    """What `trace_model` records for one stage (``N`` samples, ``K`` analysed blocks).

    - `blocks`: 1-based numbers within the stage of the analysed blocks.
    - `indicators`: name -> ``(N, K)`` array, for every name in `INDICATORS`.
    - `step_size`: ``(N, K, C)``, ``h`` averaged over all axes but sample and channel.
    - `gate_inputs`: name -> ``(N, K)`` array, for every name in `GATE_INPUTS` (None if not
      recorded).
    """

    blocks: tuple[int, ...]
    indicators: dict
    step_size: np.ndarray
    gate_inputs: dict | None = None


class Trace(NamedTuple):
    """`trace_model`'s result: one `StageTrace` per stage, the `logits` ``(N, classes)``, and the
    `gate_mean`: per stage and block (all blocks), the dataset mean of ``h`` broadcast to the
    shape of one sample's ``f`` (what `trace_model(gate=...)` takes)."""

    stages: tuple[StageTrace, ...]
    logits: np.ndarray
    gate_mean: tuple


def block_indicators(f, y0, f0, h, y1, key, options: TraceOptions) -> dict:
    """All `INDICATORS` of one step ``y1 = g(y0 + h f0)`` of the vector field `f`, per sample.

    **Arguments:**

    - `f`: the vector field; `y0`: the state; `f0`: ``f(y0)``; `h`: the step broadcast to
      `f0`'s shape; `y1`: the state leaving the block.
    - `key`: PRNG key of the power iteration's starting vectors.
    - `options`: a `TraceOptions`.

    **Returns:**

    A dict name -> ``(B,)`` array.
    """
    h_mean = ind.sample_mean(h)
    rho = ind.spectral_radius(ind.linearised_field(f, y0), jax.random.normal(key, y0.shape, y0.dtype),
                              options.power_iters)
    secant = ind.secant_lipschitz(f, y0, f0, options.eps)
    error = ind.heun_error(f, y0, f0, h)
    return {
        "relative_increment": ind.relative_increment(y0, y1),
        "relative_derivative": ind.sample_norm(f0) / jnp.maximum(ind.sample_norm(y0), 1e-30),
        "secant_lipschitz": secant,
        "secant_step": h_mean * secant,
        "spectral_radius": rho,
        "stability_number": h_mean * rho,
        "heun_error": error,
        "implied_step": ind.implied_step(h_mean, error, options.tol),
    }


def gate_input_statistics(y0, f0) -> dict:
    """The `GATE_INPUTS` of one step from the state `y0` and the field `f0` (both ``(B, H, W, C)``):
    a dict name -> ``(B,)`` array."""
    mean_f, _, relative, _ = step_features(y0, f0)
    return {"gap_f": jnp.sqrt(jnp.mean(mean_f**2, axis=-1)), "gap_relative": relative.mean(axis=-1)}


@functools.partial(jax.jit, static_argnums=(0, 6))
def _run_block(graphdef, params, carry, position, gating, valid, options, key):
    """One block, taken as `EulerStep.propose` then `EulerStep.advance`, keeping ``f0`` and the
    full ``h``. `carry` is ``(y0, controller_state)``, `position` ``(t0, active)`` (the block's
    index in its stage and whether its controller is on), `gating` ``(gate, use_gate)``: where
    `use_gate`, the array `gate` replaces the controller's output (the controller still runs and
    carries its state); it is an array either way, so that both cases share one compilation.
    `valid` ``(B,)`` marks the samples that are not batch padding."""
    (y0, controller_state), (gate, use_gate) = carry, gating
    step = nnx.merge(graphdef, params)
    proposal = step.propose(y0, controller_state, *position)
    f0 = proposal.f0
    h = jnp.where(use_gate, gate, jnp.broadcast_to(proposal.h, f0.shape))
    y1 = step.advance(proposal.base, h, f0)
    h32 = h.astype(jnp.float32)
    record = {"gate_sum": jnp.einsum("b...,b->...", h32, valid)}
    if step.change_of_variables is None:
        record["step_size"] = h32.mean(axis=tuple(range(1, h.ndim - 1)))
        record.update(block_indicators(step.vector_field, y0, f0, h, y1, key, options))
        record.update(gate_input_statistics(y0, f0))
    return y1, proposal.controller_state, record


@nnx.jit
def _stem(model, x):
    return model.stem(x)


@nnx.jit
def _classify(model, y):
    return model.classify(y)


def _gate_shapes(model, blocks, x):
    """Per stage and block, the shape ``(1, ...)`` of one sample's ``f`` (a gate's shape)."""
    y = jax.eval_shape(_stem, model, x)
    shapes = []
    for stage_steps in blocks:
        shapes.append([])
        for graphdef, params in stage_steps:
            y = jax.eval_shape(lambda p, y, g=graphdef: nnx.merge(g, p).vector_field(y), params, y)
            shapes[-1].append((1, *y.shape[1:]))
    return shapes


def _trace_batch(model, x, valid, blocks, gates, options):
    y = _stem(model, x)
    records = []
    for s, (stage, stage_steps) in enumerate(zip(model.stages, blocks)):
        controller_state, stage_records = None, []
        for k, (graphdef, params) in enumerate(stage_steps):
            key = jax.random.fold_in(jax.random.key(options.seed), 1000 * s + k)
            position = (jnp.asarray(k), jnp.asarray(stage.placement[k]))
            y, controller_state, record = _run_block(
                graphdef, params, (y, controller_state), position, gates[s][k], valid, options, key)
            stage_records.append(jax.device_get(record))
        records.append(stage_records)
    return records, np.asarray(_classify(model, y))


def _batches(images, batch_size):
    """Fixed-size batches (the last one padded by repeating its final image, so that nothing is
    compiled twice) and their validity masks."""
    size = min(batch_size, len(images))
    for start in range(0, len(images), size):
        chunk = np.asarray(images[start : start + size])
        valid = np.arange(size) < len(chunk)
        yield np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)]), valid.astype(np.float32)


def trace_model(model, images, *, options: TraceOptions = TraceOptions(), gate=None) -> Trace:
    """Run `model` (a `ResNet`, in evaluation mode) on `images` block by block and record every
    block's step sizes and stiffness indicators.

    **Arguments:**

    - `model`: the network; it must be in evaluation mode (BatchNorm running statistics), so
      that samples do not interact.
    - `images`: normalised inputs ``(N, H, W, C)``.
    - `options`: a `TraceOptions`.
    - `gate`: None, or per stage and block a fixed ``h`` used instead of the controller's (for
      instance `Trace.gate_mean` of an earlier trace: the gate replaced by its dataset mean).

    **Returns:**

    A `Trace`.
    """
    if any(isinstance(m, nnx.BatchNorm) and not m.use_running_average for _, m in nnx.iter_modules(model)):
        raise ValueError("trace_model needs the model in evaluation mode: call model.eval() first.")
    if len(images) == 0:
        raise ValueError("trace_model needs at least one image.")
    blocks = [[nnx.split(stage.step(k)) for k in range(stage.num_steps)] for stage in model.stages]
    shapes = _gate_shapes(model, blocks, jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
    gates = [
        [(jnp.ones(shape), jnp.asarray(False)) if gate is None else
         (jnp.broadcast_to(jnp.asarray(gate[s][k], jnp.float32), shape), jnp.asarray(True))
         for k, shape in enumerate(stage_shapes)]
        for s, stage_shapes in enumerate(shapes)
    ]
    batches, start = [], time.monotonic()
    total = math.ceil(len(images) / min(options.batch_size, len(images)))
    for x, valid in _batches(images, options.batch_size):
        batches.append(_trace_batch(model, jnp.asarray(x), jnp.asarray(valid), blocks, gates, options))
        _log.info("traced batch %d of %d (%.0f s)", len(batches), total, time.monotonic() - start)
    n = len(images)
    stages = []
    for s in range(len(blocks)):
        analysed = [k for k, record in enumerate(batches[0][0][s]) if "step_size" in record]
        joined = {
            name: np.concatenate([np.stack([b[0][s][k][name] for k in analysed], axis=1) for b in batches])[:n]
            for name in ("step_size", *INDICATORS, *GATE_INPUTS)
        }
        step_size = joined.pop("step_size")
        gate_inputs = {name: joined.pop(name) for name in GATE_INPUTS}
        stages.append(StageTrace(tuple(k + 1 for k in analysed), joined, step_size, gate_inputs))
    gate_mean = tuple(
        tuple(sum(b[0][s][k]["gate_sum"] for b in batches)[None] / n for k in range(len(stage_steps)))
        for s, stage_steps in enumerate(blocks)
    )
    return Trace(tuple(stages), np.concatenate([b[1] for b in batches])[:n], gate_mean)
