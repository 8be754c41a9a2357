"""Dense-layer matmuls in the plain (M, K) x (K, N) layout, forward and backward.

XLA folds transposes into dots: the backward pass of `x @ kernel` becomes dots that contract a
transposed operand. On GPU and TPU that is free. XLA:CPU, though, gives a bfloat16 dot to its fast
library kernels (YNNPACK, which uses AMX on recent Intel CPUs) only in the plain layout with row-major
operands and a float32 result, and runs every other bfloat16 dot in float32. `dense_matmul` keeps all
three matmuls of a layer plain: its custom VJP copies each transposed operand into a fresh row-major
buffer that XLA cannot fold back into the dot. With bfloat16 operands and float32 activations, S/16
trains 1.9-2.4x faster than in float32 on a 2-core Sapphire Rapids CPU; with XLA's layouts,
bfloat16 is slower than float32 there.

Both `dense_matmul` and `xla_matmul` accumulate in float32. `dense_matmul` also returns the kernel's
and bias's gradients straight from float32 accumulators, so float32 parameters get unrounded
gradients.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def fresh_transpose(a: jax.Array) -> jax.Array:
    """`a.T` for a 2-D `a`, copied into a new row-major buffer.

    A plain `a.T` reaches XLA as a layout change that the dot absorbs. Broadcasting it to a new
    leading axis gives it a fresh row-major layout; the optimization barrier keeps the simplifier
    from turning the pair back into a transpose that the dot would absorb.
    """
    rows, cols = a.shape
    fresh = lax.broadcast_in_dim(a.T, (1, cols, rows), (1, 2))
    return lax.optimization_barrier(fresh)[0]


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _ones(rows: int, cols: int, dtype: Dtype) -> jax.Array:
    """Ones to sum a bias gradient with a matmul (float32 sums in the plain layout; XLA:CPU would
    reduce a strided axis of a float32 copy instead). Two rows or columns, not one: XLA treats a
    single one as a transposed vector and gives that dot a float32 kernel."""
    return jnp.ones((rows, cols), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dense_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array, leading: bool, dtype: Dtype) -> jax.Array:
    """A dense layer's affine map with matmul operands in `dtype`, float32 accumulation and the bias
    added in float32; the result has x's dtype.

    `leading=False`: x (M, K) @ kernel (K, N) + bias (N,) -> (M, N), a Dense over the last axis.
    `leading=True`: kernel (K, N)^T @ x (K, M) + bias[:, None] -> (N, M), a Dense over the leading
    axis (token mixing on tokens-major activations).
    """
    return _forward(x, kernel, bias, leading, dtype)[0]


def _affine(x, kernel, bias, leading, dtype, transpose):
    """(y, x in `dtype`): the forward map shared by both paths; `transpose` lays out k^T."""
    xc, kc, b = x.astype(dtype), kernel.astype(dtype), bias.astype(jnp.float32)
    y = _dot(transpose(kc), xc) + b[:, None] if leading else _dot(xc, kc) + b
    return y.astype(x.dtype), xc


def _forward(x, kernel, bias, leading, dtype):
    y, xc = _affine(x, kernel, bias, leading, dtype, fresh_transpose)
    return y, (xc, kernel, bias)


def _backward(leading, dtype, residuals, g):
    xc, kernel, bias = residuals
    kc, gc = kernel.astype(dtype), g.astype(dtype)
    if leading:  # y = k^T x + b: dx = k g, dk = x g^T, db = g 1.
        dx, dk, db = _dot(kc, gc), _dot(xc, fresh_transpose(gc)), _dot(gc, _ones(gc.shape[1], 2, dtype))[:, 0]
    else:  # y = x k + b: dx = g k^T, dk = x^T g, db = 1^T g.
        dx, dk, db = (
            _dot(gc, fresh_transpose(kc)),
            _dot(fresh_transpose(xc), gc),
            _dot(_ones(2, gc.shape[0], dtype), gc)[0],
        )
    # y has x's dtype, so its cotangent g has it too.
    return dx.astype(g.dtype), dk.astype(kernel.dtype), db.astype(bias.dtype)


dense_matmul.defvjp(_forward, _backward)


def xla_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array, leading: bool, dtype: Dtype) -> jax.Array:
    """`dense_matmul`'s contract with the layouts left to XLA (it folds the transpose into the dot)."""
    return _affine(x, kernel, bias, leading, dtype, jnp.transpose)[0]
