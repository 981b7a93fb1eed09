"""Random-access sources of `(image, label)` examples: npz directory, synthetic, tfds.

A source has `len(source)`, `source.read(indices, rng_seeds=None)`, which returns
`{'image': uint8 [B, H, W, C], 'label': int32 [B]}` for an integer index array, and
`source.read_threads`, the number of threads worth reading batches in parallel. `rng_seeds`
(`[B, 2]` integers, or `None` for evaluation) seeds per-example host-side randomness: only
variable-size datasets (ImageNet) use it, for their random crop.
"""

import os
import zipfile

import ml_collections
import numpy as np

from stepjax.data import imagenet
from stepjax.data.datasets import DatasetInfo, check_split, dataset_info
from stepjax.errors import UserError

DATA_DIR_ENV = "STEPJAX_DATA_DIR"
_SYNTHETIC_NOISE = 48.0


def _options(name: str) -> str:
    return (
        f"Either prepare it with tfds (`make data DATASET={name}`, needs internet and "
        f"`pip install tensorflow-cpu`; then data.source=tfds), or point to a directory holding "
        f"train.npz and test.npz (keys 'image': uint8 NHWC, 'label') with "
        f"`data.source=npz data.dir=/path/to/dir` or the environment variable {DATA_DIR_ENV}."
    )


