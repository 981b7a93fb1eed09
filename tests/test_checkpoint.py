"""Tests for stepjax.train.checkpoint (works with 1 or 4 CPU devices)."""

import errno
import gc
import glob
import logging
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

from stepjax.train.checkpoint import Checkpointer, CheckpointError, CheckpointSaveError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.linear(x)))


def _make(seed: int = 0):
    model = _Net(nnx.Rngs(seed, dropout=seed + 1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    return model, optimizer


def _spec(shape) -> P:
    """Shards the last axis over `data` when it divides, else replicates."""
    if shape and shape[-1] % jax.device_count() == 0:
        return P(*([None] * (len(shape) - 1)), "data")
    return P()


def _shard(tree):
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, _spec(a.shape))), tree)


def _trained_state(steps: int = 2):
    """Model + optimizer state after a few updates: nonzero momentum, step counter, rng."""
    model, optimizer = _make()
    model.train()
    x = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
    for _ in range(steps):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
    return _shard(nnx.state((model, optimizer)))


def _abstract_state():
    """What a training loop builds before restoring: eval_shape + target shardings."""
    abstract = nnx.state(nnx.eval_shape(_make))
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, _spec(a.shape))
        ),
        abstract,
    )


def _as_numpy(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return np.asarray(a)


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype
        assert a.sharding.is_equivalent_to(e.sharding, a.ndim)
        np.testing.assert_array_equal(_as_numpy(a), _as_numpy(e))


def _step_dirs(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_round_trip_nnx_state(tmp_path):
    state = _trained_state()
    extra = {"data": {"epoch": 3, "index": 17}, "best_accuracy": 0.5, "config": {"lr": 0.1}}
    ckpt = Checkpointer(tmp_path, save_interval_steps=10)
    assert ckpt.save(10, state, extra)
    ckpt.close()

    ckpt = Checkpointer(tmp_path, save_interval_steps=10)
    step, restored, restored_extra = ckpt.restore_latest(_abstract_state())
    ckpt.close()
    assert step == 10
    assert restored_extra == extra
    assert isinstance(restored, nnx.State)
    _assert_trees_equal(restored, state)

    model, optimizer = _make(seed=5)
    nnx.update((model, optimizer), restored)
    assert int(optimizer.step[...]) == 2
    momentum = optimizer.opt_state[0].trace["linear"]["kernel"][...]
    assert float(jnp.abs(momentum).sum()) > 0


def test_round_trip_pure_dict(tmp_path):
    state = nnx.to_pure_dict(_trained_state())
    abstract = nnx.to_pure_dict(_abstract_state())
    with_arrays = _shard(nnx.to_pure_dict(nnx.state(_make(seed=7))))  # arrays work as target
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(1, state, {})
    for target in (abstract, with_arrays):
        step, restored, extra = ckpt.restore_latest(target)
        assert (step, extra) == (1, {})
        _assert_trees_equal(restored, state)
    ckpt.close()

    model, optimizer = _make(seed=5)
    nnx_state = nnx.state((model, optimizer))
    nnx.replace_by_pure_dict(nnx_state, restored)
    nnx.update((model, optimizer), nnx_state)
    assert int(optimizer.step[...]) == 2


def test_async_save_survives_donated_source(tmp_path):
    state = _trained_state()
    expected = jax.tree.map(lambda a: _as_numpy(a).copy(), state)
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    assert ckpt.save(1, state, {"k": 1})
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what donate_argnums does to the buffers right after the save
    ckpt.wait()
    _, restored, _ = ckpt.restore_latest(_abstract_state())
    ckpt.close()
    for a, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(_as_numpy(a), e)


def test_no_checkpoint_returns_none(tmp_path):
    ckpt = Checkpointer(tmp_path / "missing")
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(_abstract_state()) is None
    ckpt.close()


def test_max_to_keep(tmp_path):
    state = _trained_state()
    ckpt = Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1)
    for step in range(1, 6):
        assert ckpt.save(step, state, {"step": step})
    ckpt.close()
    assert _step_dirs(tmp_path) == ["4", "5"]
    assert Checkpointer(tmp_path).latest_step() == 5


def test_interval_and_force(tmp_path):
    state = _trained_state()
    ckpt = Checkpointer(tmp_path, save_interval_steps=10)
    assert not ckpt.should_save(5)
    assert not ckpt.save(5, state, {})
    ckpt.wait()
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state, {"reason": "sigterm"}, force=True)
    assert not ckpt.save(5, state, {}, force=True)  # already saved: skipped, no error
    assert ckpt.should_save(10) and not ckpt.should_save(11)
    assert ckpt.save(10, state, {})
    ckpt.close()
    assert _step_dirs(tmp_path) == ["10", "5"]
    assert Checkpointer(tmp_path).restore_latest(_abstract_state())[0] == 10


