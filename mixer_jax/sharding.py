"""Device mesh, logical-axis rules and the placement of host data into global arrays.

The model names the axes of every weight (`embed`, `tokens`, `token_mlp`, `channel_mlp`,
`classes`, ...); `DEFAULT_RULES` map those names and the `batch` axis onto the mesh axes
`data`, `fsdp` and `tensor`. Data parallel, FSDP and tensor parallel are mesh sizes in the config.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixer_jax import config as config_lib

BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. A mesh axis is used at most once per array; flax skips repeats.
# FSDP shards every weight with an `embed` axis over `fsdp`; the token-mixing weights have none, so
# their hidden axis takes `fsdp` as well as `tensor`. A dimension that the mesh axes do not divide
# stays whole (see `fit_spec`).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("embed", "fsdp"),
    ("token_mlp", ("tensor", "fsdp")),
    ("channel_mlp", "tensor"),
    ("tokens", None),
    ("classes", None),
    ("patch_height", None),
    ("patch_width", None),
    ("pixels", None),
)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (all processes), sizes from the config."""
    devices = devices if devices is not None else jax.devices()
    sizes = config_lib.mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in config_lib.MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), config_lib.MESH_AXES)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes (last first) from any dimension whose size they do not divide."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = list((axes,) if isinstance(axes, str) else axes or ())
        while axes and dim % np.prod([mesh.shape[a] for a in axes]):
            axes.pop()
        fitted.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree whose leaves are boxed with logical axis names (unboxed leaves:
    replicated)."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
        specs,
        nn.unbox(abstract_tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """(n, batch, ...) arrays, n steps' batches or n microbatches: the second axis sharded like a batch."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, *, stacked: bool = False) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays sharded over the batch axes.

    `stacked`: the leaves lead with an axis of steps, kept whole, before the batch axis.
    """
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
