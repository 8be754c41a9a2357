"""`dense_gelu`'s Hopper kernels against XLA on one channel MLP, on an H100 or H200.

    PYTHONPATH=. python benchmarks/dense_gelu_gpu.py [--rows=50176] [--width=768] [--hidden=3072]

Times (median of 5 x 20 calls), forward: XLA's matmul followed by its bias and GELU pass, XLA's
matmul alone, and `hopper_dense_gelu` in three tilings, in clusters, with the math library's
functions, without h, and without Pallas's automatic barriers. Backward: the GELU's input gradient
dh through the second Dense and the first bias's gradient, as XLA computes them (a matmul writes dy,
one pass forms dh and sums it) and with `hopper_gelu_grad` (dh in the matmul's epilogue, XLA's sum),
and the kernel alone, with the library's functions and in clusters. Prints one JSON line per
variant, with relative errors against a float32 reference. The defaults are B/16's channel MLP at
batch 256 (196 tokens x 256 images).
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import dense_gelu, gelu

BF16 = jnp.bfloat16
# The kernels with the math library's exponential and reciprocal square root instead of the default
# single instructions (ex2.approx, rsqrt.approx).
LIBRARY_MATH = dataclasses.replace(dense_gelu.DEFAULT_TILES, approx_math=False)
# Blocks in clusters of two along M that share each weight tile (TMA multicast).
CLUSTERED = dataclasses.replace(dense_gelu.DEFAULT_TILES, cluster_m=True)


def median_ms(f, *args, calls=20, rounds=5):
    out = jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50176)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=3072)
    a = parser.parse_args()
    m, k, n = a.rows, a.width, a.hidden
    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), BF16)
    w = (jax.random.normal(kw, (k, n)) / np.sqrt(k)).astype(BF16)
    b = 0.1 * jax.random.normal(kb, (n,))
    product = np.asarray(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest"))
    h_ref = product + np.asarray(b)
    y_ref = np.asarray(jax.nn.gelu(jnp.asarray(h_ref), approximate=True))

    def error(got, want):
        return float(np.linalg.norm(np.asarray(got, np.float32) - want) / np.linalg.norm(want))

    def variant(name, fn, *args, errors=lambda out: {}):
        """Times jit(fn)(*args) and prints it with `errors(out)`; a failure (say a tiling that does
        not fit this card's shared memory) prints its traceback's end instead."""
        try:
            ms, out = median_ms(jax.jit(fn), *args)
            tflops = round(2 * m * k * n / ms / 1e9, 1)
            print(json.dumps({"name": name, "ms": round(ms, 4), "tflops": tflops, **errors(out)}))
        except Exception:
            print(json.dumps({"name": name, "error": traceback.format_exc()[-800:]}))

    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": [m, k, n]}))

    def xla(x, w, b):  # The model's XLA path: a bfloat16 product, the bias in float32, GELU.
        h = (jnp.dot(x, w, preferred_element_type=BF16) + b).astype(BF16)
        return h, jax.nn.gelu(h, approximate=True)

    def forward_errors(out):
        h, y = out
        return {"err_y": error(y, y_ref), **({} if h is None else {"err_h": error(h, h_ref)})}

    variant("xla_matmul_bias_gelu", xla, x, w, b, errors=forward_errors)
    variant("xla_matmul", lambda x, w: jnp.dot(x, w, preferred_element_type=BF16), x, w)
    for name, options in (
        ("default", {}),
        ("snake4", dict(t=dataclasses.replace(dense_gelu.DEFAULT_TILES, snake=4))),
        ("n64_stages4", dict(t=dataclasses.replace(dense_gelu.DEFAULT_TILES, n=64, stages=4))),
        ("library_math", dict(t=LIBRARY_MATH)),
        ("cluster_m", dict(t=CLUSTERED)),
        ("without_h", dict(keep_h=False)),  # Evaluation's and inference's forward pass.
        ("no_auto_barriers", dict(auto_barriers=False)),
    ):
        variant(
            f"fused_{name}", functools.partial(dense_gelu.hopper_dense_gelu, **options), x, w, b, errors=forward_errors
        )

    # Backward: g, the cotangent of the second Dense's output (rows, width), through its kernel
    # transposed, (width, hidden): w's shape again.
    g = jax.random.normal(jax.random.key(1), (m, k), BF16)
    h = jnp.asarray(h_ref, BF16)
    dy_ref = np.asarray(jnp.dot(g.astype(jnp.float32), w.astype(jnp.float32), precision="highest"))
    dh_ref = dy_ref * np.asarray(gelu.derivative(h, True))
    db_ref = dh_ref.sum(0)

    def xla_grad(g, w, h):  # The model's XLA path: dy in bfloat16, then one pass for dh and its sum.
        dh = gelu.input_gradient(h, jnp.dot(g, w, preferred_element_type=BF16), True)
        return dh, jnp.sum(dh, 0, dtype=jnp.float32)

    def fused_grad(g, w, h):
        dh = dense_gelu.hopper_gelu_grad(g, w, h)
        return dh, jnp.sum(dh, 0, dtype=jnp.float32)

    for name, fn in (("xla_grad_and_bias_grad", xla_grad), ("fused_grad_and_bias_grad", fused_grad)):
        variant(
            name, fn, g, w, h, errors=lambda out: {"err_dh": error(out[0], dh_ref), "err_db": error(out[1], db_ref)}
        )
    for name, t in (("", dense_gelu.DEFAULT_TILES), ("_library_math", LIBRARY_MATH), ("_cluster_m", CLUSTERED)):
        fn = functools.partial(dense_gelu.hopper_gelu_grad, t=t)
        variant(f"fused_grad_alone{name}", fn, g, w, h, errors=lambda dh: {"err_dh": error(dh, dh_ref)})


if __name__ == "__main__":
    main()
