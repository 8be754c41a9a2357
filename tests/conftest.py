"""Test set-up: 8 fake CPU devices (before jax is imported) and one prepared digits dataset."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with the built-in digits dataset prepared once for the whole session."""
    from mixer_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.get_builder("digits", path)
    return path
