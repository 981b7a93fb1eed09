"""The pure training and evaluation steps, jitted with explicit shardings over the `data` mesh."""

from __future__ import annotations

import collections
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stepjax import kernels
from stepjax.data import augment, dataset_info, normalize
from stepjax.models import DTYPES, FAST_COMPILE
from stepjax.parallel import batch_sharded, replicated


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    - `step`: number of optimizer updates done; `params`: the model's `nnx.Param` state;
      `rest`: its other state (BatchNorm statistics); `opt_state`: the optax state.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any


def learning_rate_schedule(optim, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Step (x `decay` at `boundaries` epochs) or cosine schedule, with optional linear warmup."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total_steps, warmup + 1), 0.0)
    main = optax.piecewise_constant_schedule(optim.lr, {int(b * steps_per_epoch): optim.decay for b in optim.boundaries})
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), main], [warmup])


def make_optimizer(optim, schedule) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (PyTorch's SGD) on all parameters, or, with
    ``optim.decay_only_kernels``, not on BatchNorm scales and any bias (`_is_decayed`)."""
    mask = _is_decayed if optim.decay_only_kernels else None
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov),
    )


def _is_decayed(params):
    """By name, not by rank: a scanned stage stacks its BatchNorm scales into matrices."""

    def decayed(path, _):
        name = str([k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1])
        return not (name == "scale" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decayed, params)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """Split a model into its graph and a `TrainState` at step 0."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


def model_inputs(config, info, images, key=None):
    """uint8 images -> normalised model inputs in the model's dtype (augmented when `key` is given)."""
    if key is not None:
        images = augment(images, key, padding=config.data.crop_padding, flip=config.data.flip)
    return normalize(images, info.mean, info.std).astype(DTYPES[config.model.dtype])


def cross_entropy(logits, labels, num_classes, smoothing=0.0):
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else jax.nn.one_hot(labels, num_classes)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step_fn(graphdef, tx, schedule, config, info):
    """The pure ``train_step(state, batch) -> (state, metrics)``, unjitted (to be jitted, or
    vmapped over several members as the campaign's measurements do)."""
    base_key = jax.random.key(config.seed)

    def train_step(state: TrainState, batch):
        x = model_inputs(config, info, batch["image"], jax.random.fold_in(base_key, state.step))

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            logits = model(x)
            loss = cross_entropy(logits, batch["label"], info.num_classes, config.optim.label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "learning_rate": schedule(state.step),
        }
        return TrainState(state.step + 1, params, rest, opt_state), metrics

    return train_step


def make_train_step(graphdef, tx, schedule, config, info, mesh):
    """The jitted ``train_step(state, batch) -> (state, metrics)``; `state` is donated."""
    return jax.jit(
        train_step_fn(graphdef, tx, schedule, config, info),
        in_shardings=(replicated(mesh), batch_sharded(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(config),
    )


def make_eval_step(graphdef, config, info, mesh, *, flip: bool = False):
    """The jitted ``eval_step(state, batch) -> sums`` over the masked examples of a batch:
    correct predictions, loss, count, and per-block step sizes (mean over channels).

    With `flip`, also ``flip_correct`` and ``flip_loss`` of the flip test-time augmentation: the
    prediction is the mean of the softmax probabilities of each image and its mirror image."""

    def eval_step(state: TrainState, batch):
        model = nnx.merge(graphdef, state.params, state.rest, copy=True)
        model.eval()
        x = model_inputs(config, info, batch["image"])
        logits, outputs = model.solve(x)
        mask = batch["mask"].astype(jnp.float32)

        def scores(logits):
            loss = cross_entropy(logits, batch["label"], info.num_classes)
            return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask), jnp.sum(loss * mask)

        sums = dict(zip(("correct", "loss"), scores(logits)))
        sums["count"] = jnp.sum(mask)
        sums["step_size"] = jnp.concatenate([(o.step_size.mean(-1) * mask).sum(-1) for o in outputs])
        if flip:
            mirrored, _ = model.solve(x[:, :, ::-1])
            probs = (jax.nn.softmax(logits.astype(jnp.float32)) + jax.nn.softmax(mirrored.astype(jnp.float32))) / 2
            sums["flip_correct"], sums["flip_loss"] = scores(jnp.log(probs))
        return sums

    return jax.jit(eval_step, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                   compiler_options=compiler_options(config))


def compiler_options(config) -> dict | None:
    """XLA's options for a run's steps: `FAST_COMPILE` with ``train.fast_compile``, else XLA's own."""
    return FAST_COMPILE if config.train.fast_compile else None


class Programs(NamedTuple):
    """What a run trains with: its optimizer `tx` (whose state the run starts from) and jitted
    `train_step` and `eval_step` (`make_train_step`, `make_eval_step`)."""

    tx: optax.GradientTransformation
    train_step: Any
    eval_step: Any


def _stepjax_environment() -> tuple:
    """The process's ``STEPJAX_*`` variables: tracing reads some of them (``STEPJAX_CONV``,
    ``STEPJAX_REMAT``, ``STEPJAX_ONEDNN_THREADS``)."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("STEPJAX_")))


# train.* fields that change how long a run goes and what it writes, never what its steps compute
_BOOKKEEPING = ("epochs", "total_steps", "halt_after_steps", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "eval_every_epochs", "progress")
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_KEPT_PROGRAMS = 4


def run_programs(config, graphdef, steps_per_epoch: int, total_steps: int, mesh) -> Programs:
    """The `Programs` of a run, made once per process for the configs that compile to the same
    steps, so that a process training several runs of one model (a resumed run, a sweep, the
    tests) traces and compiles its steps once.

    **Arguments:**

    - `config`: the run config; `graphdef`: its model's graph (`stepjax.models.build_model`).
    - `steps_per_epoch`, `total_steps`: the run's length, which the schedule reads.
    - `mesh`: the `data` mesh the steps are sharded over.

    **Returns:**

    `Programs`, shared with earlier calls of the same key (the last four are kept).
    """
    settings = config.to_dict()
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in _BOOKKEEPING}
    cosine = config.optim.schedule == "cosine"  # the only schedule that reads the run's length
    key = (json.dumps(settings, sort_keys=True, default=str), steps_per_epoch, total_steps if cosine else None, mesh,
           kernels.trace_settings(DTYPES[config.model.dtype]), _stepjax_environment())
    if key not in _PROGRAMS:
        info = dataset_info(config.data)
        schedule = learning_rate_schedule(config.optim, steps_per_epoch, total_steps)
        tx = make_optimizer(config.optim, schedule)
        _PROGRAMS[key] = Programs(
            tx, make_train_step(graphdef, tx, schedule, config, info, mesh),
            make_eval_step(graphdef, config, info, mesh, flip=config.train.eval_flip),
        )
        while len(_PROGRAMS) > _KEPT_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
