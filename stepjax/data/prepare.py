"""Download and convert a dataset to tfds array_record files (`make data DATASET=...`).

Writing tfds datasets needs TensorFlow (the optional extra `tensorflow-cpu`); reading them back
during training does not.
"""

import importlib

from stepjax.data.datasets import DATASETS


def _require_tensorflow() -> None:
    try:
        importlib.import_module("tensorflow")
    except ImportError as error:
        raise ImportError(
            "Preparing tfds datasets needs TensorFlow: `pip install tensorflow-cpu` (or "
            "`pip install -e .[prepare]`). Training reads the prepared files without it; without "
            "internet use data.source=npz data.dir=/path/to/dir instead."
        ) from error


def prepare(name: str, data_dir: str | None = None) -> str:
    """Downloads `name` and writes it as array_record files for `tfds.data_source`.

    **Arguments:**

    - `name`: a key of `DATASETS`.
    - `data_dir`: the tfds data directory (`None`: tfds's default, `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`); pass the same value as `data.tfds_data_dir` when training.

    **Returns:**

    The directory holding the prepared dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    _require_tensorflow()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(DATASETS[name].tfds_name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)
