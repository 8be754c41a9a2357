"""Test set-up: 8 fake CPU devices (before jax is imported), huge pages for subprocesses, one
compilation cache for the run, one prepared digits dataset, and one run of the README's first
command."""

import os
import sys
from typing import NamedTuple

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Huge pages for the runs the tests start as subprocesses, as the README advises for CPU: XLA maps
# each step's temporary buffer afresh (README, Benchmarks).
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
# One persistent compilation cache for the whole test run, made here in the first process (xdist's
# controller): its workers and the trainer runs they start inherit it, so a step that several
# processes compile (every relaunch of a resume test) compiles once. `bench` opts out.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixer_jax_tests_cache_")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def load_config(name: str, arg: str | None = None):
    """configs/NAME.py's get_config(arg)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs.{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def digits_config(overrides: dict):
    """configs/digits.py with dotted `--config.KEY=VALUE`-style overrides applied in process."""
    c = load_config("digits")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def final_accuracy(log: str) -> float:
    """The percentage in a run's closing `final test accuracy P% on 360 examples` line (digits)."""
    import re

    found = re.search(r"final test accuracy ([\d.]+)% on 360 examples", log)
    assert found, log[-3000:]
    return float(found.group(1))


def assert_train_stream_resumes(config, keys=("image", "labels")) -> None:
    """Batches 6-10 after saving the iterator state at 5 and restoring it into a rebuilt pipeline
    equal an uninterrupted stream's."""
    import numpy as np

    from mixer_jax.data import pipeline

    straight = pipeline.make_train(config, process_index=0, process_count=1)
    want = [next(straight) for _ in range(10)]
    first = pipeline.make_train(config, process_index=0, process_count=1)
    for _ in range(5):
        next(first)
    resumed = pipeline.make_train(config, process_index=0, process_count=1)
    resumed.set_state(first.get_state())
    for i in range(5, 10):
        got = next(resumed)
        for key in keys:
            np.testing.assert_array_equal(got[key], want[i][key])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with the built-in digits dataset prepared once for the whole session."""
    from mixer_jax.data import pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.get_builder("digits", path)
    return path


# The test files that start from the README run (`digits_run`): one test worker runs them all, so
# that session fixture runs once.
_DIGITS_RUN_FILES = {"test_fewshot.py", "test_tools.py", "test_train.py", "test_weights.py"}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's per-file scheduling (module-scoped fixtures run once), with the files that share
    the README run as one unit."""
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "digits_run" if os.path.basename(path) in _DIGITS_RUN_FILES else path

    return Scheduling(config, log)


class DigitsRun(NamedTuple):
    workdir: str
    log: str  # The run's stderr.


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, data_dir) -> DigitsRun:
    """The README's first command (`configs/digits.py` as shipped), run once for the whole session:
    test_train checks its accuracy; the few-shot, tools and weights tests start from its model."""
    from test_config import run_main

    workdir = str(tmp_path_factory.mktemp("digits_run"))
    result = run_main(
        "--config=configs/digits.py", f"--workdir={workdir}", f"--config.input.data_dir={data_dir}", timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return DigitsRun(workdir, result.stderr)
