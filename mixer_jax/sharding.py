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
    """The (data, fsdp, tensor) mesh over all devices (all processes), sizes from the config.

    The devices are taken process by process (then by id), so that each process's devices are
    neighbours along the batch axes and it feeds one contiguous slice of the batch, whatever order
    the platform numbers them in.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
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


def batch_slice(mesh: Mesh, batch_size: int, process_index: int | None = None) -> tuple[int, int]:
    """(index, count): the process's devices hold slice `index` of `count` equal, contiguous slices
    of each global batch of `batch_size` rows; its input pipeline reads that slice.

    Processes whose devices hold the same rows (the batch replicated across processes, as when
    `tensor` spans them) get the same slice and read the same examples.
    """
    process_index = jax.process_index() if process_index is None else process_index
    rows = batch_sharding(mesh).devices_indices_map((batch_size,))
    return slice_of_process(
        {(d.process_index, *rows[d][0].indices(batch_size)[:2]) for d in mesh.devices.flat}, batch_size, process_index
    )


def slice_of_process(device_rows: set[tuple[int, int, int]], batch_size: int, process_index: int) -> tuple[int, int]:
    """`batch_slice` from each device's (process, first row, end row)."""
    held: dict[int, np.ndarray] = {}
    for process, start, stop in device_rows:
        held.setdefault(process, np.zeros(batch_size, bool))[start:stop] = True
    ranges = {}
    for process, mask in sorted(held.items()):
        rows = np.flatnonzero(mask)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if len(rows) != hi - lo:
            raise ValueError(
                f"process {process} holds rows {sorted((a, b) for p, a, b in device_rows if p == process)} of the "
                "batch, not one contiguous slice; order the mesh's devices process by process along the batch "
                "axes (config keys 'mesh.data', 'mesh.fsdp')."
            )
        ranges[process] = (lo, hi)
    slices = sorted(set(ranges.values()))
    width = batch_size // len(slices)
    if any(hi - lo != width or lo != i * width for i, (lo, hi) in enumerate(slices)):
        raise ValueError(
            f"the processes hold batch rows {slices} of {batch_size}: not equal slices that tile it; make "
            "mesh.data x mesh.fsdp a multiple of the process count or a divisor of it."
        )
    return slices.index(ranges[process_index]), len(slices)


def put_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh, *, batch_size: int, stacked: bool = False
) -> dict[str, jax.Array]:
    """This process's slice of the global batch (`batch_slice`) -> global arrays of `batch_size` rows,
    sharded over the batch axes. Processes that share a slice must pass the same rows.

    `stacked`: the leaves lead with an axis of steps, kept whole, before the batch axis.
    """
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    axis = int(stacked)

    def put(x: np.ndarray) -> jax.Array:
        global_shape = x.shape[:axis] + (batch_size,) + x.shape[axis + 1 :]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local_batch)
