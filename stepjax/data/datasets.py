"""What each dataset is (classes, image shape, normalisation, tfds names) and the `data` config."""

import dataclasses
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from stepjax.errors import UserError

SOURCES = ("tfds", "npz", "synthetic")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    **Arguments:**

    - `num_classes`: number of labels; labels lie in `[0, num_classes)`.
    - `image_shape`: `(H, W, C)` of the images the pipeline delivers.
    - `mean`, `std`: per-channel normalisation constants for images scaled to `[0, 1]`.
    - `tfds_name`: the tensorflow-datasets name.
    - `splits`: maps `'train'` / `'test'` to the tfds split names.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tfds_name: str
    splits: Mapping[str, str]


DATASETS = {
    "cifar10": DatasetInfo(
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        tfds_name="cifar10",
        splits={"train": "train", "test": "test"},
    ),
    "cifar100": DatasetInfo(
        num_classes=100,
        image_shape=(32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        tfds_name="cifar100",
        splits={"train": "train", "test": "test"},
    ),
    "imagenet2012": DatasetInfo(
        num_classes=1000,
        image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        tfds_name="imagenet2012",
        splits={"train": "train", "test": "validation"},
    ),
}


def _lookup(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"Unknown dataset data.name={name!r}; choose one of {sorted(DATASETS)}.")
    return DATASETS[name]


def default_config(name: str = "cifar10") -> ml_collections.ConfigDict:
    """The `data` group of an experiment config, with defaults for `name`.

    **Arguments:**

    - `name`: a key of `DATASETS`.

    **Returns:**

    A `ConfigDict` with fields `source`, `name`, `dir`, `tfds_data_dir`, `synthetic_train_size`,
    `synthetic_test_size`, `image_size` and `num_classes`.
    """
    info = _lookup(name)
    return ml_collections.ConfigDict(
        {
            "source": "tfds",
            "name": name,
            "dir": config_dict.placeholder(str),
            "tfds_data_dir": config_dict.placeholder(str),
            "synthetic_train_size": 1024,
            "synthetic_test_size": 256,
            "image_size": info.image_shape[0],
            "num_classes": info.num_classes,
        }
    )


def dataset_info(cfg: ml_collections.ConfigDict) -> DatasetInfo:
    """Validates a `data` config and describes the dataset it selects.

    **Arguments:**

    - `cfg`: the `data` config group (see `default_config`).

    **Returns:**

    The `DatasetInfo` of `cfg.name`; for the synthetic source its `image_shape` is
    `(image_size, image_size, C)`.
    """
    if cfg.source not in SOURCES:
        raise UserError(f"Unknown data.source={cfg.source!r}; choose one of {list(SOURCES)}.")
    info = _lookup(cfg.name)
    if cfg.num_classes != info.num_classes:
        raise UserError(
            f"data.num_classes={cfg.num_classes} does not match data.name={cfg.name!r}, which has "
            f"{info.num_classes} classes: set data.num_classes={info.num_classes}."
        )
    if cfg.source != "synthetic":
        return info
    for field in ("image_size", "synthetic_train_size", "synthetic_test_size"):
        if cfg[field] < 1:
            raise UserError(f"data.{field} must be positive, got {cfg[field]}.")
    size = cfg.image_size
    return dataclasses.replace(info, image_shape=(size, size, info.image_shape[2]))


def check_split(split: str) -> None:
    """Raises a `ValueError` unless `split` is `'train'` or `'test'`."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
