"""A channel MLP's first Dense and its GELU as one Hopper kernel: h = x @ kernel + bias, y = gelu(h).

XLA runs this as a cuBLAS matmul that writes x @ kernel, then a pass that reads it back, adds the
bias and writes both h (for the backward pass) and gelu(h): two activation-sized passes over the
model's largest tensor. `dense_gelu` computes the bias and the GELU (tanh form) in the matmul's
epilogue, on the float32 accumulator, and writes h and y once each. It is a persistent,
warp-specialized Pallas Mosaic GPU kernel: one warpgroup feeds the shared-memory pipeline with TMA
copies, two issue WGMMAs, each on its own 128-column half of a block's 128 x 256 output tile.

Measured on an H100 (B/16 at batch 256: x (50176, 768), kernel (768, 3072), bfloat16; see
benchmarks/dense_gelu_gpu.py): 0.495 ms against 0.631 ms for XLA's matmul and pass (its matmul
alone: 0.321). Relative errors against a float32 reference: h 1.7e-3 and y 1.7e-3 (XLA: 2.3e-3 and
2.5e-3, since it rounds the product to bfloat16 before adding the bias).

The backward pass is XLA's (`gelu.input_gradient` and `matmul.xla_matmul`'s gradients); it keeps x and
h, as `gelu_backward="recompute"` does. Where the kernel does not apply (see `kernel_applies`), the
same function runs on XLA. Under `remat="dots"` the kernel's outputs are not dot outputs, so a
rematerialised block recomputes the whole kernel in its backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mixer_jax import gelu, matmul

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernel's tiling. A block computes an (m, 2n) output tile, one (m, n) half per compute
    warpgroup, over `stages` pipelined (m, k) and (k, 2n) operand tiles; the epilogue writes
    (epi_m, epi_n) pieces. `snake`: output tiles along N per band of the schedule (L2 reuse)."""

    m: int = 128
    n: int = 128
    k: int = 64
    stages: int = 3
    epi_m: int = 64
    epi_n: int = 64
    snake: int = 8


# Fits 227 KiB of shared memory: 3 x (128 x 64 + 64 x 256) operands plus 2 outputs x 2 warpgroups x
# 2 slots of 64 x 64, in bfloat16, and the float32 bias (209 KiB). The fastest of the tilings timed
# on an H100 (benchmarks/dense_gelu_gpu.py).
DEFAULT_TILES = Tiles()


def kernel_applies(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, int],
    dtype: Dtype,
    activations: Dtype = jnp.bfloat16,
    t: Tiles = DEFAULT_TILES,
) -> bool:
    """Whether `dense_gelu` runs the Hopper kernel for x of `x_shape` and `activations` dtype: one
    Hopper GPU (compute capability 9.0; the kernel is not partitioned over a mesh), bfloat16
    activations and matmul operands (`dtype`), rows (x's leading axes together) a multiple of `t.m`,
    an output width a multiple of `2 * t.n` and an input width a multiple of `t.k`."""
    if jax.default_backend() != "gpu" or jax.device_count() != 1:
        return False
    if jnp.dtype(dtype) != jnp.bfloat16 or jnp.dtype(activations) != jnp.bfloat16:
        return False
    if getattr(jax.devices()[0], "compute_capability", None) != "9.0":
        return False
    return _tiles_divide(math.prod(x_shape[:-1]), *kernel_shape, t)


def _tiles_divide(m: int, k: int, n: int, t: Tiles) -> bool:
    """Whether the tiles divide x (m, k) @ kernel (k, n)."""
    return m % t.m == 0 and k % t.k == 0 and n % (2 * t.n) == 0


