"""The channel MLP's first Dense and its GELU as Hopper kernels, forward and backward.

Forward, h = x @ kernel + bias, y = gelu(h): XLA runs a cuBLAS matmul that writes x @ kernel, then
a pass that reads it back, adds the bias and writes both h (for the backward pass) and gelu(h): two
activation-sized passes over the model's largest tensor. `hopper_dense_gelu` computes the bias and
the GELU (the tanh form, as `gelu.sigmoid_form`) in the matmul's epilogue, on the float32
accumulator, and writes h and y once each.

Backward, through the Dense after the GELU: XLA's matmul writes dy = g @ kernel_1^T, then a pass
reads dy and h back to write dh = dy * gelu'(h) and sum the bias gradient. `hopper_gelu_grad` forms
dh in the matmul's epilogue from the float32 product and the h tile it loaded during the matmul:
dy is never stored, nor rounded before the GELU's slope. XLA sums dh for the bias gradient.

Both are one persistent, warp-specialized Pallas Mosaic GPU kernel body with different epilogues:
one warpgroup feeds the shared-memory pipeline with TMA copies, two issue WGMMAs, each on its own
128-column half of a block's 128 x 256 output tile. `dense_gelu` is the forward kernel behind a
custom VJP; `mlp`, the whole channel MLP without dropout, uses both kernels. Outside a gradient
(evaluation, inference) the forward kernel writes gelu(h) alone. `interpret=True` runs either kernel
on the CPU in Mosaic GPU's interpret mode (tests/test_dense_gelu.py).

Measured on an H100 (B/16 at batch 256: x (50176, 768), kernel (768, 3072), bfloat16; see
benchmarks/dense_gelu_gpu.py), before the epilogue took its present form (the GELU from the math
library's tanh then, the bias read per piece): the forward kernel 0.495 ms against 0.631 ms for XLA's
matmul and pass (its matmul alone: 0.321). Relative errors against a float32 reference: h 1.7e-3
and y 1.7e-3 (XLA: 2.3e-3 and 2.5e-3, since it rounds the product to bfloat16 before adding the
bias). The backward kernel, and the epilogues as they are now, have been checked on the CPU only,
in interpret mode and through their lowering.

Where the kernels do not apply (see `kernel_applies`), the same functions run on XLA, with the
gradients of `gelu.gelu` (recomputed from h) and `matmul.xla_matmul`. Under `remat="dots"` the
kernels' outputs are not dot outputs, so a rematerialised block recomputes them in its backward
pass.
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
    (epi_m, epi_n) pieces. `snake`: output tiles along N per band of the schedule (L2 reuse).

    `cluster_m`: blocks run in clusters of two on adjacent row tiles, which share each (k, 2n)
    tile of the weight: the two load half of it each and multicast it to both, so a block reads
    a third less from L2 per step. Rows must then be a multiple of 2m.

    `approx_math`: the epilogue's exponential and reciprocal square root (the GELU as
    `gelu.sigmoid_form`) as the single instructions `ex2.approx` and `rsqrt.approx` (relative
    errors near 2^-22), instead of the math library's longer sequences. `tanh.approx.f32`, one
    instruction for the whole tanh, is off by up to 2^-11, which lets gelu'(-3) be off by 20%."""

    m: int = 128
    n: int = 128
    k: int = 64
    stages: int = 3
    epi_m: int = 64
    epi_n: int = 64
    snake: int = 8
    approx_math: bool = True
    cluster_m: bool = False

    @property
    def cluster(self) -> int:
        """Blocks per cluster."""
        return 2 if self.cluster_m else 1


