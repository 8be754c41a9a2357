"""An independent MLP-Mixer forward pass in plain jax.numpy, from the flat official parameter dict.

It shares no code with `mixer_jax.models`: patches are cut by reshapes, the stem is a matmul,
token mixing is an einsum over the token axis, and LayerNorm and GELU are written out.
"""

import math

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf


def flatten(params, prefix=""):
    """Nested dict -> {"a/b/c": array}, the official .npz key layout."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def gelu(x, approximate=True):
    if approximate:
        return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def patches(images, p):
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def forward(flat, images, *, approximate=True, pre_logits=False):
    kernel = flat["stem/kernel"]
    p = kernel.shape[0]
    x = patches(jnp.asarray(images), p) @ kernel.reshape(-1, kernel.shape[-1]) + flat["stem/bias"]
    i = 0
    while f"MixerBlock_{i}/LayerNorm_0/scale" in flat:
        b = f"MixerBlock_{i}/"
        y = layer_norm(x, flat[b + "LayerNorm_0/scale"], flat[b + "LayerNorm_0/bias"])
        h = (
            jnp.einsum("nsc,sd->ncd", y, flat[b + "token_mixing/Dense_0/kernel"])
            + flat[b + "token_mixing/Dense_0/bias"]
        )
        h = gelu(h, approximate)
        y = jnp.einsum("ncd,ds->nsc", h, flat[b + "token_mixing/Dense_1/kernel"])
        x = x + y + flat[b + "token_mixing/Dense_1/bias"][None, :, None]
        y = layer_norm(x, flat[b + "LayerNorm_1/scale"], flat[b + "LayerNorm_1/bias"])
        h = gelu(y @ flat[b + "channel_mixing/Dense_0/kernel"] + flat[b + "channel_mixing/Dense_0/bias"], approximate)
        x = x + h @ flat[b + "channel_mixing/Dense_1/kernel"] + flat[b + "channel_mixing/Dense_1/bias"]
        i += 1
    x = layer_norm(x, flat["pre_head_layer_norm/scale"], flat["pre_head_layer_norm/bias"]).mean(axis=1)
    if pre_logits:
        return x
    return x @ flat["head/kernel"] + flat["head/bias"]
