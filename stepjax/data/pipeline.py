"""grain pipelines: the infinite, shuffled, checkpointable training stream and padded evaluation.

Both pipelines work on example positions in the *global* stream and cut every global batch into
`process_count` contiguous slices, so concatenating the slices of all processes gives the batch a
single process would read, and the iterator state (the global step) is the same on every process.
"""

import functools

import grain
import ml_collections
import numpy as np

from stepjax.data.sources import open_source
from stepjax.errors import UserError


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch < 1 or process_count < 1 or global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} must be a positive multiple of "
            f"process_count={process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
    return global_batch // process_count


def _iterate(dataset: grain.MapDataset, source) -> grain.DatasetIterator:
    """Reads batches ahead in background threads, a few more than there are threads."""
    options = grain.ReadOptions(
        num_threads=source.read_threads, prefetch_buffer_size=source.read_threads + 3
    )
    return iter(dataset.to_iter_dataset(options))


def _shuffle_seed(seed: int) -> int:
    """A 32-bit seed for grain, hashed so that nearby seeds give unrelated epoch orders.

    grain reshuffles epoch `e` with seed `s + e`; hashing keeps run `seed=1` from replaying the
    second epoch of run `seed=0`.
    """
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}.")
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _read_train(source, seed: int, positions_indices: tuple[np.ndarray, np.ndarray]):
    positions, indices = positions_indices
    rng_seeds = np.stack([np.full_like(positions, seed), positions], axis=-1)
    return source.read(indices, rng_seeds)


def _read_eval(source, positions: np.ndarray) -> dict[str, np.ndarray]:
    mask = positions < len(source)
    batch = source.read(np.minimum(positions, len(source) - 1))
    return {**batch, "mask": mask}


class TrainLoader:
    """Infinite iterator over this process's slice of shuffled global training batches.

    Every epoch is a fresh permutation (seeded by `seed` and the epoch number), cut into
    `steps_per_epoch` global batches; the remainder of each epoch is dropped.

    **Arguments:**

    - `cfg`: the `data` config group.
    - `seed`: shuffling seed (non-negative); the same on every process.
    - `global_batch`: examples per step over all processes.
    - `process_index`, `process_count`: this process and the number of processes.

    **Yields:**

    `{'image': uint8 [global_batch // process_count, H, W, C], 'label': int32 [...]}`.
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        *,
        seed: int,
        global_batch: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        local_batch = _local_batch(global_batch, process_index, process_count)
        source = open_source(cfg, "train")
        self.steps_per_epoch = len(source) // global_batch
        if not self.steps_per_epoch:
            raise UserError(
                f"global_batch={global_batch} exceeds the {len(source)} training examples of "
                f"{cfg.name}."
            )
        shuffle_seed = _shuffle_seed(seed)
        dataset = (
            grain.MapDataset.range(len(source))
            .shuffle(shuffle_seed)[: self.steps_per_epoch * global_batch]
            .repeat()
            .map_with_index(lambda position, index: (position, index))
            .batch(local_batch)[process_index::process_count]
            .map(functools.partial(_read_train, source, shuffle_seed))
        )
        self._iterator = _iterate(dataset, source)
        self._identity = {"seed": seed, "global_batch": global_batch, "num_examples": len(source)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """Returns a JSON-serialisable state, identical on every process.

        **Returns:**

        `{'step', 'seed', 'global_batch', 'num_examples'}`, where `step` counts the global
        batches delivered so far.
        """
        return {"step": self._iterator.get_state()["next_index"], **self._identity}

    def set_state(self, state: dict) -> None:
        """Resumes at a state from `get_state`: the next batches are those that followed it.

        **Arguments:**

        - `state`: a dict from `get_state` of a loader with the same seed, global batch and
          training set.
        """
        saved = {key: state.get(key) for key in self._identity}
        if saved != self._identity:
            raise UserError(
                f"Data iterator state was saved with {saved} but this loader has "
                f"{self._identity}; resume with the same seed, global batch and dataset."
            )
        self._iterator.set_state({"next_index": state["step"]})


def eval_batches(
    cfg: ml_collections.ConfigDict,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Iterates once over the test split in fixed-size batches, padded at the end.

    Over all processes every test example appears exactly once with `mask=True`; padding
    entries repeat the last example and carry `mask=False`.

    **Arguments:**

    - `cfg`: the `data` config group.
    - `global_batch`: examples per step over all processes.
    - `process_index`, `process_count`: this process and the number of processes.

    **Returns:**

    An iterator of `{'image': uint8 [global_batch // process_count, H, W, C], 'label': int32,
    'mask': bool}`.
    """
    local_batch = _local_batch(global_batch, process_index, process_count)
    source = open_source(cfg, "test")
    num_batches = -(-len(source) // global_batch)
    dataset = (
        grain.MapDataset.range(num_batches * global_batch)
        .batch(local_batch)[process_index::process_count]
        .map(functools.partial(_read_eval, source))
    )
    return _iterate(dataset, source)
