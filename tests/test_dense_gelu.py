"""The fused Dense + GELU: values and gradients against jax.numpy and the unfused layer, its place in
the model, and the Hopper kernel's lowering (the kernel itself runs only on an H100/H200)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import config as config_lib
from mixer_jax import dense_gelu, gelu, matmul, models

F32, BF16 = jnp.float32, jnp.bfloat16


def operands(shape=(6, 4, 40), n=56, seed=0):
    kx, kk, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, shape)
    return x, 0.2 * jax.random.normal(kk, (shape[-1], n)), jax.random.normal(kb, (n,))


def loss(fn):
    """A scalar whose gradient sends a non-uniform cotangent into `fn`."""

    def f(x, kernel, bias):
        y = fn(x, kernel, bias).astype(F32)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=F32).reshape(y.shape) / y.size)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def reference(x, kernel, bias):
    """gelu(x @ kernel + bias), tanh form, in float32 at full precision."""
    return jax.nn.gelu(jnp.dot(x.astype(F32), kernel, precision="highest") + bias, approximate=True)


def test_float32_matches_jax_numpy():
    x, kernel, bias = operands()
    with jax.default_matmul_precision("float32"):  # Not TF32 on a GPU.
        got_value, got_grads = loss(lambda *a: dense_gelu.dense_gelu(*a, F32))(x, kernel, bias)
    want_value, want_grads = loss(reference)(x, kernel, bias)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == F32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activations", [F32, BF16])
def test_equals_the_unfused_layer(activations):
    """Off the kernel, the same forward values as `gelu.gelu(matmul.xla_matmul(...))` and the same
    gradients, in each gradient's dtype (bfloat16 activations: dx bfloat16, kernel and bias float32)."""
    x, kernel, bias = operands()
    x = x.astype(activations)
    fused = loss(lambda *a: dense_gelu.dense_gelu(*a, BF16))
    unfused = loss(lambda x, k, b: gelu.gelu(matmul.xla_matmul(x, k, b, False, BF16), True))
    (got_value, got_grads), (want_value, want_grads) = fused(x, kernel, bias), unfused(x, kernel, bias)
    np.testing.assert_array_equal(got_value, want_value)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, F32), np.asarray(want, F32), rtol=1e-6, atol=1e-6)


def test_kernel_applies_only_on_one_hopper_gpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's answer")
    assert not dense_gelu.kernel_applies((196, 256, 768), (768, 3072), BF16)


@pytest.mark.parametrize("k,n", [(64, 1280), (128, 256), (768, 3072)])
def test_kernel_matches_float32_on_hopper(k, n):
    """Few blocks (each loops over many tiles: the bias buffer and its barrier are reused), fewer
    k-steps than pipeline stages, column tiles that the schedule's bands do not divide, a large
    bias; then the gradients through the kernel against float32's, next to the XLA path's.

    The kernel rounds h once (float32 sum plus bias), the XLA path twice (the product, then the
    sum with the bias), so the kernel's gradients must be at least as close to float32's. The two
    bfloat16 paths differ from each other by as much as each differs from float32 (2.2% in the bias
    gradient at K=768), so comparing them with each other would test nothing sharper."""
    if not dense_gelu.kernel_applies((384, k), (k, n), BF16):
        pytest.skip("needs one H100/H200")
    x, kernel, bias = operands((3, 128, k), n, seed=k + n)
    bias = 3 * bias
    x16, k16 = x.astype(BF16), kernel.astype(BF16)
    h_ref = jnp.dot(x16.astype(F32), k16.astype(F32), precision="highest") + bias
    h, y = dense_gelu.hopper_dense_gelu(x16.reshape(-1, k), k16, bias, num_sms=2)
    for got, want in ((h, h_ref), (y, jax.nn.gelu(h_ref, approximate=True))):
        want = np.asarray(want).reshape(got.shape)
        assert np.isfinite(np.asarray(got, F32)).all()
        assert np.linalg.norm(np.asarray(got, F32) - want) / np.linalg.norm(want) < 4e-3
    fused = loss(lambda *a: dense_gelu.dense_gelu(*a, BF16))(x16, kernel, bias)
    unfused = loss(lambda x, k, b: gelu.gelu(matmul.xla_matmul(x, k, b, False, BF16), True))(x16, kernel, bias)
    exact = loss(reference)(x16, kernel, bias)
    for got, xla, want in zip(*(jax.tree.leaves(r) for r in (fused, unfused, exact)), strict=True):
        got, xla, want = (np.asarray(a, F32) for a in (got, xla, want))
        error, xla_error = (np.linalg.norm(a - want) / np.linalg.norm(want) for a in (got, xla))
        assert error < 3e-2 and error <= 1.1 * xla_error, (error, xla_error)


def test_kernel_lowers_for_hopper_and_refuses_untiled_shapes():
    """The kernel's Mosaic GPU lowering (layouts, shared memory within 227 KiB) runs without a GPU."""
    x = jax.ShapeDtypeStruct((50176, 768), BF16)  # B/16's channel MLP at batch 256.
    k = jax.ShapeDtypeStruct((768, 3072), BF16)
    b = jax.ShapeDtypeStruct((3072,), F32)
    exported = jax.export.export(
        jax.jit(lambda x, k, b: dense_gelu.hopper_dense_gelu(x, k, b, num_sms=132)), platforms=["cuda"]
    )(x, k, b)
    assert "mosaic_gpu" in exported.mlir_module()
    assert [o.shape for o in exported.out_avals] == [(50176, 3072)] * 2
    with pytest.raises(ValueError, match=r"\(M, K, N\) = \(100, 768, 3072\) is not a multiple of \(128, 64, 256\)"):
        dense_gelu.hopper_dense_gelu(jnp.zeros((100, 768), BF16), jnp.zeros((768, 3072), BF16), jnp.zeros(3072))


def test_model_with_fused_matmuls_keeps_its_parameters_and_function():
    xla = models.create("Mu/4", num_classes=5, image_size=16, matmuls="xla", gelu_backward="recompute")
    fused = xla.clone(matmuls="fused")
    assert fused.fused_gelu and not xla.fused_gelu
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
    params = nn.unbox(xla.init(jax.random.key(0), x)["params"])
    assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(fused.init(jax.random.key(0), x)["params"]))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)

    def value_and_grad(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x, train=True) ** 2)))(params)

    (want, want_grads), (got, got_grads) = value_and_grad(xla), value_and_grad(fused)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got_grads, want_grads)


def test_fused_matmuls_need_the_tanh_gelu():
    with pytest.raises(ValueError, match="tanh GELU"):
        models.create("Mu/4", num_classes=5, image_size=16, matmuls="fused", gelu_approximate=False)
    c = config_lib.defaults()
    c.model.matmuls, c.model.gelu_approximate = "fused", False
    with pytest.raises(config_lib.ConfigError, match="model.matmuls' is 'fused'.*model.gelu_approximate=True"):
        config_lib.validate(c, num_devices=1, num_processes=1)
