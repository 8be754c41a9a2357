"""LayerNorm whose backward pass keeps only its input and two numbers per row.

Autodiff of `nn.LayerNorm` keeps three activation-sized tensors for the backward pass: 2x (the
square's derivative), x - mean and the normalised input before the scale. Here the backward pass
keeps only x, which the residual stream holds anyway, and each row's mean and 1/std, and recomputes
the normalised input in the passes that form the gradients:

    x_hat = (x - mean) * rstd,   g_hat = g * scale,
    dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)),
    d_scale = sum over rows of g * x_hat,   d_bias = sum over rows of g.

The optimization barriers keep XLA from sharing broadcasts of the small statistics and parameters
between the forward and the backward pass: XLA:CPU writes such a shared broadcast out at the
activations' size, once per LayerNorm, for its reduction kernels. Reverse mode only (`custom_vjp`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = jnp.dtype | type


def _statistics(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Each row's mean and 1/sqrt(var + epsilon) over the last axis, float32, shaped (..., 1).
    var = E[x^2] - E[x]^2, as `nn.LayerNorm` computes it (`use_fast_variance`)."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    return mean, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float = 1e-6, dtype: Dtype | None = None
) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis: `nn.LayerNorm`'s values,
    computed in float32 and returned in `dtype` (default x's dtype)."""
    return _forward(x, scale, bias, epsilon, dtype)[0]


def _forward(x, scale, bias, epsilon, dtype):
    x32 = x.astype(jnp.float32)
    mean, rstd = lax.optimization_barrier(_statistics(x32, epsilon))
    y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype or x.dtype), (x, mean, rstd, scale, bias)


def _backward(epsilon, dtype, residuals, g):
    del epsilon, dtype
    x, bias = residuals[0], residuals[-1]
    mean, rstd, scale = lax.optimization_barrier(residuals[1:-1])
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    d_scale = jnp.sum(g * x_hat, rows)
    d_bias = jnp.sum(g, rows)
    g_hat = g * scale.astype(jnp.float32)
    dx = rstd * (g_hat - jnp.mean(g_hat, -1, keepdims=True) - x_hat * jnp.mean(g_hat * x_hat, -1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis with `layer_norm`'s backward pass. The same parameters
    (`scale`, `bias`), so the two load each other's checkpoints, and the same output dtype: `dtype`,
    or with None x's dtype promoted with `param_dtype`."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))
