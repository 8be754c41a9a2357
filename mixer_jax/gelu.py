"""GELU whose backward pass recomputes its derivative from the input alone.

Autodiff of `jax.nn.gelu` keeps intermediates of the forward pass (the tanh, or the erf) for the
backward pass. In a Mixer MLP that is a second activation-sized tensor per layer: one more write in
the forward pass and one more read in the backward pass, on the model's largest activations. Here the
backward pass keeps only the GELU's input, which the matmul before it wrote anyway, and recomputes
the derivative in the same pass that forms the input gradient. That is fewer bytes and a smaller
peak, for elementwise work that is free beside memory traffic.

The optimization barrier matters: without it, XLA's common-subexpression elimination merges the
backward pass's tanh with the forward pass's and stores it again, as a float32 residual.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_CUBIC = 0.044715  # The tanh form's cubic coefficient (Hendrycks & Gimpel, 2016).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """`jax.nn.gelu(x, approximate)` (the same forward values), with a backward pass that saves
    only `x`. Its derivative is computed in float32 and the input gradient has g's dtype."""
    return jax.nn.gelu(x, approximate=approximate)


def _forward(x: jax.Array, approximate: bool) -> tuple[jax.Array, jax.Array]:
    return gelu(x, approximate), x


def derivative(x: jax.Array, approximate: bool) -> jax.Array:
    """d gelu / dx at x, computed in float32."""
    x = x.astype(jnp.float32)
    if approximate:  # gelu = x/2 (1 + tanh u), u = sqrt(2/pi) (x + c x^3).
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * x * x)
    # gelu = x Phi(x): Phi(x) + x phi(x).
    return 0.5 * (1 + lax.erf(x / math.sqrt(2))) + x * jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _sigmoid_2u(x: jax.Array) -> jax.Array:
    """sigmoid(2u) = (1 + tanh u) / 2 for the tanh form's u, as 1 / sqrt(1 + 2^(-2u log2 e))^2: a
    power of two and a reciprocal square root, single instructions on GPUs (`ex2.approx`,
    `rsqrt.approx`), and no cancellation where 1 + tanh u is small."""
    e = jnp.exp2(-2 * _SQRT_2_OVER_PI * math.log2(math.e) * x * (1 + _CUBIC * x * x))
    r = lax.rsqrt(1 + e)
    return r * r


def sigmoid_form(x: jax.Array) -> jax.Array:
    """The tanh-form GELU as x * sigmoid(2u), in x's dtype (float32 in the Hopper kernels'
    epilogues): the same function, at least as accurate in float32 as 0.5 x (1 + tanh u)."""
    return x * _sigmoid_2u(x)


def sigmoid_form_derivative(x: jax.Array) -> jax.Array:
    """d gelu / dx of the tanh form, from s = sigmoid(2u): s + 2 x s (1 - s) u'(x)."""
    s = _sigmoid_2u(x)
    return s + 2 * _SQRT_2_OVER_PI * x * s * (1 - s) * (1 + 3 * _CUBIC * x * x)


def input_gradient(x: jax.Array, g: jax.Array, approximate: bool) -> jax.Array:
    """The gradient at the GELU's input x for the output cotangent g, in g's dtype: g * gelu'(x),
    recomputed from x in float32."""
    (x,) = lax.optimization_barrier((x,))  # Keeps XLA from reusing the forward pass's tanh.
    return (g.astype(jnp.float32) * derivative(x, approximate)).astype(g.dtype)


def _backward(approximate: bool, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (input_gradient(x, g, approximate),)


gelu.defvjp(_forward, _backward)
