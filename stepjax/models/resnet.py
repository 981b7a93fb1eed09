"""ResNets as stages of explicit Euler solves, with any step-size controller on any preset."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepjax.controllers import make_controller
from stepjax.errors import UserError
from stepjax.layers import Conv, Dense, Projection, batch_norm
from stepjax.models.fields import FIELDS, zero_last_layer
from stepjax.ode import EulerStage, EulerStep


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """Architecture of a preset.

    - `field`: ``"bottleneck"`` or ``"basic"``; `preact`: pre-activation (plain Euler) instead
      of post-activation (projected Euler, ReLU after the add).
    - `depths`, `widths`, `strides`: blocks, branch width (``planes``) and stride per stage.
    - `stem`: ``"cifar"`` (conv3x3) or ``"imagenet"`` (conv7x7/2 + maxpool); `stem_width`.
    - `zero_init_residual`: every vector field starts as zero, i.e. every step as the identity
      (`stepjax.models.fields.zero_last_layer`); off in the paper's protocol.
    """

    field: str
    preact: bool
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    stem: str = "cifar"
    stem_width: int = 16
    zero_init_residual: bool = False


PRESETS = {
    "resnet164": ResNetSpec("bottleneck", False, (18, 18, 18), (16, 32, 64), (1, 2, 2)),
    "preact_resnet164": ResNetSpec("bottleneck", True, (18, 18, 18), (16, 32, 64), (1, 2, 2)),
    "resnet20": ResNetSpec("basic", False, (3, 3, 3), (16, 32, 64), (1, 2, 2)),
    "resnet56": ResNetSpec("basic", False, (9, 9, 9), (16, 32, 64), (1, 2, 2)),
    "resnet110": ResNetSpec("basic", False, (18, 18, 18), (16, 32, 64), (1, 2, 2)),
    "resnet50": ResNetSpec("bottleneck", False, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), "imagenet", 64),
}


def get_spec(preset: str, **overrides) -> ResNetSpec:
    """The `ResNetSpec` of a preset, with fields replaced by `overrides` (None values ignored)."""
    if preset not in PRESETS:
        raise UserError(f"Unknown model preset {preset!r}; choose one of {sorted(PRESETS)}.")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    try:
        spec = dataclasses.replace(PRESETS[preset], **overrides)
    except TypeError as e:
        raise UserError(f"Bad override for preset {preset!r}: {e}") from e
    if not len(spec.depths) == len(spec.widths) == len(spec.strides):
        raise UserError(f"model {preset!r}: depths {spec.depths}, widths {spec.widths} and strides {spec.strides} "
                        f"need one entry per stage ({len(PRESETS[preset].depths)} stages in this preset).")
    return spec


@dataclasses.dataclass(frozen=True)
class RandomPlacement:
    """The controller in ``round(ratio * num_blocks)`` blocks drawn with `seed` (a lottery ticket)."""

    ratio: float = 0.5
    seed: int = 0


def resolve_placement(placement, depths: Sequence[int]):
    """Per-stage boolean masks saying in which blocks the controller is on.

    **Arguments:**

    - `placement`: ``"all"`` (or None), ``"none"``, a `RandomPlacement`, or an explicit list of
      global block indices (0-based, counting across stages).
    - `depths`: blocks per stage.

    **Returns:**

    A tuple of per-stage tuples of booleans.
    """
    total = int(sum(depths))
    if placement is None or placement == "all":
        flat = np.ones(total, bool)
    elif placement == "none":
        flat = np.zeros(total, bool)
    elif isinstance(placement, RandomPlacement):
        if not 0.0 <= placement.ratio <= 1.0:
            raise UserError(f"placement ratio must be in [0, 1], got {placement.ratio}.")
        flat = np.zeros(total, bool)
        chosen = np.random.default_rng(placement.seed).choice(total, round(placement.ratio * total), replace=False)
        flat[chosen] = True
    elif isinstance(placement, (list, tuple)):
        bad = [i for i in placement if not 0 <= int(i) < total]
        if bad:
            raise UserError(f"placement indices {bad} out of range for {total} blocks.")
        flat = np.zeros(total, bool)
        flat[[int(i) for i in placement]] = True
    else:
        raise UserError(f"Unknown placement {placement!r}; use 'all', 'none', a RandomPlacement or a list of block indices.")
    bounds = np.cumsum((0,) + tuple(depths))
    return tuple(tuple(bool(b) for b in flat[a:z]) for a, z in zip(bounds[:-1], bounds[1:]))


class ResNet(nnx.Module):
    """A ResNet whose stages are `EulerStage`s and whose step sizes come from a controller.

    **Arguments:**

    - `spec`: the architecture (`ResNetSpec`).
    - `num_classes`: classifier size.
    - `controller`: controller name (see `stepjax.controllers.CONTROLLERS`); `controller_options`
      its keyword options.
    - `placement`: per-stage masks from `resolve_placement` (None: controller in every block).
    - `rngs`: random stream; `dtype`: compute dtype; `scan`: scan (True) or loop over blocks.
    """

    def __init__(
        self,
        spec: ResNetSpec,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        controller: str = "constant",
        controller_options: dict | None = None,
        placement=None,
        dtype=jnp.float32,
        scan: bool = True,
    ):
        self.spec = spec
        self.dtype = dtype
        field_cls = FIELDS[spec.field]
        placement = placement or resolve_placement("all", spec.depths)
        if spec.stem == "imagenet":
            self.stem_conv = Conv(3, spec.stem_width, 7, stride=2, rngs=rngs, dtype=dtype)
        else:
            self.stem_conv = Conv(3, spec.stem_width, 3, rngs=rngs, dtype=dtype)
        self.stem_norm = None if spec.preact else batch_norm(spec.stem_width, rngs=rngs, dtype=dtype)
        stages, width_in = [], spec.stem_width
        for depth, planes, stride, mask in zip(spec.depths, spec.widths, spec.strides, placement):
            width_out = planes * field_cls.expansion
            transition = stride != 1 or width_in != width_out

            def make_step(first, r, width_in=width_in, planes=planes, stride=stride, width_out=width_out):
                cin = width_in if first else width_out
                field = field_cls(cin, planes, stride=stride if first else 1, preact=spec.preact, rngs=r, dtype=dtype)
                if spec.zero_init_residual:
                    zero_last_layer(field)
                return EulerStep(
                    field,
                    # the controller draws from its own key, so the backbone's initialisation is
                    # the same for every controller under one seed
                    make_controller(controller, width_out, rngs=nnx.Rngs(r.params()), **(controller_options or {})),
                    change_of_variables=(
                        Projection(width_in, width_out, stride=stride, norm=not spec.preact, rngs=r, dtype=dtype)
                        if first else None
                    ),
                    projection=None if spec.preact else jax.nn.relu,
                    nonnegative_state=not spec.preact,  # the stem's and every step's ReLU
                )

            stages.append(EulerStage(make_step, depth, transition=transition, placement=mask, rngs=rngs, scan=scan))
            width_in = width_out
        self.stages = nnx.List(stages)
        self.final_norm = batch_norm(width_in, rngs=rngs, dtype=dtype) if spec.preact else None
        self.head = Dense(width_in, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.solve(x)[0]

    def solve(self, x, *, save_states: bool = False):
        """Logits and the per-stage `StageOutput`s (step sizes; states if `save_states`):
        `stem`, then each stage's solve (``self.stages``, `EulerStage`s), then `classify`."""
        y = self.stem(x)
        outputs = []
        for stage in self.stages:
            y, out = stage.solve(y, save_states=save_states)
            outputs.append(out)
        return self.classify(y), outputs

    def stem(self, x):
        """The network before its first stage: images to the first stage's initial state."""
        y = self.stem_conv(x)
        if self.stem_norm is not None:
            y = jax.nn.relu(self.stem_norm(y))
        if self.spec.stem == "imagenet":
            y = jax.lax.reduce_window(
                y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
            )
        return y

    def classify(self, y):
        """The network after its last stage: the final state to logits (final BatchNorm and ReLU
        of a pre-activation network, global average pool, the dense `head`)."""
        if self.final_norm is not None:
            y = jax.nn.relu(self.final_norm(y))
        return self.head(y.astype(jnp.float32).mean(axis=(1, 2)))


