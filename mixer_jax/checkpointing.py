"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config.

Each checkpoint step holds three items: `state` (params, optimizer state, step, rng; restored
straight into the target shardings, so a checkpoint written on one mesh or process count restores
onto another), `data` (the grain iterator state: a count of global batches, valid for any process
count) and `config` (JSON). Saves are asynchronous. Orbax writes each step to a temporary
directory and renames it when complete, so a partial save (a crash, a kill) is never picked up;
leftover temporary directories are removed at start-up. The last `keep_checkpoints` steps are
kept, plus the best `keep_best` by an evaluation metric.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Keys that may differ between the config saved in a checkpoint and the one resuming from it.
RESUMABLE_CHANGES = (
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "keep_best",
    "best_metric",
    "mode",
    "eval_checkpoint",
    "allow_config_change",
    "accum_steps",
    "steps_per_call",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "model.remat",
    "input.data_dir",
    "input.num_workers",
    "input.prefetch",
    "init.path",
    "init.new_head",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as configured. The message says why and what to do."""


class Checkpointer:
    """A run's checkpoints directory. `read_only`: restores only, and leaves the directory as it
    is (a training run's checkpointer removes unfinished saves when it opens)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int,
        keep_best: int = 0,
        best_metric: str = "eval/accuracy",
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        policies = [checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if keep_best:
            sign = -1 if best_metric.endswith("loss") else 1

            def best_fn(metrics: dict) -> float:
                return sign * metrics[best_metric]

            policies.append(
                checkpoint_managers.BestN(get_metric_fn=best_fn, n=keep_best, keep_checkpoints_without_metrics=False)
            )
            _silence_missing_metrics()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=not read_only,
                read_only=read_only,
                enable_async_checkpointing=True,
                cleanup_tmp_directories=not read_only,
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
                # Orbax writes a save's metrics into its step, where a later run reads them back,
                # only with a `best_fn`. Without them on disk, a resumed run knows no checkpoint's
                # metric, and its first save would delete the best ones.
                best_fn=best_fn,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        config: ml_collections.ConfigDict,
        metrics: dict[str, float] | None = None,
        deferred: tuple[str, ...] = (),
    ) -> None:
        """`metrics`: the step's evaluation, for `keep_best`. `deferred`: the evaluations due at this
        step that are left to the run that resumes from it (`deferred(step)`)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            metrics=metrics,
            custom_metadata={"deferred_evaluations": list(deferred)} if deferred else None,
            force=True,
        )

    def deferred(self, step: int) -> tuple[str, ...]:
        """The evaluations due at `step` that its save left to the run that resumes from it."""
        custom = self.manager.metadata(step).custom_metadata or {}
        return tuple(custom.get("deferred_evaluations", ()))

    def saved_config(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:
            raise self._unreadable(step, e) from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `state` with the shapes, dtypes and shardings of `abstract_state`."""
        _silence_late_reads()
        mismatch = describe_mismatch(os.path.join(self.directory, str(step), "state"), abstract_state)
        if mismatch:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this model and optimizer: {mismatch}. "
                f"Resume it with the config it was written with (saved in {self.directory}/{step}/config), or "
                f"start a new --workdir from its weights with --config.init.path={self.directory}/{step}."
            )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except Exception as e:
            raise self._unreadable(step, e) from None
        if restored.data is None:
            raise self._unreadable(step, ValueError("the data-iterator state is missing"))
        return restored.state, restored.data

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (evaluation, fine-tuning): the optimizer that wrote them does not matter."""
        _silence_late_reads()
        mismatch = describe_mismatch(os.path.join(self.directory, str(step), "state"), {"params": abstract_params})
        if mismatch:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this model: {mismatch}.")
        item = {"params": abstract_params}
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
                ),
            )
        except Exception as e:
            raise self._unreadable(step, e) from None
        return restored.state["params"]

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        previous = [s for s in self.all_steps() if s < step]
        hint = (
            f"move {self.directory}/{step} aside to resume from step {previous[-1]}, the previous checkpoint"
            if previous
            else "move it aside to start the run afresh"
        )
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        return CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); {hint}.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes the saves in flight and stops Orbax's threads."""
        self.manager.close()


def locate(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step or None for the latest) of a workdir, its checkpoints/ directory
    or one checkpoints/STEP."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):  # A workdir, whatever its name.
        return os.path.join(path, "checkpoints"), None
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):  # One step.
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): tuple(x.shape)
        for path, x in flat
        if hasattr(x, "shape")
    }


