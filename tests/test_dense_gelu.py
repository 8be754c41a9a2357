"""The fused Dense + GELU and the fused channel MLP: values and gradients against jax.numpy and the
unfused layers, their place in the model, and the two Hopper kernels: their lowering, their
semantics in Mosaic GPU's interpret mode on the CPU, and on an H100/H200 their numbers."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import config as config_lib
from mixer_jax import dense_gelu, gelu, matmul, models

F32, BF16 = jnp.float32, jnp.bfloat16
CLUSTERED = dataclasses.replace(dense_gelu.DEFAULT_TILES, cluster_m=True)


def operands(shape=(6, 4, 40), n=56, seed=0):
    kx, kk, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, shape)
    return x, 0.2 * jax.random.normal(kk, (shape[-1], n)), jax.random.normal(kb, (n,))


def loss(fn, num_operands=3):
    """A scalar whose gradient sends a non-uniform cotangent into `fn`, with its value and the
    gradients with respect to all `num_operands` operands."""

    def f(*args):
        y = fn(*args).astype(F32)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=F32).reshape(y.shape) / y.size)

    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(num_operands))))


def assert_same_value_and_gradients(got, want):
    """`loss` results equal: the value exactly, the gradients in the same dtypes and to 1e-6."""
    (got_value, got_grads), (want_value, want_grads) = got, want
    np.testing.assert_array_equal(got_value, want_value)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, F32), np.asarray(want, F32), rtol=1e-6, atol=1e-6)


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
    assert_same_value_and_gradients(fused(x, kernel, bias), unfused(x, kernel, bias))


def relative_error(got, want) -> float:
    got, want = np.asarray(got, F32), np.asarray(want, F32).reshape(np.shape(got))
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def mlp_operands(shape=(2, 128, 64), hidden=256, seed=0):
    """x, kernel_0, bias_0, kernel_1, bias_1 for a channel MLP whose shapes the kernels' tiles divide."""
    x, kernel_0, bias_0 = operands(shape, hidden, seed)
    kk, kb = jax.random.split(jax.random.key(seed + 1))
    return x, kernel_0, bias_0, 0.2 * jax.random.normal(kk, (hidden, shape[-1])), jax.random.normal(kb, (shape[-1],))


def mlp_loss(fn):
    return loss(fn, num_operands=5)


def unfused_mlp(x, kernel_0, bias_0, kernel_1, bias_1):
    h = gelu.gelu(matmul.xla_matmul(x, kernel_0, bias_0, False, BF16), True)
    return matmul.xla_matmul(h, kernel_1, bias_1, False, BF16)


def reference_mlp(x, kernel_0, bias_0, kernel_1, bias_1):
    return jnp.dot(reference(x, kernel_0, bias_0), kernel_1, precision="highest") + bias_1


@pytest.mark.parametrize("activations", [F32, BF16])
def test_mlp_equals_the_unfused_layers(activations):
    """Off the kernels, `mlp` is `xla_matmul(gelu(xla_matmul(...)))`, gradients included."""
    args = mlp_operands((6, 4, 40), 56)
    args = (args[0].astype(activations), *args[1:])
    assert_same_value_and_gradients(mlp_loss(lambda *a: dense_gelu.mlp(*a, BF16))(*args), mlp_loss(unfused_mlp)(*args))