# Both kernels fit 227 KiB of shared memory: 3 x (128 x 64 + 64 x 256) bfloat16 operands (144 KiB),
# plus in the forward kernel 2 outputs x 2 warpgroups x 2 slots of 64 x 64 in bfloat16 and the
# float32 bias (209 KiB in all), in the backward kernel each warpgroup's 128 x 128 h tile (208 KiB).
# The fastest of the forward kernel's tilings timed on an H100 (benchmarks/dense_gelu_gpu.py).
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
    activations and matmul operands (`dtype`), rows (x's leading axes together) a multiple of `t.m`
    (`2 * t.m` in clusters), an output width a multiple of `2 * t.n` and an input width a multiple
    of `t.k`."""
    if jax.default_backend() != "gpu" or jax.device_count() != 1:
        return False
    if jnp.dtype(dtype) != jnp.bfloat16 or jnp.dtype(activations) != jnp.bfloat16:
        return False
    if getattr(jax.devices()[0], "compute_capability", None) != "9.0":
        return False
    return _tiles_divide(math.prod(x_shape[:-1]), *kernel_shape, t)


def _tiles_divide(m: int, k: int, n: int, t: Tiles) -> bool:
    """Whether the tiles divide x (m, k) @ kernel (k, n)."""
    return m % (t.cluster * t.m) == 0 and k % t.k == 0 and n % (2 * t.n) == 0


def _swizzled(dtype: Dtype, minor: int) -> tuple[Any, ...]:
    """Shared-memory transforms for a tile whose minor dimension has `minor` elements of `dtype`:
    tiled and swizzled as TMA and WGMMA want it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _load(ref, layout, interpret: bool) -> jax.Array:
    """A shared-memory ref's value in registers of `layout`. Interpret mode has no `plgpu.load`, and
    its arrays have no layouts."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def _persistent_matmul(x_gmem, w_gmem, *, t: Tiles, scratch: dict[str, Any], prefetch, epilogue) -> None:
    """The body both kernels share: each block loops over (t.m, 2 t.n) output tiles of x @ w, in
    bands of `t.snake` column tiles. Each compute warpgroup accumulates its (t.m, t.n) half in
    float32 over pipelined (t.m, t.k) and (t.k, 2 t.n) operand tiles that a third warpgroup loads.

    `scratch`: the epilogue's shared memory (`pl.run_scoped` allocations, one set for both compute
    warpgroups). Per tile, `prefetch(refs, mi, columns, wg)` starts the epilogue's loads during the
    matmul's second step (its first, if it has only one), and `epilogue(refs, acc, mi, columns, wg)`
    consumes the accumulator: `mi` is the tile's row block, `columns` the first column of warpgroup
    `wg`'s half."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    block_n = 2 * t.n
    m_iters, n_iters, k_iters = m // (t.cluster * t.m), n // block_n, k // t.k  # Tiles of a cluster.
    # In clusters along M, each weight tile is multicast to both blocks.
    shared = ("cluster",) if t.cluster_m else ()

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (t.m, t.k), lambda i: (0, i), transforms=_swizzled(x_gmem.dtype, t.k), memory_space=plgpu.SMEM
                ),
                plgpu.BlockSpec(
                    (t.k, block_n),
                    lambda i: (i, 0),
                    transforms=_swizzled(w_gmem.dtype, t.k),
                    memory_space=plgpu.SMEM,
                    collective_axes=shared,
                ),
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
        collective_axes="wg",
        **scratch,
    )
    def _scope(allocs, **refs):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
        def _tile(info):
            (index,) = info.index
            mi, ni = plgpu.planar_snake(index, (m_iters, n_iters), 1, t.snake)
            if t.cluster_m:  # This block's row tile of the cluster's two.
                mi = mi * t.cluster + lax.axis_index("cluster")
            columns = ni * block_n + wg * t.n  # This warpgroup's half of the block's tile.

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.m, t.n), jnp.float32))
                def _epilogue(acc_ref):
                    run_pipeline(acc_ref)
                    epilogue(refs, acc_ref[...], mi, columns, wg)

            def mma(indices, x_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, pl.ds(wg * t.n, t.n)])

                # The epilogue's loads start while the tile's second step multiplies: by then the last
                # tile's stores, which may read the buffers they load into, have had a step to drain.
                @pl.when(indices[0] == min(1, k_iters - 1))
                def _():
                    prefetch(refs, mi, columns, wg)

                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, compute_context)(
                x_gmem.at[pl.ds(mi * t.m, t.m), :], w_gmem.at[:, pl.ds(ni * block_n, block_n)], allocations=allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _dense_gelu_kernel(x_gmem, w_gmem, b_gmem, *out_gmem, t: Tiles, interpret: bool):
    """h = x @ w + b and y = gelu(h), written from the float32 accumulator: `out_gmem` is (h, y), or
    (y,) alone."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    scratch = dict(
        # (output, warpgroup, slot): each warpgroup alternates two slots, so that it fills one while
        # the TMA engine still reads the other.
        out_smem=plgpu.SMEM((len(out_gmem), 2, 2, t.epi_m, t.epi_n), dtype, transforms=_swizzled(dtype, t.epi_n)),
        b_smem=plgpu.SMEM((2, t.n), jnp.float32),
        b_barrier=plgpu.Barrier(num_barriers=2),
    )

    def prefetch(refs, mi, columns, wg):
        # The bias of this tile's columns arrives while the matmul runs. Overwriting b_smem is safe:
        # the last tile's bias loads all came before its last `commit_smem`, which ends in a barrier
        # of the whole warpgroup.
        plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(columns, t.n)], refs["b_smem"].at[wg], refs["b_barrier"].at[wg])

    def epilogue(refs, acc, mi, columns, wg):
        out_smem, b_smem = refs["out_smem"], refs["b_smem"]
        plgpu.barrier_wait(refs["b_barrier"].at[wg])
        bias = [  # Each piece's columns, read once per tile.
            _load(b_smem.at[wg, pl.ds(en * t.epi_n, t.epi_n)], plgpu.Layout.WGMMA.reduce(0), interpret)
            for en in range(t.n // t.epi_n)
        ]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for em in range(t.m // t.epi_m):
            for en in range(t.n // t.epi_n):
                slot = (em * (t.n // t.epi_n) + en) % 2
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # The slot's last copies.
                piece = acc[em * t.epi_m : (em + 1) * t.epi_m, en * t.epi_n : (en + 1) * t.epi_n]
                h = piece + lax.broadcast_in_dim(bias[en], piece.shape, [1])
                values = (h, gelu.sigmoid_form(h))[-len(out_gmem) :]
                for i, value in enumerate(values):
                    out_smem[i, wg, slot] = value.astype(dtype)
                plgpu.commit_smem()
                rows = pl.ds(mi * t.m + em * t.epi_m, t.epi_m)
                cols = pl.ds(columns + en * t.epi_n, t.epi_n)
                # One copy group for the slot's outputs: the next wait covers them all.
                for i, gmem in enumerate(out_gmem):
                    last = i == len(out_gmem) - 1
                    plgpu.copy_smem_to_gmem(out_smem.at[i, wg, slot], gmem.at[rows, cols], commit_group=last)

    _persistent_matmul(x_gmem, w_gmem, t=t, scratch=scratch, prefetch=prefetch, epilogue=epilogue)


def _gelu_grad_kernel(g_gmem, w_gmem, h_gmem, dh_gmem, *, t: Tiles, interpret: bool):
    """dh = (g @ w) * gelu'(h) from the float32 accumulator. Each warpgroup's h tile arrives during
    its matmul, as (t.n // t.epi_n) column strips of (t.m, t.epi_n), and the epilogue overwrites it
    with dh before storing it.

    The bias gradient (dh's column sums) is left to XLA: a sum over rows in registers needs Mosaic's
    cross-warp reduction, whose shared scratch both compute warpgroups would use at once."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = g_gmem.dtype
    strips = t.n // t.epi_n
    scratch = dict(
        h_smem=plgpu.SMEM((2, strips, t.m, t.epi_n), dtype, transforms=_swizzled(dtype, t.epi_n)),
        h_barrier=plgpu.Barrier(num_barriers=2 * strips),
    )

    def prefetch(refs, mi, columns, wg):
        # The last tile's stores read h_smem: wait for them before loading over it.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for s in range(strips):
            plgpu.copy_gmem_to_smem(
                h_gmem.at[pl.ds(mi * t.m, t.m), pl.ds(columns + s * t.epi_n, t.epi_n)],
                refs["h_smem"].at[wg, s],
                refs["h_barrier"].at[wg * strips + s],
            )

    def epilogue(refs, acc, mi, columns, wg):
        h_smem = refs["h_smem"]
        for s in range(strips):
            plgpu.barrier_wait(refs["h_barrier"].at[wg * strips + s])
            for em in range(t.m // t.epi_m):
                rows = pl.ds(em * t.epi_m, t.epi_m)
                dy = acc[em * t.epi_m : (em + 1) * t.epi_m, s * t.epi_n : (s + 1) * t.epi_n]
                # In the accumulator's layout, so that each thread rewrites just the elements it read.
                h = _load(h_smem.at[wg, s, rows], plgpu.Layout.WGMMA, interpret)
                h_smem[wg, s, rows] = (dy * gelu.sigmoid_form_derivative(h.astype(jnp.float32))).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    h_smem.at[wg, s, rows],
                    dh_gmem.at[pl.ds(mi * t.m + em * t.epi_m, t.epi_m), pl.ds(columns + s * t.epi_n, t.epi_n)],
                )

    _persistent_matmul(g_gmem, w_gmem, t=t, scratch=scratch, prefetch=prefetch, epilogue=epilogue)


def _check_tiles(name: str, m: int, k: int, n: int, t: Tiles) -> None:
    if t.m % t.epi_m or t.n % t.epi_n or t.epi_m % 8:  # Pieces of whole (8, 64) swizzle tiles.
        raise ValueError(
            f"{name} kernel: epilogue pieces {(t.epi_m, t.epi_n)} do not divide the tile {(t.m, t.n)} "
            "in rows of a multiple of 8"
        )
    if not _tiles_divide(m, k, n, t):
        multiple = (t.cluster * t.m, t.k, 2 * t.n)
        raise ValueError(f"{name} kernel: (M, K, N) = {(m, k, n)} is not a multiple of {multiple}")


def _call(
    body, out_type, t: Tiles, num_sms: int | None, interpret: bool, *operands: jax.Array, auto_barriers: bool = True
):
    """Runs a kernel body with one block per SM (`num_sms`: the device's) and three warpgroups each.
    `interpret`: on the CPU, in Mosaic GPU's interpret mode (its semantics, not its speed), with its
    race detector on (`interpret_races_found`), where `approx_math` changes nothing.
    `auto_barriers=False`: Mosaic GPU's `unsafe_no_auto_barriers`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    params = None
    if interpret:  # Not yet exported by jax.experimental.pallas.mosaic_gpu (nor below).
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        if t.cluster_m:
            raise NotImplementedError("Mosaic GPU's interpret mode has no cluster barriers: run cluster_m on a GPU")
        params = InterpretGPUParams(detect_races=True)
    cluster = dict(cluster=(t.cluster,), cluster_names=("cluster",)) if t.cluster_m else {}
    blocks = num_sms or jax.devices()[0].core_count
    if blocks < t.cluster:
        raise ValueError(f"num_sms={blocks} makes no cluster of {t.cluster} blocks: give at least {t.cluster}")
    call = plgpu.kernel(
        functools.partial(body, interpret=interpret),
        out_type=out_type,
        grid=(blocks // t.cluster,),
        grid_names=("cluster_grid",),
        **cluster,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
            approx_math=t.approx_math,
            unsafe_no_auto_barriers=not auto_barriers,
        ),
        interpret=params,
    )
    return call(*operands)


def interpret_races_found() -> bool:
    """Whether the last kernel run in interpret mode had a data race on its shared memory (the
    detector also prints it)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    return gpu_callbacks._races is not None and gpu_callbacks._races.races_found


def hopper_dense_gelu(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    t: Tiles = DEFAULT_TILES,
    num_sms: int | None = None,
    interpret: bool = False,
    keep_h: bool = True,
    auto_barriers: bool = True,
) -> tuple[jax.Array | None, jax.Array]:
    """(h, gelu(h)) with h = x @ kernel + bias, for 2-D bfloat16 x (M, K) and kernel (K, N) and a
    bias (N,) of any float dtype (added in float32). `keep_h=False` writes gelu(h) alone (and
    returns None for h): half the kernel's writes where no backward pass needs h. One block per SM
    (`num_sms`: the device's), each looping over output tiles; `interpret` runs it on the CPU.
    Raises ValueError for shapes the tiles do not divide.

    `auto_barriers=False` drops the warpgroup barriers Pallas puts around each shared-memory store
    (21 of the lowered kernel's 31 barrier instructions, most in the epilogue every tile runs). This
    kernel meets the conditions of `unsafe_no_auto_barriers`: its threads only write the output
    buffers and only read the bias, whose reads all precede the `commit_smem` (a fence and a
    barrier) before the next tile's load over it. Not yet timed, so off."""
    (m, k), n = x.shape, kernel.shape[1]
    _check_tiles("dense_gelu", m, k, n, t)
    outs = (jax.ShapeDtypeStruct((m, n), x.dtype),) * (2 if keep_h else 1)
    body = functools.partial(_dense_gelu_kernel, t=t)
    operands = (x, kernel.astype(x.dtype), bias.astype(jnp.float32))
    results = _call(body, outs, t, num_sms, interpret, *operands, auto_barriers=auto_barriers)
    return tuple(results) if keep_h else (None, results[0])


def hopper_gelu_grad(
    g: jax.Array,
    kernel_t: jax.Array,
    h: jax.Array,
    t: Tiles = DEFAULT_TILES,
    num_sms: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The GELU's input gradient through the Dense after it, for 2-D bfloat16 g (M, K), kernel_t
    (K, N) (that Dense's kernel, transposed) and the GELU's input h (M, N): dh = (g @ kernel_t) *
    gelu'(h) (tanh form) in g's dtype, rounded once. The rest as `hopper_dense_gelu`."""
    (m, k), n = g.shape, kernel_t.shape[1]
    _check_tiles("gelu_grad", m, k, n, t)
    if h.shape != (m, n):
        raise ValueError(f"gelu_grad kernel: h has shape {h.shape}, not g @ kernel_t's {(m, n)}")
    out = jax.ShapeDtypeStruct((m, n), g.dtype)
    body = functools.partial(_gelu_grad_kernel, t=t)
    return _call(body, out, t, num_sms, interpret, g, kernel_t.astype(g.dtype), h.astype(g.dtype))


def _forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype, keep_h: bool = True):
    """gelu(h) and the residuals of `_backward`; without `keep_h` (no backward pass follows) the
    kernel does not write h."""
    xc = x.astype(dtype)
    if kernel_applies(x.shape, kernel.shape, dtype, x.dtype):
        h, y = hopper_dense_gelu(xc.reshape(-1, x.shape[-1]), kernel, bias, keep_h=keep_h)
        shape = (*x.shape[:-1], kernel.shape[1])
        h, y = h if h is None else h.reshape(shape), y.reshape(shape)
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
    and h; without one, the kernel writes gelu(h) alone)."""
    return _forward(x, kernel, bias, dtype, keep_h=False)[0]


dense_gelu.defvjp(_forward, _backward)


def _mlp_forward(x, kernel_0, bias_0, kernel_1, bias_1, dtype, keep_h=True):
    y, (xc, _, _, h) = _forward(x, kernel_0, bias_0, dtype, keep_h)
    z = matmul.xla_matmul(y, kernel_1, bias_1, False, dtype)
    return z, (xc, kernel_0, bias_0, h, y.astype(dtype), kernel_1, bias_1)


def _mlp_backward(dtype: Dtype, residuals: tuple[jax.Array, ...], g: jax.Array):
    xc, kernel_0, bias_0, h, yc, kernel_1, bias_1 = residuals
    dy, dkernel_1, dbias_1 = matmul.xla_backward(dtype, (yc, kernel_1, bias_1), g)
    if kernel_applies(g.shape, kernel_1.T.shape, dtype, g.dtype):
        # dy's matmul is the kernel's (XLA drops the unused one) and its epilogue forms dh from the
        # float32 product: dy is neither written nor read back, nor rounded before the GELU's slope.
        dh = hopper_gelu_grad(g.reshape(-1, g.shape[-1]).astype(dtype), kernel_1.T, h.reshape(-1, h.shape[-1]))
        dh = dh.reshape(h.shape)
    else:
        dh = gelu.input_gradient(h, dy, True)
    dx, dkernel_0, dbias_0 = matmul.xla_backward(dtype, (xc, kernel_0, bias_0), dh)
    return dx, dkernel_0, dbias_0, dkernel_1, dbias_1


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def mlp(
    x: jax.Array, kernel_0: jax.Array, bias_0: jax.Array, kernel_1: jax.Array, bias_1: jax.Array, dtype: Dtype
) -> jax.Array:
    """The channel MLP without dropout, gelu(x @ kernel_0 + bias_0) @ kernel_1 + bias_1 over x's last
    axis (tanh GELU), with matmul operands in `dtype` and the result in x's dtype. Where
    `kernel_applies`, two Hopper kernels: `hopper_dense_gelu` in the forward pass, and in the
    backward pass `hopper_gelu_grad`, the second Dense's input gradient with the GELU's in its
    epilogue. Elsewhere, and for the other matmuls, XLA's, with gradients as
    `matmul.xla_matmul(gelu.gelu(matmul.xla_matmul(...)), ...)`'s. The backward pass keeps x, h and
    gelu(h); without one (evaluation, inference), the forward kernel writes gelu(h) alone."""
    return _mlp_forward(x, kernel_0, bias_0, kernel_1, bias_1, dtype, keep_h=False)[0]


mlp.defvjp(_mlp_forward, _mlp_backward)