class ArraySource:
    """Images and labels held in memory."""

    read_threads = 1

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(
        self, indices: np.ndarray, rng_seeds: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        del rng_seeds
        return {"image": self.images[indices], "label": self.labels[indices]}


class TfdsSource:
    """A `tfds.data_source` over prepared array_record files.

    With `resize_to` set (variable-size datasets: ImageNet) every image is cropped and resized
    to a `resize_to x resize_to` square by `imagenet.decode`.
    """

    def __init__(self, records, resize_to: int | None):
        self._records = records
        self._resize_to = resize_to

    def __len__(self) -> int:
        return len(self._records)

    @property
    def read_threads(self) -> int:
        """One per core when images are decoded on the host (PIL releases the GIL), else one."""
        return 1 if self._resize_to is None else os.cpu_count() or 1

    def _image(self, image: np.ndarray, rng_seed: np.ndarray | None) -> np.ndarray:
        if self._resize_to is None:
            return image
        rng = None if rng_seed is None else np.random.default_rng(rng_seed)
        return imagenet.decode(image, rng, self._resize_to)

    def read(
        self, indices: np.ndarray, rng_seeds: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        # One read per record: tfds's `mock_data` source breaks on batched `__getitems__`.
        records = [self._records[int(i)] for i in indices]
        seeds = [None] * len(records) if rng_seeds is None else rng_seeds
        images = [self._image(r["image"], s) for r, s in zip(records, seeds, strict=True)]
        labels = [r["label"] for r in records]
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}


def _image_fix(images: np.ndarray, info: DatasetInfo) -> str:
    """How to turn `images` into uint8 NHWC pixels in [0, 255], as a hint."""
    if images.ndim == 4 and images.shape[1:] == (info.image_shape[2], *info.image_shape[:2]):
        return "channels come first: store x.transpose(0, 2, 3, 1)"
    if images.ndim != 4 or images.shape[1:] != info.image_shape:
        return "check data.name and the file"
    if np.issubdtype(images.dtype, np.floating) and images.size and float(images.max()) <= 1.0:
        return "pixels in [0, 1]: convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
    return "convert with np.clip(np.round(x), 0, 255).astype(np.uint8)"


def _validate(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, name: str, origin: str):
    expected = (len(images) if images.ndim else 0, *info.image_shape)
    if images.ndim != 4 or images.shape[1:] != info.image_shape:
        raise UserError(
            f"{origin}: 'image' has shape {images.shape}; expected NHWC {expected} for {name} "
            f"({_image_fix(images, info)})."
        )
    if images.dtype != np.uint8:
        raise UserError(
            f"{origin}: 'image' has dtype {images.dtype}; expected uint8 pixels in [0, 255] "
            f"({_image_fix(images, info)})."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{origin}: 'label' has shape {labels.shape} and dtype {labels.dtype}; expected a 1-D "
            f"integer array (e.g. labels.reshape(-1).astype(np.int32))."
        )
    if len(labels) != len(images) or not len(labels):
        raise UserError(
            f"{origin}: {len(labels)} labels for {len(images)} images; expected one each, at least one."
        )
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise UserError(
            f"{origin}: labels span [{labels.min()}, {labels.max()}] but {name} needs labels in "
            f"[0, {info.num_classes}); check data.name and the file."
        )
    return images, labels.astype(np.int32)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The 'image' and 'label' arrays of an npz file; a file that cannot be read is named with what
    is wrong with it."""
    with open(path, "rb") as f:
        head = f.read(6)
    if not head:
        what = "is empty (0 bytes; a copy or download cut short?)"
    elif head.startswith(b"\x93NUMPY"):
        what = "holds a single .npy array, not an npz archive of 'image' and 'label'"
    elif not head.startswith(b"PK"):
        what = "is not an npz archive (no zip header)"
    else:
        try:
            with np.load(path) as archive:  # members of an .npz cannot be memory-mapped: read them
                files = archive.files
                arrays = {key: archive[key] for key in ("image", "label") if key in files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            what = f"cannot be read as an npz archive, truncated or damaged ({type(error).__name__}: {error})"
        else:
            missing = sorted({"image", "label"} - set(files))
            if not missing:
                return arrays
            what = f"lacks key(s) {missing} (has {sorted(files)})"
    raise UserError(
        f"{path} {what}; expected 'image' (uint8 NHWC) and 'label' (integers): write it with "
        "np.savez(path, image=images, label=labels)."
    )


def _load_npz(cfg: ml_collections.ConfigDict, split: str, info: DatasetInfo):
    directory = cfg.dir or os.environ.get(DATA_DIR_ENV)
    if not directory:
        raise UserError(
            f"data.source='npz' needs a directory, but neither data.dir nor {DATA_DIR_ENV} is set. "
            f"{_options(cfg.name)}"
        )
    path = os.path.join(directory, f"{split}.npz")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist. {_options(cfg.name)}")
    arrays = _read_npz(path)
    return _validate(arrays["image"], arrays["label"], info, cfg.name, path)


def _synthetic(cfg: ml_collections.ConfigDict, split: str, info: DatasetInfo):
    """Class-coloured noise: each class has a fixed mean colour, learnable in a few steps."""
    size = cfg.synthetic_train_size if split == "train" else cfg.synthetic_test_size
    colours = np.random.default_rng(0).uniform(32, 224, (info.num_classes, info.image_shape[2]))
    rng = np.random.default_rng(1 + ("train", "test").index(split))
    labels = rng.integers(info.num_classes, size=size, dtype=np.int32)
    noise = rng.normal(0.0, _SYNTHETIC_NOISE, (size, *info.image_shape))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def _tfds_records(cfg: ml_collections.ConfigDict, split: str, info: DatasetInfo):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
        return tfds.data_source(
            info.tfds_name, split=info.splits[split], data_dir=cfg.tfds_data_dir, download=False
        )
    except (AssertionError, FileNotFoundError, KeyError, NotImplementedError, ValueError) as error:
        where = cfg.tfds_data_dir or "the default tfds data directory"
        raise UserError(
            f"tfds dataset {info.tfds_name!r} (split {info.splits[split]!r}) is not prepared as "
            f"array_record files in {where}. {_options(cfg.name)} "
            f"[{type(error).__name__}: {error}]"
        ) from error


def load_split(cfg: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split into memory, validated against the dataset description.

    **Arguments:**

    - `cfg`: the `data` config group.
    - `split`: `'train'` or `'test'`.

    **Returns:**

    `(images, labels)`: uint8 `[N, H, W, C]` and int32 `[N]`.
    """
    source = open_source(cfg, split)
    if isinstance(source, ArraySource):
        return source.images, source.labels
    batch = source.read(np.arange(len(source)))
    return batch["image"], batch["label"]


def open_source(cfg: ml_collections.ConfigDict, split: str) -> ArraySource | TfdsSource:
    """Opens the random-access source that `cfg.source` selects.

    **Arguments:**

    - `cfg`: the `data` config group.
    - `split`: `'train'` or `'test'`.

    **Returns:**

    An `ArraySource` (npz, synthetic) or a `TfdsSource`.
    """
    check_split(split)
    info = dataset_info(cfg)
    if cfg.source == "tfds":
        resize_to = info.image_shape[0] if cfg.name == "imagenet2012" else None
        return TfdsSource(_tfds_records(cfg, split, info), resize_to)
    load = {"npz": _load_npz, "synthetic": _synthetic}[cfg.source]
    return ArraySource(*load(cfg, split, info))