def make_model(
    preset: str,
    *,
    num_classes: int,
    controller: str = "constant",
    controller_options: dict | None = None,
    placement="all",
    seed: int = 0,
    dtype=jnp.float32,
    scan: bool = True,
    **spec_overrides,
) -> ResNet:
    """Build a preset with a controller. `spec_overrides` replace `ResNetSpec` fields (e.g.
    ``depths=(2, 2, 2), widths=(4, 8, 16), stem_width=8`` for a tiny test network)."""
    spec = get_spec(preset, **spec_overrides)
    masks = resolve_placement(placement, spec.depths)
    options = tuple(sorted((controller_options or {}).items()))
    graphdefs, init, compiled = _initialiser(spec, num_classes, controller, options, masks, seed, dtype, scan)
    state = init() if _tracing() else compiled()  # under `nnx.eval_shape`: shapes, nothing compiled
    return nnx.merge(graphdefs[0], state)


def _tracing() -> bool:
    """Whether this runs under a JAX trace (`jax.jit`, `nnx.eval_shape`), which stages out every op."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


@functools.lru_cache(maxsize=8)
def _initialiser(spec, num_classes, controller, options, masks, seed, dtype, scan):
    """A model's initialisation: the one-item list its traces put the model's graph in, the
    function, and the function as one jitted program, made once per process for each set of `make_model`
    arguments (each call gives fresh arrays).

    One program because op-by-op initialisation of a deep net is slow on CPU; compiled without
    optimisation because it runs once and XLA's optimiser would dominate its cost."""
    graphdefs = []

    def init():
        graphdef, state = nnx.split(ResNet(
            spec, num_classes, rngs=nnx.Rngs(seed), controller=controller, controller_options=dict(options),
            placement=masks, dtype=dtype, scan=scan,
        ))
        graphdefs[:] = [graphdef]  # the graph is static: any trace gives it
        return state

    return graphdefs, init, jax.jit(init, compiler_options=FAST_COMPILE)


# XLA without its backend optimisations: for programs whose compilation costs more than their runs
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (shared parameters counted once)."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(nnx.state(model, nnx.Param))))
