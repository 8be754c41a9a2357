"""`layer_norm.LayerNorm`: nn.LayerNorm's values, gradients equal to autodiff of an independent
reference, from the input and two numbers per row alone, in the model too."""

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from mixer_jax import config as config_lib
from mixer_jax import layer_norm, models, train

F32, BF16 = jnp.float32, jnp.bfloat16


def inputs(dtype=F32):
    """(tokens, batch, channels) activations with row means far from zero, and non-trivial
    parameters and cotangent."""
    k = jax.random.split(jax.random.key(0), 5)
    x = 2 * jax.random.normal(k[0], (7, 3, 48)) + 5 * jax.random.normal(k[1], (7, 3, 1))
    scale = 1 + 0.5 * jax.random.normal(k[2], (48,))
    bias = 0.5 * jax.random.normal(k[3], (48,))
    return x.astype(dtype), scale, bias, jax.random.normal(k[4], x.shape)


def test_matches_flax_and_reference():
    x, scale, bias, cotangent = inputs()
    got, got_vjp = jax.vjp(layer_norm.layer_norm, x, scale, bias)
    flax_out = nn.LayerNorm(epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(got, flax_out, rtol=1e-6, atol=1e-6)
    want, want_vjp = jax.vjp(reference.layer_norm, x, scale, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_module_parameters_and_dtype():
    x, *_ = inputs()
    module = layer_norm.LayerNorm(dtype=BF16)
    params = module.init(jax.random.key(0), x)["params"]
    reference_params = nn.LayerNorm().init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference_params)
    assert module.apply({"params": params}, x).dtype == BF16


@pytest.mark.parametrize("dtype", [None, F32, BF16])
def test_bfloat16_input_matches_flax(dtype):
    """A bfloat16 input: nn.LayerNorm's values and output dtype (None: promoted with float32
    parameters, so float32)."""
    x, scale, bias, _ = inputs(BF16)
    variables = {"params": {"scale": scale, "bias": bias}}
    got = layer_norm.LayerNorm(dtype=dtype).apply(variables, x)
    want = nn.LayerNorm(epsilon=1e-6, dtype=dtype).apply(variables, x)
    assert got.dtype == want.dtype == (dtype or F32)
    tol = 1e-2 if dtype == BF16 else 1e-5
    np.testing.assert_allclose(got.astype(F32), want.astype(F32), rtol=tol, atol=tol)


def test_bfloat16_gradient_dtypes():
    x, scale, bias, cotangent = inputs(BF16)

    def loss(f, x, scale, bias):
        return jnp.vdot(f(x, scale, bias).astype(F32), cotangent)

    got = jax.grad(lambda *a: loss(layer_norm.layer_norm, *a), argnums=(0, 1, 2))(x, scale, bias)
    assert [g.dtype for g in got] == [BF16, F32, F32]
    want = jax.grad(lambda *a: loss(reference.layer_norm, *a), argnums=(0, 1, 2))(x.astype(F32), scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.astype(F32), w, rtol=2e-2, atol=2e-2)


def test_backward_keeps_only_the_input_and_row_statistics(capsys):
    """The residuals for the backward pass: x, the parameters and two (rows, 1) statistics; autodiff
    of nn.LayerNorm keeps three more activation-sized tensors."""
    x, scale, bias, _ = inputs()
    jax.ad_checkpoint.print_saved_residuals(layer_norm.layer_norm, x, scale, bias)
    saved = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in saved) == sorted(
        ["f32[7,3,48]", "f32[48]", "f32[48]", "f32[7,3,1]", "f32[7,3,1]"]
    ), saved
    assert "from the argument" in next(line for line in saved if line.startswith("f32[7,3,48]"))


@pytest.mark.parametrize(
    "overrides,tol",
    [({}, 1e-4), ({"scan_blocks": True, "remat": "full"}, 1e-4), ({"dtype": BF16}, 5e-2)],
    ids=["float32", "scan_remat", "bfloat16"],
)
def test_model_gradients_equal_either_way(overrides, tol):
    kwargs = dict(num_classes=5, image_size=16, **overrides)
    saved = models.create("Mu/4", layer_norm_backward="saved", **kwargs)
    recompute = models.create("Mu/4", layer_norm_backward="recompute", **kwargs)
    assert not saved.recompute_layer_norm and recompute.recompute_layer_norm
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    params = nn.unbox(saved.init(jax.random.key(1), images))["params"]
    recompute_params = nn.unbox(recompute.init(jax.random.key(1), images))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(recompute_params)
    head = params["head"]
    head["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), head["kernel"].shape, head["kernel"].dtype)

    def loss(model):
        f = lambda p: jnp.sum(model.apply({"params": p}, images).astype(F32) ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    (want, want_grads), (got, got_grads) = loss(saved), loss(recompute)
    np.testing.assert_allclose(got, want, rtol=tol)
    # Relative to the gradients' scale: some are zero but for rounding (a bias before a LayerNorm).
    atol = tol * max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=atol)


def test_auto_and_config_errors():
    on_cpu = jax.default_backend() == "cpu"
    assert models.create("Mu/4", num_classes=5, image_size=16).recompute_layer_norm == on_cpu
    assert models.create("Mu/4", num_classes=5, image_size=16, matmul_dtype=BF16).recompute_layer_norm == on_cpu
    assert not models.create("Mu/4", num_classes=5, image_size=16, dtype=BF16).recompute_layer_norm
    with pytest.raises(ValueError, match="layer_norm_backward 'fast' is not one of"):
        models.create("Mu/4", num_classes=5, image_size=16, layer_norm_backward="fast")
    c = config_lib.defaults()
    c.model.layer_norm_backward = "fast"
    with pytest.raises(
        ValueError, match="config key 'model.layer_norm_backward' is 'fast'; allowed: auto, saved, recompute"
    ):
        config_lib.validate(c, num_devices=1, num_processes=1)
    c.model.layer_norm_backward = "saved"
    assert not train.create_model(c).recompute_layer_norm


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barriers address XLA:CPU's fusion")
def test_barriers_and_recompute_lower_the_compiled_peak(monkeypatch):
    """XLA's temporary memory for a training gradient: the recomputed backward pass needs less than
    autodiff's, and less with its optimization barriers than without them (XLA:CPU then writes the
    shared broadcasts of the statistics and scale out at the activations' size)."""
    images = jnp.zeros((16, 16, 16, 3))

    def temp_bytes(layer_norm_backward):
        model = models.create("Mu/4", num_classes=5, image_size=16, layer_norm_backward=layer_norm_backward)
        params = nn.unbox(model.init(jax.random.key(0), images))["params"]
        grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images))))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    saved, recompute = temp_bytes("saved"), temp_bytes("recompute")
    monkeypatch.setattr(layer_norm.lax, "optimization_barrier", lambda tree: tree)
    without_barriers = temp_bytes("recompute")
    assert recompute < 0.95 * saved and recompute < 0.95 * without_barriers, (recompute, saved, without_barriers)
