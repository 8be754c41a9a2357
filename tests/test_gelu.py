"""`gelu.gelu`: autodiff's values and gradients, from the saved input alone, in the model too."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import config as config_lib
from mixer_jax import gelu, models, train

F32, BF16 = jnp.float32, jnp.bfloat16


def inputs(dtype=F32):
    x = 3 * jax.random.normal(jax.random.key(0), (64, 48))
    return jnp.concatenate([x, jnp.array([[-30.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 30.0] + [1.0] * 41])]).astype(dtype)


@pytest.mark.parametrize("approximate", [True, False])
def test_matches_autodiff(approximate):
    x = inputs()
    cotangent = jax.random.normal(jax.random.key(1), x.shape)
    want, want_vjp = jax.vjp(lambda x: jax.nn.gelu(x, approximate=approximate), x)
    got, got_vjp = jax.vjp(lambda x: gelu.gelu(x, approximate), x)
    np.testing.assert_array_equal(got, want)  # The forward pass is jax.nn.gelu itself.
    np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("approximate", [True, False])
def test_derivative_against_finite_differences(approximate):
    """Central differences in float64 numpy of the closed forms, independent of jax's autodiff. The
    absolute tolerance covers float32's 1 + tanh(u) for u << 0 (jax.nn.gelu's own form), which
    rounds derivatives below about 3e-6 to zero."""
    from math import erf

    x = np.linspace(-6, 6, 241)
    h = 1e-5
    if approximate:
        f = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    else:
        f = lambda x: 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    want = (f(x + h) - f(x - h)) / (2 * h)
    np.testing.assert_allclose(gelu.derivative(jnp.asarray(x, F32), approximate), want, rtol=1e-5, atol=5e-6)


def test_sigmoid_form_is_the_tanh_form():
    """`sigmoid_form` (the Hopper kernels' GELU) and its derivative against the tanh form's closed
    forms in float64: within float32's rounding (0.5 x (1 + tanh u) in float32 loses up to 3e-4 of
    small values to cancellation), and finite up to |x| = 1e4 (beyond about 1e19, x * x overflows,
    as in `derivative`)."""
    x = np.concatenate([np.linspace(-12, 12, 4801), [-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]])
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    want = 0.5 * x * (1 + np.tanh(u))
    want_derivative = 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * np.sqrt(2 / np.pi) * (
        1 + 3 * 0.044715 * x**2
    )
    xf = jnp.asarray(x, F32)
    np.testing.assert_allclose(gelu.sigmoid_form(xf), want, rtol=3e-6, atol=1e-6)
    np.testing.assert_allclose(gelu.sigmoid_form_derivative(xf), want_derivative, rtol=1e-4, atol=3e-6)


def test_bfloat16_gradient_dtype():
    x = inputs(BF16)
    g = jax.grad(lambda x: jnp.sum(gelu.gelu(x, True).astype(F32)))(x)
    assert g.dtype == BF16
    want = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True)))(x.astype(F32))
    np.testing.assert_allclose(g.astype(F32), want, rtol=1e-2, atol=1e-2)


def test_backward_recomputes_the_tanh():
    """Compiled forward + backward of dense -> GELU -> dense: two tanh ops, one per pass. Without the
    optimization barrier XLA merges them into one whose value is kept for the backward pass."""

    def loss(w1, w2, x):
        return jnp.sum(gelu.gelu(x @ w1, True) @ w2)

    shapes = [jax.ShapeDtypeStruct(s, F32) for s in ((16, 32), (32, 16), (8, 16))]
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile().as_text()
    assert len(re.findall(r"= f32\[[\d,]*\]\S* tanh\(", hlo)) == 2


@pytest.mark.parametrize("approximate", [True, False])
def test_model_gradients_equal_either_way(approximate):
    kwargs = dict(num_classes=5, image_size=16, gelu_approximate=approximate)
    saved = models.create("Mu/4", gelu_backward="saved", **kwargs)
    recompute = models.create("Mu/4", gelu_backward="recompute", **kwargs)
    assert not saved.recompute_gelu and recompute.recompute_gelu
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    params = nn.unbox(saved.init(jax.random.key(1), images))["params"]
    params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))(params)

    (want, want_grads), (got, got_grads) = loss(saved), loss(recompute)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grads, want_grads)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto(backend, monkeypatch):
    """auto recomputes where it measured faster: on GPU, and for float32 matmuls on CPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    float32, bf16_matmuls, bf16 = (
        models.create("Mu/4", num_classes=5, image_size=16, **kw).recompute_gelu
        for kw in ({}, {"matmul_dtype": BF16}, {"dtype": BF16})
    )
    assert (float32, bf16_matmuls, bf16) == {
        "cpu": (True, False, False),
        "gpu": (True, True, True),
        "tpu": (False, False, False),
    }[backend]


def test_config_errors():
    with pytest.raises(ValueError, match="gelu_backward 'fast' is not one of"):
        models.create("Mu/4", num_classes=5, image_size=16, gelu_backward="fast")
    c = config_lib.defaults()
    c.model.gelu_backward = "fast"
    with pytest.raises(ValueError, match="config key 'model.gelu_backward' is 'fast'; allowed: auto, saved, recompute"):
        config_lib.validate(c, num_devices=1, num_processes=1)
    c.model.gelu_backward = "saved"
    assert not train.create_model(c).recompute_gelu