def test_a_failed_write_is_reported_at_once_and_removed(tmp_path, monkeypatch):
    # a full disk while `extra` is written in the background (as the arrays are)
    save = JsonCheckpointHandler._save_fn

    async def no_space_at_step_2(self, item, directory):
        if "/2.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await save(self, item, directory)

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", no_space_at_step_2)
    state = _trained_state()
    ckpt = Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
    assert ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    assert ckpt.save(2, state, {"step": 2})
    with pytest.raises(CheckpointSaveError, match=(
            rf"^Could not write the checkpoint of step 2 in {tmp_path}: the disk is full\. Free space there, or keep "
            r"fewer checkpoints \(train.keep_checkpoints, now 3\), then rerun the same command to resume from "
            r"step 1\.$")):
        ckpt.wait()
    ckpt.close()  # the failure is reported once
    assert _step_dirs(tmp_path) == ["1"]
    assert Checkpointer(tmp_path).restore_latest(_abstract_state())[2] == {"step": 1}


def test_extra_must_be_json(tmp_path):
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save(1, _trained_state(), {"bad": object()})
    ckpt.close()


def _write_garbage(path):
    pathlib.Path(path).write_bytes(b"\x00not a checkpoint\x00" * 4)


def _flip_byte(path):
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(data))


def _state_data_files(step_dir):
    return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


_CORRUPTIONS = {
    "garbage_data": lambda d: [_write_garbage(f) for f in _state_data_files(d)],
    "flipped_byte": lambda d: [_flip_byte(f) for f in _state_data_files(d)],
    "truncated_data": lambda d: [os.truncate(f, 3) for f in _state_data_files(d)],
    "deleted_state": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garbage_extra": lambda d: _write_garbage(os.path.join(d, "extra", "metadata")),
}


def _save_steps(directory, steps):
    states = {}
    ckpt = Checkpointer(directory, save_interval_steps=1)
    for step in steps:
        states[step] = _trained_state(steps=step)
        ckpt.save(step, states[step], {"step": step})
    ckpt.close()
    return states


@pytest.fixture
def failed_reads_settle():
    """Lets the reads a failed restore abandoned finish inside the test that caused them.

    orbax runs a restore on a fresh asyncio loop and closes it when the first read fails;
    tensorstore reads still in flight then call back into the closed loop, which surfaces as
    harmless "Event loop is closed" unraisable exceptions (ignored by `pytestmark`).
    """
    yield
    time.sleep(0.2)
    gc.collect()


@pytest.mark.usefixtures("failed_reads_settle")
@pytest.mark.parametrize("corruption", sorted(_CORRUPTIONS))
def test_corrupt_latest_falls_back(tmp_path, caplog, corruption):
    states = _save_steps(tmp_path, [1, 2, 3])
    _CORRUPTIONS[corruption](os.path.join(tmp_path, "3"))

    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    with caplog.at_level(logging.WARNING, logger="stepjax.train.checkpoint"):
        step, restored, extra = ckpt.restore_latest(_abstract_state())
    assert (step, extra) == (2, {"step": 2})
    _assert_trees_equal(restored, states[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in m and "falling back to step 2" in m for m in warnings), warnings

    # The bad step is moved aside: training can save step 3 again.
    assert ckpt.latest_step() == 2
    assert ckpt.save(3, restored, {"step": 3})
    ckpt.close()
    assert _step_dirs(tmp_path) == ["1", "2", "3", "3.corrupt"]
    assert Checkpointer(tmp_path).restore_latest(_abstract_state())[0] == 3


@pytest.mark.usefixtures("failed_reads_settle")
def test_all_corrupt_raises(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for step in ("1", "2"):
        _CORRUPTIONS["garbage_data"](os.path.join(tmp_path, step))
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"All 2 checkpoints .* are unreadable"):
        ckpt.restore_latest(_abstract_state())
    ckpt.close()
    assert _step_dirs(tmp_path) == ["1", "2"]  # nothing moved: the next run fails again