def _kernel(x_gmem, w_gmem, b_gmem, h_gmem, y_gmem, *, t: Tiles):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    block_n = 2 * t.n
    m_iters, n_iters, k_iters = m // t.m, n // block_n, k // t.k

    def swizzled(minor: int) -> tuple[Any, ...]:
        swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
        return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((t.m, t.k), lambda i: (0, i), transforms=swizzled(t.k), memory_space=plgpu.SMEM),
                plgpu.BlockSpec((t.k, block_n), lambda i: (i, 0), transforms=swizzled(t.k), memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=t.stages,
            compute_context=compute_context,
        )

    def ignore(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        # (h or y, warpgroup, slot): each warpgroup alternates two slots, so that it fills one while
        # the TMA engine still reads the other.
        out_smem=plgpu.SMEM((2, 2, 2, t.epi_m, t.epi_n), dtype, transforms=swizzled(t.epi_n)),
        b_smem=plgpu.SMEM((2, t.n), jnp.float32),
        b_barrier=plgpu.Barrier(num_barriers=2),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, b_smem, b_barrier):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
        def _tile(info):
            (index,) = info.index
            mi, ni = plgpu.planar_snake(index, (m_iters, n_iters), 1, t.snake)
            columns = ni * block_n + wg * t.n  # This warpgroup's half of the block's tile.

            def compute_context(run_pipeline):
                # The bias of this tile's columns arrives while the matmul runs. Overwriting b_smem is
                # safe: the last tile's bias loads all came before its last `commit_smem`, which ends
                # in a barrier of the whole warpgroup.
                plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(columns, t.n)], b_smem.at[wg], b_barrier.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.m, t.n), jnp.float32))
                def _epilogue(acc_ref):
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    plgpu.barrier_wait(b_barrier.at[wg])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for em in range(t.m // t.epi_m):
                        for en in range(t.n // t.epi_n):
                            slot = (em * (t.n // t.epi_n) + en) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # The slot's last copies.
                            piece = acc[em * t.epi_m : (em + 1) * t.epi_m, en * t.epi_n : (en + 1) * t.epi_n]
                            bias = plgpu.load(
                                b_smem.at[wg, pl.ds(en * t.epi_n, t.epi_n)], (), layout=plgpu.Layout.WGMMA.reduce(0)
                            )
                            h = piece + lax.broadcast_in_dim(bias, piece.shape, [1])
                            out_smem[0, wg, slot] = h.astype(dtype)
                            out_smem[1, wg, slot] = jax.nn.gelu(h, approximate=True).astype(dtype)
                            plgpu.commit_smem()
                            rows = pl.ds(mi * t.m + em * t.epi_m, t.epi_m)
                            cols = pl.ds(columns + en * t.epi_n, t.epi_n)
                            # One copy group for both: the next wait covers the slot's pair.
                            plgpu.copy_smem_to_gmem(out_smem.at[0, wg, slot], h_gmem.at[rows, cols], commit_group=False)
                            plgpu.copy_smem_to_gmem(out_smem.at[1, wg, slot], y_gmem.at[rows, cols])

            def mma(_, x_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, pl.ds(wg * t.n, t.n)])
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, compute_context)(
                x_gmem.at[pl.ds(mi * t.m, t.m), :], w_gmem.at[:, pl.ds(ni * block_n, block_n)], allocations=allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def hopper_dense_gelu(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, t: Tiles = DEFAULT_TILES, num_sms: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(h, gelu(h)) with h = x @ kernel + bias, for 2-D bfloat16 x (M, K) and kernel (K, N) and a
    bias (N,) of any float dtype (added in float32). One block per SM (`num_sms`: the device's),
    each looping over output tiles. Raises ValueError for shapes the tiles do not divide."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (m, k), n = x.shape, kernel.shape[1]
    if t.m % t.epi_m or t.n % t.epi_n:
        raise ValueError(f"dense_gelu kernel: epilogue pieces {(t.epi_m, t.epi_n)} do not divide the tile {(t.m, t.n)}")
    if not _tiles_divide(m, k, n, t):
        raise ValueError(f"dense_gelu kernel: (M, K, N) = {(m, k, n)} is not a multiple of {(t.m, t.k, 2 * t.n)}")
    out = jax.ShapeDtypeStruct((m, n), x.dtype)
    call = plgpu.kernel(
        functools.partial(_kernel, t=t),
        out_type=(out, out),
        grid=(num_sms or jax.devices()[0].core_count,),
        grid_names=("cluster_grid",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return call(x, kernel.astype(x.dtype), bias.astype(jnp.float32))


def _forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype):
    xc = x.astype(dtype)
    if kernel_applies(x.shape, kernel.shape, dtype, x.dtype):
        h, y = hopper_dense_gelu(xc.reshape(-1, x.shape[-1]), kernel, bias)
        shape = (*x.shape[:-1], kernel.shape[1])
        h, y = h.reshape(shape), y.reshape(shape)
    else:
        h = matmul.xla_matmul(x, kernel, bias, False, dtype)
        y = jax.nn.gelu(h, approximate=True)
    return y, (xc, kernel, bias, h)


def _backward(dtype: Dtype, residuals: tuple[jax.Array, ...], g: jax.Array):
    xc, kernel, bias, h = residuals
    return matmul.xla_backward(dtype, (xc, kernel, bias), gelu.input_gradient(h, g, True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_gelu(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
    """gelu(x @ kernel + bias) (tanh form) over x's last axis, with matmul operands in `dtype` and the
    result in x's dtype: the Hopper kernel where `kernel_applies`, else `matmul.xla_matmul` and
    `jax.nn.gelu`. Gradients as `gelu.gelu(matmul.xla_matmul(...))`'s (the backward pass keeps x
    and h)."""
    return _forward(x, kernel, bias, dtype)[0]


dense_gelu.defvjp(_forward, _backward)
