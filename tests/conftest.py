"""Test setup: four fake CPU devices (set before JAX is imported), and a persistent compilation
cache shared by the test processes and the training processes they start, so that the many small
trainings of the same smoke network compile each program once. Convolutions take XLA's path
(``STEPJAX_CONV=xla``): a program with the oneDNN calls is never found in that cache, because their
`custom_partitioning` gives it a new key in every process. `tests/test_onednn.py` and the `make
train` end-to-end test run the oneDNN path. Run records go to a temporary results tree, never into
the repository's `results/`."""

import logging
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("STEPJAX_CONV", "xla")
os.environ.setdefault("STEPJAX_RESULTS", tempfile.mkdtemp(prefix="stepjax-results-"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(autouse=True)
def root_logging():
    """Each test starts from the root logger as it found it: a command run in-process
    (`errors.setup_logging`) would otherwise leave its stderr handler for the next tests, whose
    captured stderr then holds the log lines of their own library calls."""
    saved = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = saved[0]
    logging.root.setLevel(saved[1])