def describe_mismatch(state_dir: str, abstract_state: Any) -> str:
    """'' if the saved tree has the keys and shapes of `abstract_state`, else what differs."""
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    except Exception:
        return ""  # Unreadable metadata: reported by the restore itself.
    # The parameters, and the optimizer state when the whole state is restored. (Not the rng key:
    # it is stored as its raw (2,) words.)
    wanted = {k: v for k, v in _flat_shapes(abstract_state).items() if k.split("/")[0] in ("params", "opt_state")}
    parts = {k.split("/")[0] for k in wanted}
    saved = {k: v for k, v in _flat_shapes(metadata).items() if k.split("/")[0] in parts}

    def ordered(keys):  # The parameters first: they name the model; the optimizer state follows them.
        return sorted(keys, key=lambda k: (not k.startswith("params/"), k))

    found = []
    if only := ordered(set(saved) - set(wanted)):
        found.append(f"only in the checkpoint: {', '.join(only[:8])}{' ...' if len(only) > 8 else ''}")
    if only := ordered(set(wanted) - set(saved)):
        found.append(f"only in the model: {', '.join(only[:8])}{' ...' if len(only) > 8 else ''}")
    shapes = [
        f"{k} {saved[k]} in the checkpoint vs {wanted[k]} in the model"
        for k in ordered(saved)
        if k in wanted and saved[k] != wanted[k]
    ]
    if shapes:
        found.append("different shapes: " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
    return "; ".join(found)


def config_diff(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """`key: saved -> current` for every changed key that a resume may not change."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(json.loads(current.to_json()))
    keys = sorted((set(a) | set(b)) - set(RESUMABLE_CHANGES))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]


def _silence_late_reads() -> None:
    """When one array fails to read, Orbax's restore raises and closes its event loop while
    TensorStore is still completing the other reads. Their results then surface, from other
    threads and at any time, as unraisable exceptions (a post to the closed loop, a failed read
    coroutine collected unawaited) and unretrieved-future log lines. All belong to the failed
    restore, whose error we report: drop just those, so the user sees one message."""
    default = sys.unraisablehook
    if getattr(default, "silences_late_reads", False):
        return

    def from_failed_restore(unraisable) -> bool:
        code = getattr(unraisable.object, "cr_code", None)
        return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed") or (
            code is not None and "orbax" in code.co_filename
        )

    def hook(unraisable) -> None:
        if not from_failed_restore(unraisable):
            default(unraisable)

    hook.silences_late_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda r: "exception was never retrieved" not in r.getMessage())


class _NoMissingMetricsWarning(logging.Filter):
    """With `keep_best`, Orbax warns at each save without metrics. Most saves have none (only
    evaluation steps do), and `keep_checkpoints` alone keeps them, as it should."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


def _silence_missing_metrics() -> None:
    logger = logging.getLogger("absl")  # Orbax logs through absl.
    if not any(isinstance(f, _NoMissingMetricsWarning) for f in logger.filters):
        logger.addFilter(_NoMissingMetricsWarning())


class Preemption:
    """Whether the run must save and stop now, agreed by every process.

    Several processes: JAX's preemption sync point (the coordination service turns SIGTERM and the
    TPU maintenance notice into one `reached()` call at which every process answers yes). One
    process: a SIGTERM handler.
    """

    def __init__(self):
        self.requested = threading.Event()
        self.multiprocess = jax.process_count() > 1
        self._asked = 0
        self._previous = None
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before (in a notebook or sweep the process
        lives on after the run)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self) -> bool:
        """Whether to save and stop now. Every process asks at the same points of the run (after
        each train call, before each evaluation batch): the sync point counts the questions."""
        self._asked += 1
        if self.multiprocess:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(self._asked)
        return self.requested.is_set()


def load_state_numpy(directory: str, step: int | None = None) -> tuple[int, dict]:
    """(step, the saved train state as nested dicts of numpy arrays), on any device count.

    `directory` is a checkpoints directory; `step` defaults to the latest complete one.
    """
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    step = manager.latest_step() if step is None else step
    path = os.path.join(manager.directory, str(step), "state")
    manager.close()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint step {step} in {directory} has no state")
    _silence_late_reads()
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return step, state
