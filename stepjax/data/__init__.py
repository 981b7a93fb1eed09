"""Data: dataset descriptions, sources (tfds, npz, synthetic), grain pipelines, augmentation."""

from stepjax.data.augment import augment, normalize
from stepjax.data.datasets import DATASETS, DatasetInfo, dataset_info, default_config
from stepjax.data.pipeline import TrainLoader, eval_batches
from stepjax.data.prepare import prepare
from stepjax.data.sources import DATA_DIR_ENV, load_split, open_source

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DatasetInfo",
    "TrainLoader",
    "augment",
    "dataset_info",
    "default_config",
    "eval_batches",
    "load_split",
    "normalize",
    "open_source",
    "prepare",
]