def check_kernels(k: int, n: int, interpret: bool = False, t=dense_gelu.DEFAULT_TILES, rows: int = 384) -> None:
    """Both kernels with tiles `t` on x (rows, k) @ kernel (k, n) (2 blocks, or 2 clusters of 2;
    `interpret`: in interpret mode, with no race found) against float32: each result within
    bfloat16's rounding. Each block loops over many tiles (reusing its epilogue buffers and
    barriers); small k has fewer k-steps than pipeline stages, and n / 256 column tiles that the
    schedule's bands of 8 need not divide; the bias is large. Without h, the forward kernel writes
    the same gelu(h)."""
    x, kernel, bias = operands((rows // 128, 128, k), n, seed=k + n)
    x16, k16, bias = x.reshape(-1, k).astype(BF16), kernel.astype(BF16), 3 * bias
    product = jnp.dot(x16.astype(F32), k16.astype(F32), precision="highest")
    h_ref = product + bias
    run = dict(t=t, num_sms=2 * t.cluster, interpret=interpret)
    h, y = dense_gelu.hopper_dense_gelu(x16, k16, bias, **run)
    assert not (interpret and dense_gelu.interpret_races_found())
    assert relative_error(h, h_ref) < 4e-3 and relative_error(y, jax.nn.gelu(h_ref, approximate=True)) < 4e-3
    no_h, y_alone = dense_gelu.hopper_dense_gelu(x16, k16, bias, keep_h=False, **run)
    assert not (interpret and dense_gelu.interpret_races_found())
    assert no_h is None
    np.testing.assert_array_equal(y_alone, y)
    if not interpret:  # Without Pallas's automatic barriers (interpret mode has no barriers to drop).
        unguarded = dense_gelu.hopper_dense_gelu(x16, k16, bias, auto_barriers=False, **run)
        for got, want in zip(unguarded, (h, y), strict=True):
            np.testing.assert_array_equal(got, want)

    h16 = h_ref.astype(BF16)  # The GELU's input, as the forward pass stored it.
    dh_ref = product * gelu.derivative(h16, True)
    dh = dense_gelu.hopper_gelu_grad(x16, k16, h16, **run)
    assert not (interpret and dense_gelu.interpret_races_found())
    assert dh.dtype == BF16 and relative_error(dh, dh_ref) < 4e-3


def check_mlp_gradients(shape=(2, 128, 64), hidden=256) -> None:
    """`mlp` through both kernels (as `dense_gelu.kernel_applies` and the kernels are at the call)
    against float32: its output and all five gradients at least as close to float32's as the XLA
    path's, which rounds h's product and dy to bfloat16 before it adds the bias and applies the
    GELU's slope. The two bfloat16 paths differ from each other by as much as each differs from
    float32, so comparing them with each other would test nothing sharper."""
    x, *params = mlp_operands(shape, hidden, seed=hidden)
    x16 = x.astype(BF16)
    fused = [jax.jit(lambda *a: dense_gelu.mlp(*a, BF16))(x16, *params)]
    fused += mlp_loss(lambda *a: dense_gelu.mlp(*a, BF16))(x16, *params)[1]
    xla = [unfused_mlp(x16, *params), *mlp_loss(unfused_mlp)(x16, *params)[1]]
    exact = [reference_mlp(x16, *params), *mlp_loss(reference_mlp)(x16, *params)[1]]
    for got, alternative, want in zip(fused, xla, exact, strict=True):
        error, xla_error = relative_error(got, want), relative_error(alternative, want)
        assert error < 3e-2 and error <= 1.1 * xla_error, (error, xla_error)


def count_kernel_calls(monkeypatch, **kernel_kwargs) -> dict[str, int]:
    """Wraps both kernels with `kernel_kwargs` and counts their calls (traces), by name, and the
    forward kernel's calls that write gelu(h) alone under "hopper_dense_gelu(keep_h=False)"."""
    calls = {}

    def counted(name):
        kernel = getattr(dense_gelu, name)

        def call(*args, **kwargs):
            key = name if kwargs.get("keep_h", True) else f"{name}(keep_h=False)"
            calls[key] = calls.get(key, 0) + 1
            return kernel(*args, **kernel_kwargs, **kwargs)

        return call

    for name in ("hopper_dense_gelu", "hopper_gelu_grad"):
        monkeypatch.setattr(dense_gelu, name, counted(name))
    return calls


def test_kernels_in_interpret_mode():
    """Both kernels' arithmetic and tiling, run on the CPU in Mosaic GPU's interpret mode, whose race
    detector finds no two warpgroups or copies touching the same shared memory unordered. (Its
    copies to global memory complete at once, so it cannot see a missing wait for one.) With k 64,
    each tile is one pipeline step, and the epilogue's loads start in that step (3 tiles a block)."""
    check_kernels(128, 768, interpret=True)
    check_kernels(64, 512, interpret=True)


def test_mlp_through_the_kernels_in_interpret_mode(monkeypatch):
    monkeypatch.setattr(dense_gelu, "kernel_applies", lambda *a, **k: True)
    calls = count_kernel_calls(monkeypatch, num_sms=2, interpret=True)
    check_mlp_gradients()
    # The forward kernel for the value (without h) and in the gradient's forward pass; the backward
    # kernel in the latter.
    assert calls == {"hopper_dense_gelu(keep_h=False)": 1, "hopper_dense_gelu": 1, "hopper_gelu_grad": 1}
    # `dense_gelu` alone, outside a gradient: the kernel without h.
    calls.clear()
    x, kernel, bias = operands((2, 128, 64), 256)
    x16 = x.astype(BF16)
    got = jax.jit(lambda *a: dense_gelu.dense_gelu(*a, BF16))(x16, kernel, bias)
    assert calls == {"hopper_dense_gelu(keep_h=False)": 1}
    assert got.dtype == BF16 and relative_error(got, reference(x16, kernel, bias)) < 4e-3


def test_kernel_applies_only_on_one_hopper_gpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's answer")
    assert not dense_gelu.kernel_applies((196, 256, 768), (768, 3072), BF16)


@pytest.mark.parametrize("k,n", [(64, 1280), (128, 256), (768, 3072)])
def test_kernels_match_float32_on_hopper(k, n):
    """The kernels on the card, then `mlp`'s and `dense_gelu`'s gradients through them. The kernels
    round h once (float32 sum plus bias) and dh once (float32 product times the slope); the XLA path
    rounds each twice, so the kernels' gradients must be at least as close to float32's."""
    if not dense_gelu.kernel_applies((384, k), (k, n), BF16):
        pytest.skip("needs one H100/H200")
    check_kernels(k, n)
    with pytest.MonkeyPatch.context() as patch:
        calls = count_kernel_calls(patch)
        check_mlp_gradients((3, 128, k), n)
    assert calls == {"hopper_dense_gelu(keep_h=False)": 1, "hopper_dense_gelu": 1, "hopper_gelu_grad": 1}
    x, kernel, bias = operands((3, 128, k), n, seed=k + n)
    x16 = x.astype(BF16)
    fused = loss(lambda *a: dense_gelu.dense_gelu(*a, BF16))(x16, kernel, bias)
    unfused = loss(lambda x, k, b: gelu.gelu(matmul.xla_matmul(x, k, b, False, BF16), True))(x16, kernel, bias)
    exact = loss(reference)(x16, kernel, bias)
    for got, xla, want in zip(*(jax.tree.leaves(r) for r in (fused, unfused, exact)), strict=True):
        error, xla_error = relative_error(got, want), relative_error(xla, want)
        assert error < 3e-2 and error <= 1.1 * xla_error, (error, xla_error)


def test_clustered_kernels_match_float32_on_hopper():
    """`Tiles.cluster_m`: blocks in clusters of two that share the weight's tiles (TMA multicast),
    which interpret mode cannot run."""
    if not dense_gelu.kernel_applies((512, 768), (768, 1280), BF16, t=CLUSTERED):
        pytest.skip("needs one H100/H200")
    check_kernels(768, 1280, t=CLUSTERED, rows=512)


def test_kernels_lower_for_hopper_and_refuse_untiled_shapes():
    """Both kernels' Mosaic GPU lowering (layouts, shared memory within 227 KiB) runs without a GPU,
    at B/16's channel MLP at batch 256, with the exponential and reciprocal square root as single
    instructions by default and as the math library's on request."""
    x = jax.ShapeDtypeStruct((50176, 768), BF16)
    k = jax.ShapeDtypeStruct((768, 3072), BF16)
    b = jax.ShapeDtypeStruct((3072,), F32)
    h = jax.ShapeDtypeStruct((50176, 3072), BF16)
    forward, backward = (dense_gelu.hopper_dense_gelu, b), (dense_gelu.hopper_gelu_grad, h)
    library = dataclasses.replace(dense_gelu.DEFAULT_TILES, approx_math=False)
    for (kernel, operand), options, outputs in (
        (forward, {}, 2),
        (forward, dict(t=library), 2),
        (forward, dict(t=CLUSTERED), 2),
        (forward, dict(keep_h=False), 1),
        (forward, dict(auto_barriers=False), 2),
        (backward, {}, 1),
        (backward, dict(t=library), 1),
        (backward, dict(t=CLUSTERED), 1),
    ):
        fn = jax.jit(functools.partial(kernel, num_sms=132, **options))
        exported = jax.export.export(fn, platforms=["cuda"])(x, k, operand)
        module = exported.mlir_module()  # Rendered once: the kernel's module is large.
        assert "mosaic_gpu" in module
        approx = options.get("t", dense_gelu.DEFAULT_TILES).approx_math
        assert ("ex2.approx" in module) == ("rsqrt.approx" in module) == approx
        assert "tanh" not in module
        assert [o.shape for o in exported.out_avals] == [(50176, 3072)] * outputs
    x100, k100 = jnp.zeros((100, 768), BF16), jnp.zeros((768, 3072), BF16)
    with pytest.raises(ValueError, match=r"\(M, K, N\) = \(100, 768, 3072\) is not a multiple of \(128, 64, 256\)"):
        dense_gelu.hopper_dense_gelu(x100, k100, jnp.zeros(3072))
    with pytest.raises(ValueError, match=r"gelu_grad kernel: \(M, K, N\) = \(100, 768, 3072\)"):
        dense_gelu.hopper_gelu_grad(x100, k100, jnp.zeros((100, 3072), BF16))
    with pytest.raises(ValueError, match=r"h has shape \(128, 768\), not g @ kernel_t's \(128, 3072\)"):
        dense_gelu.hopper_gelu_grad(jnp.zeros((128, 768), BF16), k100, jnp.zeros((128, 768), BF16))
    x384 = jnp.zeros((384, 768), BF16)
    with pytest.raises(ValueError, match=r"\(M, K, N\) = \(384, 768, 3072\) is not a multiple of \(256, 64, 256\)"):
        dense_gelu.hopper_dense_gelu(x384, k100, jnp.zeros(3072), CLUSTERED)
    assert not dense_gelu._tiles_divide(384, 768, 3072, CLUSTERED) and dense_gelu._tiles_divide(
        512, 768, 3072, CLUSTERED
    )
    with pytest.raises(ValueError, match="num_sms=1 makes no cluster of 2 blocks"):
        dense_gelu.hopper_dense_gelu(jnp.zeros((512, 768), BF16), k100, jnp.zeros(3072), CLUSTERED, num_sms=1)
    with pytest.raises(NotImplementedError, match="interpret mode has no cluster barriers"):
        dense_gelu.hopper_dense_gelu(jnp.zeros((512, 768), BF16), k100, jnp.zeros(3072), CLUSTERED, interpret=True)


@pytest.mark.parametrize("dropout_rate", [0.0, 0.2])
def test_model_with_fused_matmuls_keeps_its_parameters_and_function(dropout_rate, monkeypatch):
    """The same parameters (names and initial values) and, off the kernels, the same values and
    gradients as `matmuls="xla"`. Without dropout each channel MLP is one `dense_gelu.mlp`; with
    dropout between its Dense layers, `dense_gelu.dense_gelu` and a Dense."""
    calls = []
    monkeypatch.setattr(dense_gelu, "mlp", lambda *a, mlp=dense_gelu.mlp: calls.append(1) or mlp(*a))
    xla = models.create(
        "Mu/4", num_classes=5, image_size=16, matmuls="xla", gelu_backward="recompute", dropout_rate=dropout_rate
    )
    fused = xla.clone(matmuls="fused")
    assert fused.fused_gelu and not xla.fused_gelu
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
    params = nn.unbox(xla.init(jax.random.key(0), x)["params"])
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(fused.init(jax.random.key(0), x)["params"]), params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)

    def value_and_grad(model):
        def loss(p):
            return jnp.sum(model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)}) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    calls.clear()
    (want, want_grads), (got, got_grads) = value_and_grad(xla), value_and_grad(fused)
    assert len(calls) == (0 if dropout_rate else xla.num_blocks)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got_grads, want_grads)


def test_fused_matmuls_need_the_tanh_gelu():
    with pytest.raises(ValueError, match="tanh GELU"):
        models.create("Mu/4", num_classes=5, image_size=16, matmuls="fused", gelu_approximate=False)
    c = config_lib.defaults()
    c.model.matmuls, c.model.gelu_approximate = "fused", False
    with pytest.raises(config_lib.ConfigError, match="model.matmuls' is 'fused'.*model.gelu_approximate=True"):
        config_lib.validate(c, num_devices=1, num_processes=1)
