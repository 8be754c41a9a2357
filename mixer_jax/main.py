"""Command line: `python -m mixer_jax.main --config=configs/FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

A config that cannot run ends the program before any compile or data read, with exit status 2
and one message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ notices (TFDS, TensorBoard).

from absl import app, flags, logging
from ml_collections import config_flags

from mixer_jax import config as config_lib


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with :ARG.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("MIXER_COORDINATOR_ADDRESS"), "HOST:PORT of process 0, for multi-process."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", _env_int("MIXER_NUM_PROCESSES"), "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", _env_int("MIXER_PROCESS_ID"), "This process's index.")

# Exit statuses: 0 done; 1 a crash; 2 a config or checkpoint that cannot run (nothing was changed);
# 3 preempted, a checkpoint was saved: re-run the same command; 4 a non-finite loss or gradient.
EXIT_BAD_CONFIG = 2
EXIT_PREEMPTED = 3
EXIT_NON_FINITE = 4


def initialize_distributed() -> None:
    """Starts JAX's multi-controller runtime when this is one of several processes.

    Explicit: --coordinator_address/--num_processes/--process_id (or MIXER_COORDINATOR_ADDRESS,
    MIXER_NUM_PROCESSES, MIXER_PROCESS_ID). Auto-detected by jax: a SLURM job with several tasks, a
    multi-host TPU VM, or MIXER_DISTRIBUTED=1. CPU processes exchange data through gloo.
    """
    import jax

    explicit = _COORDINATOR.value is not None
    if not explicit and (_NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None):
        _fail(
            "--num_processes and --process_id (or MIXER_NUM_PROCESSES, MIXER_PROCESS_ID) need "
            "--coordinator_address (or MIXER_COORDINATOR_ADDRESS) as well: HOST:PORT of process 0."
        )
    slurm = os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm or tpu_pod or os.environ.get("MIXER_DISTRIBUTED") == "1"):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            _fail("--coordinator_address needs --num_processes and --process_id as well.")
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            _fail(f"--process_id {_PROCESS_ID.value} must lie in [0, --num_processes={_NUM_PROCESSES.value}).")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # Process 0 speaks for the run.


def _fail(message: str) -> None:
    print(f"mixer_jax: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_CONFIG)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with user-facing errors instead of tracebacks."""
    path = _config_path(argv)
    if path is None:
        _fail("--config is required, e.g. --config=configs/digits.py")
    if not os.path.isfile(path.split(":", 1)[0]):
        _fail(f"config file {path.split(':', 1)[0]!r} (from --config={path}) does not exist.")
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        config.get("seed")  # A config file that failed to load raises here.
    except flags.Error as e:
        _fail(_config_file_error(path, str(e)) if "Error whilst parsing config file" in str(e) else str(e))
    except (AttributeError, KeyError) as e:
        for arg in argv:
            key, _, value = arg.removeprefix("--config.").partition("=")
            if arg.startswith("--config.") and (message := config_lib.unknown_key_message(key, value)):
                _fail(message)
        _fail(f"a --config.KEY=VALUE override names no config key: {e}")
    return rest


def _config_file_error(path: str, text: str) -> str:
    """The last line of the config file's traceback, and where in the file it was raised."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    file = path.split(":", 1)[0]
    where = [line for line in lines if line.startswith("File ") and os.path.basename(file) in line]
    at = f" ({where[-1].split(', in ')[0]})" if where else ""
    return f"config file {file} could not be loaded: {lines[-1]}{at}"


class _QuietLibraries(std_logging.Filter):
    """Keeps the console to this program's progress: library INFO lines (Orbax logs several per
    checkpoint) are dropped; their warnings and errors still show."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "/mixer_jax/" in record.pathname


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (WORKDIR/checkpoints/STEP) to resume from.
    Unfinished ones are Orbax's temporary directories, whose names are not bare step numbers."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def main(argv: list[str]) -> None:
    for handler in std_logging.root.handlers:  # absl's, or one a library installed before it.
        handler.addFilter(_QuietLibraries())
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; pass options as --config.KEY=VALUE.")
    if not _WORKDIR.value:
        _fail("--workdir is required: the directory for checkpoints, summaries and logs.")
    initialize_distributed()
    import jax

    from mixer_jax.data import pipeline, preprocess

    config = _CONFIG.value
    try:
        config_lib.validate(
            config,
            num_devices=jax.device_count(),
            num_processes=jax.process_count(),
            resuming=has_checkpoint(_WORKDIR.value),
        )
        pipeline.check(config, process_count=jax.process_count())
    except (config_lib.ConfigError, pipeline.DatasetError, preprocess.PreprocessError) as e:
        _fail(str(e))
    from mixer_jax import checkpointing, train, weights  # After validation: the trainer's imports are slow.

    os.makedirs(_WORKDIR.value, exist_ok=True)
    logging.info("config:\n%s", config)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except (checkpointing.CheckpointError, weights.WeightsError, pipeline.DatasetError) as e:
        _fail(str(e))  # A DatasetError here: the first examples do not fit the model (check_examples).
    except train.Preempted as e:
        logging.warning("%s", e)
        sys.exit(EXIT_PREEMPTED)
    except train.NonFiniteError as e:
        print(f"mixer_jax: error: {e}", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
