"""The plain-layout dense matmul: values and gradients against jax.numpy, and the dots XLA:CPU runs."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import matmul, models

F32, BF16 = jnp.float32, jnp.bfloat16


def operands(leading, m=24, k=40, n=56, seed=0):
    kx, kk, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (k, m) if leading else (m, k))
    return x, 0.2 * jax.random.normal(kk, (k, n)), jax.random.normal(kb, (n,))


def reference(x, kernel, bias, leading):
    return kernel.T @ x + bias[:, None] if leading else x @ kernel + bias


def loss(fn):
    """A scalar whose gradient sends a non-uniform cotangent into `fn`."""

    def f(x, kernel, bias):
        y = fn(x, kernel, bias).astype(F32)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=F32).reshape(y.shape) / y.size)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


@pytest.mark.parametrize("leading", [False, True])
@pytest.mark.parametrize("impl", [matmul.dense_matmul, matmul.xla_matmul])
def test_float32_matches_reference(impl, leading):
    x, kernel, bias = operands(leading)
    got_value, got_grads = loss(lambda *a: impl(*a, leading, F32))(x, kernel, bias)
    want_value, want_grads = loss(lambda *a: reference(*a, leading))(x, kernel, bias)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == F32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("leading", [False, True])
@pytest.mark.parametrize("activations", [F32, BF16])
@pytest.mark.parametrize("impl", [matmul.dense_matmul, matmul.xla_matmul])
def test_bfloat16_operands(impl, activations, leading):
    """bfloat16 operands, float32 accumulation: the result has x's dtype, float32 parameters get
    float32 gradients, and everything is within bfloat16 rounding of the float32 reference. With
    float32 activations the product of the rounded operands is not rounded again."""
    x, kernel, bias = operands(leading)
    x = x.astype(activations)
    y = impl(x, kernel, bias, leading, BF16)  # Op by op: jit would let XLA skip a bf16 rounding.
    assert y.dtype == activations
    want = reference(x.astype(BF16).astype(F32), kernel.astype(BF16).astype(F32), bias, leading)
    if activations == F32:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    else:
        np.testing.assert_allclose(y.astype(F32), want, rtol=2e-2, atol=2e-2)
    _, grads = loss(lambda *a: impl(*a, leading, BF16))(x, kernel, bias)
    _, want_grads = loss(lambda *a: reference(*a, leading))(x.astype(F32), kernel, bias)
    assert [g.dtype for g in grads] == [activations, F32, F32]
    for got, want in zip(grads, want_grads, strict=True):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got.astype(F32), want, atol=3e-2 * scale)


@pytest.mark.parametrize("activations", [F32, BF16])
def test_xla_matmul_takes_leading_axes(activations):
    """x (tokens, batch, K): the value and all three gradients of the 2-D form on merged rows (to
    float32 rounding; with bfloat16 activations XLA may round the two programs' products apart)."""
    tol = 1e-5 if activations == F32 else 2e-2
    x, kernel, bias = operands(False, m=24)
    x3 = x.reshape(4, 6, -1).astype(activations)
    got_value, got_grads = loss(lambda *a: matmul.xla_matmul(*a, False, BF16))(x3, kernel, bias)
    want_value, want_grads = loss(lambda *a: matmul.xla_matmul(*a, False, BF16))(x3.reshape(24, -1), kernel, bias)
    np.testing.assert_allclose(got_value, want_value, rtol=tol)
    assert got_grads[0].shape == x3.shape
    for got, want in zip(got_grads, want_grads, strict=True):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got.astype(F32).reshape(want.shape), want.astype(F32), atol=tol * scale)


