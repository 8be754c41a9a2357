"""The Mixer against an independent jax.numpy forward pass, exact parameter counts, and properties."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from mixer_jax import models

# Exact counts with a 1000-class head (B/16: the official 59,880,472), and Table 1 without the head.
PARAMS_WITH_HEAD = {
    "S/32": 19_104_624,
    "S/16": 18_528_264,
    "B/32": 60_293_428,
    "B/16": 59_880_472,
    "L/32": 206_939_264,
    "L/16": 208_196_168,
    "H/14": 432_350_952,
}
TABLE1_MILLIONS = {"S/32": 19, "S/16": 18, "B/32": 60, "B/16": 59, "L/32": 206, "L/16": 207, "H/14": 431}


def random_params(model, image_size, seed=0, scale=0.05):
    """Initialised params, then perturbed everywhere (the head and biases start at zero)."""
    x = jnp.zeros((1, image_size, image_size, 3))
    params = nn.unbox(model.init(jax.random.key(seed), x)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return treedef.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])


def images(n, size, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


@pytest.mark.parametrize("variant,size", [("Mu/4", 16), ("Ti/4", 16), ("Ti/8", 32), ("S/32", 64)])
@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("layer_norm_backward", ["saved", "recompute"])
def test_matches_reference_small(variant, size, approximate, layer_norm_backward):
    model = models.create(
        variant,
        num_classes=7,
        image_size=size,
        gelu_approximate=approximate,
        layer_norm_backward=layer_norm_backward,
    )
    params = random_params(model, size)
    x = images(3, size)
    got = jax.jit(model.apply)({"params": params}, x)
    want = jax.jit(lambda p, x: reference.forward(p, x, approximate=approximate))(reference.flatten(params), x)
    assert got.shape == (3, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matches_reference_b16_224():
    model = models.create("B/16", num_classes=1000)
    # Random parameters drawn in numpy from the init's shapes (B/16's eager init takes 10 s): normal
    # with a std of 0.05 around 1 for LayerNorm scales, around 0 for the rest.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (path[-1].key == "scale") + rng.normal(0, 0.05, s.shape).astype(np.float32), shapes
    )
    x = images(2, 224)
    got = jax.jit(model.apply)({"params": params}, x)
    want = jax.jit(lambda p, x: reference.forward(p, x))(reference.flatten(params), x)
    assert np.abs(want).max() > 0.1  # Non-trivial logits.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", models.PAPER_VARIANTS)
def test_parameter_counts(variant):
    model = models.create(variant, num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    shapes = nn.unbox(shapes)
    total = sum(x.size for x in jax.tree.leaves(shapes))
    assert total == PARAMS_WITH_HEAD[variant]
    head = sum(x.size for x in jax.tree.leaves(shapes["head"]))
    assert round((total - head) / 1e6) == TABLE1_MILLIONS[variant]


def test_official_parameter_names():
    model = models.create("Mu/4", num_classes=10, image_size=16)
    params = random_params(model, 16)
    keys = set(reference.flatten(params))
    block = {f"{m}/{p}" for m in ("LayerNorm_0", "LayerNorm_1") for p in ("scale", "bias")}
    block |= {
        f"{m}/Dense_{i}/{p}" for m in ("token_mixing", "channel_mixing") for i in (0, 1) for p in ("kernel", "bias")
    }
    want = {
        "stem/kernel",
        "stem/bias",
        "pre_head_layer_norm/scale",
        "pre_head_layer_norm/bias",
        "head/kernel",
        "head/bias",
    }
    want |= {f"MixerBlock_{i}/{k}" for i in range(2) for k in block}
    assert keys == want


def test_every_weight_has_logical_axes():
    model = models.create("Mu/4", num_classes=10, image_size=16)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree.leaves(nn.unbox(boxed))
    assert len(specs) == len(shapes) == 2 * 12 + 6
    for spec, shape in zip(specs, shapes, strict=True):
        assert len(spec) == len(shape.shape) and all(a in models.LOGICAL_AXES for a in spec)


def test_token_permutation_equivariance():
    """Permuting the patches of the image and the token-mixing weights alike leaves logits unchanged."""
    size, p = 16, 4
    model = models.create("Ti/4", num_classes=5, image_size=size)
    params = random_params(model, size)
    x = images(2, size)
    grid = size // p
    perm = np.random.default_rng(0).permutation(grid * grid)

    tiles = x.reshape(2, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, grid * grid, p, p, 3)
    tiles = tiles[:, perm]  # Token t of the new image is token perm[t] of the old one.
    x_perm = tiles.reshape(2, grid, grid, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, size, size, 3)

    permuted = jax.tree.map(lambda a: a, params)
    for i in range(model.num_blocks):
        tm = permuted[f"MixerBlock_{i}"]["token_mixing"]
        tm["Dense_0"]["kernel"] = tm["Dense_0"]["kernel"][perm, :]
        tm["Dense_1"]["kernel"] = tm["Dense_1"]["kernel"][:, perm]
        tm["Dense_1"]["bias"] = tm["Dense_1"]["bias"][perm]

    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(model.apply({"params": permuted}, x_perm), base, rtol=1e-5, atol=1e-5)
    # The weights matter: permuting only the image changes the logits.
    assert np.abs(model.apply({"params": params}, x_perm) - base).max() > 1e-3


def test_image_size_errors():
    with pytest.raises(ValueError, match="image_size 225 is not divisible by patch 16"):
        models.create("B/16", num_classes=10, image_size=225)
    model = models.create("Mu/4", num_classes=10, image_size=16)
    params = random_params(model, 16)
    with pytest.raises(ValueError, match="built for image_size 16"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="not divisible by patch 4"):
        model.apply({"params": params}, jnp.zeros((1, 18, 18, 3)))
    # As many tokens (2x8) as the model's 4x4 grid, but not its grid.
    with pytest.raises(ValueError, match="a 2x8 grid .* resize the images to 16x16"):
        model.apply({"params": params}, jnp.zeros((1, 8, 32, 3)))


def test_bfloat16_compute_keeps_the_head_in_float32():
    """The logits and the head's gradients are float32 sums, not rounded to bfloat16: the head bias's
    gradient is the batch mean of softmax - labels, computed here in float64 from the same logits."""
    model = models.create("Mu/4", num_classes=10, image_size=16, dtype=jnp.bfloat16)
    params = random_params(model.clone(dtype=jnp.float32), 16, scale=0.5)  # The same float32 parameters.
    labels = jax.nn.one_hot(np.arange(64) % 10, 10)

    def loss(p):
        logits = model.apply({"params": p}, images(64, 16))
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    logits = np.asarray(logits, np.float64)
    assert np.any(logits != np.asarray(logits.astype(jnp.bfloat16), np.float64))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.mean(probs / probs.sum(-1, keepdims=True) - labels, 0)
    np.testing.assert_allclose(grads["head"]["bias"], want, rtol=1e-5, atol=1e-7)


def test_create_errors():
    with pytest.raises(ValueError, match="unknown model variant 'X/16'"):
        models.create("X/16", num_classes=10)
    with pytest.raises(TypeError, match="hiden_dim"):
        models.create("B/16", num_classes=10, hiden_dim=5)


def test_overrides_and_flops():
    model = models.create("B/16", num_classes=10, image_size=448, tokens_mlp_dim=1536)
    assert (model.num_tokens, model.tokens_mlp_dim, model.hidden_dim) == (784, 1536, 768)
    b16 = models.create("B/16", num_classes=1000)
    assert models.forward_macs(b16) == 12_601_767_936  # DESIGN.md: 12.6 GMACs.


def test_stochastic_depth_and_dropout():
    model = models.create("Mu/4", num_classes=10, image_size=16, stoch_depth=0.5)
    rates = np.asarray(model.drop_rates())
    np.testing.assert_allclose(rates.ravel(), 0.5 * np.arange(4) / 3)  # Linear over the 2L MLPs.
    params = random_params(model, 16)
    x = images(8, 16)
    ev = model.apply({"params": params}, x)
    np.testing.assert_array_equal(ev, model.apply({"params": params}, x, train=True))  # No rng: off.
    tr = [model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(s)}) for s in range(2)]
    assert np.abs(tr[0] - ev).max() > 1e-4 and np.abs(tr[0] - tr[1]).max() > 1e-4
    # Stochastic depth keeps or drops a branch per example: copies of one image come out differently.
    copies = jnp.repeat(x[:1], 8, axis=0)
    out = np.asarray(model.apply({"params": params}, copies, train=True, rngs={"dropout": jax.random.key(0)}))
    assert len({row.tobytes() for row in out}) > 1


def test_activations_stay_tokens_major():
    """From the stem on, activations are (tokens, batch, channels): the training step transposes no
    3-D activation, forward or backward (the stem gathers the patches in that order, its one
    transpose is of the images)."""
    model = models.create("Mu/4", num_classes=10, image_size=16)
    params, x = random_params(model, 16), images(3, 16)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, train=True))))(params))
    permutations = re.findall(r"transpose\[\s*permutation=\(([\d, ]+)\)", jaxpr)
    assert [q for q in permutations if q.count(",") == 2] == []
    assert [q for q in permutations if q.count(",") == 5] == ["1, 3, 0, 2, 4, 5"]


@pytest.mark.parametrize("scan", [False, True])
def test_no_stochastic_depth_draws_no_masks(scan):
    """stoch_depth=0 must cost nothing in training: no random bits, as in evaluation."""
    x = images(2, 16)

    def primitives(stoch_depth):
        model = models.create("Mu/4", num_classes=10, image_size=16, stoch_depth=stoch_depth, scan_blocks=scan)
        params = random_params(model, 16)
        fn = lambda p: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
        return str(jax.make_jaxpr(fn)(params))

    assert "random_bits" in primitives(0.1)
    assert "random_bits" not in primitives(0.0)


def test_drop_path_is_unbiased():
    y = jnp.ones((20000, 1, 1))
    out = models.drop_path(y, 0.3, jax.random.key(0))
    values = np.unique(np.asarray(out))
    assert len(values) == 2 and values[0] == 0.0 and np.isclose(values[1], 1 / 0.7)
    assert abs(float(out.mean()) - 1.0) < 0.02
    tokens_major = models.drop_path(jnp.ones((3, 20000, 2)), 0.3, jax.random.key(0), batch_axis=1)
    np.testing.assert_array_equal(tokens_major, jnp.broadcast_to(out.reshape(1, -1, 1), (3, 20000, 2)))


def test_bfloat16_compute():
    model = models.create("Mu/4", num_classes=10, image_size=16, dtype=jnp.bfloat16)
    params = random_params(model, 16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = images(2, 16)
    out = model.apply({"params": params}, x)
    ref = reference.forward(reference.flatten(params), x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.1)
