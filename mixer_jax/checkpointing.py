"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config.

Each checkpoint step holds three items: `state` (params, optimizer state, step, rng; restored
straight into the target shardings), `data` (the grain iterator state, a global stream position,
so it is valid for any process count) and `config` (JSON). Saves are asynchronous; Orbax writes
each step to a temporary directory and renames it when complete, so a partial save is never
picked up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, keep: int):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `state` with the shapes, dtypes and shardings of `abstract_state`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_state_numpy(directory: str, step: int | None = None) -> tuple[int, dict]:
    """(step, the saved train state as nested dicts of numpy arrays), on any device count.

    `directory` is a checkpoints directory; `step` defaults to the latest complete one.
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    path = os.path.join(manager.directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    manager.close()
    return step, state