def dots(hlo: str) -> list[tuple[str, str, str, str]]:
    """(lhs type, rhs type, result type, dimension numbers) of every dot in optimized HLO text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\), (lhs_\S+ rhs_\S+)", line)
        if m:
            found.append((types.get(m.group(2)), types.get(m.group(3)), m.group(1), m.group(4).rstrip(",")))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot lowering")
@pytest.mark.parametrize("leading", [False, True])
def test_every_dot_is_plain_bfloat16(leading):
    """Forward and backward: three matmuls and the bias gradient, each bf16 x bf16 -> f32 in the
    plain (M, K) x (K, N) layout that XLA:CPU hands to its bf16 kernels. XLA's own layouts upcast
    the transposed ones to float32 (checked, so that this test notices when that changes)."""
    x, kernel, bias = operands(leading, m=64, k=48, n=80)
    x = x.astype(BF16)
    plain = dots(loss(lambda *a: matmul.dense_matmul(*a, leading, BF16)).lower(x, kernel, bias).compile().as_text())
    assert len(plain) == 4
    assert all(d == ("bf16", "bf16", "f32", "lhs_contracting_dims={1}, rhs_contracting_dims={0}") for d in plain), plain
    folded = dots(loss(lambda *a: matmul.xla_matmul(*a, leading, BF16)).lower(x, kernel, bias).compile().as_text())
    assert any(d[:2] != ("bf16", "bf16") for d in folded), folded


def test_model_matmul_options():
    """`matmuls` and `matmul_dtype`: the same parameters, the same function in float32 either way,
    plain layouts chosen automatically for bfloat16 operands on CPU, and bad values refused."""
    kwargs = dict(num_classes=5, image_size=16)
    xla = models.create("Mu/4", matmuls="xla", **kwargs)
    plain = models.create("Mu/4", matmuls="plain", **kwargs)
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
    params = nn.unbox(xla.init(jax.random.key(0), images)["params"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(plain.init(jax.random.key(0), images)["params"]))
    labels = jax.nn.one_hot(jnp.arange(3), 5)

    def value_and_grad(model):
        def f(p):
            return jnp.mean((model.apply({"params": p}, images) - labels) ** 2)

        return jax.jit(jax.value_and_grad(f))(params)

    (want, want_grads), (got, got_grads) = value_and_grad(xla), value_and_grad(plain)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)

    mixed = models.create("Mu/4", matmul_dtype=BF16, **kwargs)
    assert mixed.operand_dtype == BF16 and mixed.plain_matmuls == (jax.default_backend() == "cpu")
    assert not models.create("Mu/4", **kwargs).plain_matmuls
    value, grads = value_and_grad(mixed)
    np.testing.assert_allclose(value, want, rtol=0.05)
    assert all(g.dtype == F32 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="matmuls 'fast' is not one of"):
        models.create("Mu/4", matmuls="fast", **kwargs)


@pytest.mark.parametrize("dtype,matmul_dtype", [(BF16, None), (F32, BF16)])
@pytest.mark.parametrize("matmuls", ["xla", "plain"])
def test_every_model_dot_has_matmul_dtype_operands(dtype, matmul_dtype, matmuls):
    """In the lowered forward+backward of the whole model, before any backend pass, both operands of
    every Mixer-layer dot are in the matmul dtype: no float32 cotangent drags a backward matmul into
    float32 (only the head is float32, in every policy)."""
    model = models.create("Mu/4", num_classes=5, image_size=16, dtype=dtype, matmul_dtype=matmul_dtype, matmuls=matmuls)
    images = jnp.zeros((2, 16, 16, 3))
    params = nn.unbox(model.init(jax.random.key(0), images)["params"])
    text = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images).sum())).lower(params).as_text()
    operand_types = re.findall(r"stablehlo\.dot_general .*: \(tensor<[\dx]+x(\w+)>, tensor<[\dx]+x(\w+)>\)", text)
    layer_dots = 3 * 4 * model.num_blocks + 2  # Forward, dx, dk per Dense; the stem needs no dx.
    if matmuls == "plain":
        layer_dots += 4 * model.num_blocks + 1  # Bias gradients as matmuls with ones.
    # The head (nn.Dense, float32 whatever the dtype): dx and dk; the gradient of a sum does not need
    # its forward product.
    head = [("f32", "f32")] * 2
    assert sorted(operand_types) == sorted([("bf16", "bf16")] * layer_dots + head)
