"""MLP-Mixer (Tolstikhin et al., 2021) in Flax Linen.

Parameter names follow the official release exactly (`stem`, `MixerBlock_{i}/token_mixing/Dense_0`,
`pre_head_layer_norm`, `head`, ...), so released `.npz` files load without any key mapping. Every
weight carries logical axis names; `sharding.py` maps them onto the device mesh.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixer_jax import dense_gelu, gelu, layer_norm, matmul

Dtype = Any

# Size letter -> (num_blocks, hidden_dim C, tokens_mlp_dim D_S, channels_mlp_dim D_C).
# S/B/L/H are Table 1 of the paper (D_S = C/2, D_C = 4C). Mu and Ti are small sizes of the same
# shape family for tests and CPU runs.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Mu": (2, 32, 16, 128),
    "Ti": (4, 128, 64, 512),
    "S": (8, 512, 256, 2048),
    "B": (12, 768, 384, 3072),
    "L": (24, 1024, 512, 4096),
    "H": (32, 1280, 640, 5120),
}
PAPER_VARIANTS = ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")
_VARIANT_RE = re.compile(r"^([A-Za-z]+)/(\d+)$")

# Logical axis names used by the annotations below. `sharding.DEFAULT_RULES` maps them to the mesh.
LOGICAL_AXES = (
    "layers",
    "embed",
    "tokens",
    "token_mlp",
    "channel_mlp",
    "classes",
    "patch_height",
    "patch_width",
    "pixels",
)


def parse_variant(variant: str) -> dict[str, int]:
    """`"B/16"` -> the architecture fields of that variant. Raises ValueError if unknown."""
    m = _VARIANT_RE.match(variant or "")
    if not m or m.group(1) not in SIZES or int(m.group(2)) <= 0:
        raise ValueError(
            f"unknown model variant {variant!r}: expected SIZE/PATCH with SIZE one of "
            f"{', '.join(SIZES)} and a positive patch, e.g. 'B/16' (paper variants: "
            f"{', '.join(PAPER_VARIANTS)})"
        )
    num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim = SIZES[m.group(1)]
    return dict(
        patch_size=int(m.group(2)),
        num_blocks=num_blocks,
        hidden_dim=hidden_dim,
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=channels_mlp_dim,
    )


def _dense(features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype, **kw) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kw.pop("kernel_init", nn.linear.default_kernel_init), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        **kw,
    )


def _layer_norm(dtype: Dtype, param_dtype: Dtype, recompute: bool, name: str | None = None) -> nn.Module:
    """`nn.LayerNorm`, or with `recompute` `layer_norm.LayerNorm` (the same parameters), whose
    backward pass keeps only the input and two numbers per row."""
    return (layer_norm.LayerNorm if recompute else nn.LayerNorm)(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _kernel_and_bias(
    module: nn.Module, shape: tuple[int, ...], axes: tuple[str, ...], param_dtype: Dtype
) -> tuple[jax.Array, jax.Array]:
    """`nn.Dense`'s parameters for a kernel of `shape` (output last): `kernel` (LeCun normal) and a zero
    `bias` of the output width, partitioned by the logical `axes`."""
    kernel_init = nn.with_logical_partitioning(nn.linear.default_kernel_init, axes)
    kernel = module.param("kernel", kernel_init, shape, param_dtype)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:])
    return kernel, module.param("bias", bias_init, shape[-1:], param_dtype)


def _matmul(plain: bool) -> Any:
    return matmul.dense_matmul if plain else matmul.xla_matmul


def _over_last_axis(x: jax.Array, kernel: jax.Array, bias: jax.Array, plain: bool, dtype: Dtype) -> jax.Array:
    """x (..., K) @ kernel (K, N) + bias -> (..., N).

    On GPU and TPU x keeps its axes. Merging them into rows would, on tokens-major activations
    (tokens, batch, C) with the batch sharded, make XLA gather the whole batch on every device (two
    activation all-gathers per block in a data-parallel step; activation-sized all-reduces with
    FSDP). XLA:CPU gets rows: its dot handles a transposed 2-D operand in place but copies an N-D
    one to form the kernel gradient (S/16 float32 19% slower), and CPU meshes only emulate devices."""
    if not plain and jax.default_backend() != "cpu":
        return matmul.xla_matmul(x, kernel, bias, False, dtype)
    y = _matmul(plain)(x.reshape(-1, x.shape[-1]), kernel, bias, False, dtype)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _operand_dtype(module: nn.Module) -> Dtype:
    """A module's matmul operand dtype: its `matmul_dtype`, or `dtype` where that is None."""
    return jnp.dtype(module.dtype if module.matmul_dtype is None else module.matmul_dtype)


class PatchStem(nn.Module):
    """The per-patch linear embedding: the official stride-p, p x p Conv (same `kernel` (p, p, 3, C)
    and `bias` (C,)), computed as one matmul over flattened patches. The same numbers as the
    convolution, but XLA:CPU runs a convolution's gradient inside a loop (gradient accumulation)
    about 30x slower than this matmul.

    Returns tokens-major embeddings (tokens, batch, C), tokens in row-major order as the official
    einops: the patches are gathered in that order, so the blocks' layout comes out of the matmul
    and no activation-sized transpose exists. (A transpose of the batch-major output was one that
    XLA:GPU moved into the residual stream: the residual adds ran batch-major, and every backward
    LayerNorm was followed by a transpose back, 23 per B/16 step.)"""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # None: dtype.
    plain_matmuls: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        n, h, w, c = images.shape
        p = self.patch_size
        kernel, bias = _kernel_and_bias(
            self, (p, p, c, self.features), ("patch_height", "patch_width", "pixels", "embed"), self.param_dtype
        )
        patches = images.astype(self.dtype).reshape(n, h // p, p, w // p, p, c).transpose(1, 3, 0, 2, 4, 5)
        patches, kernel = patches.reshape(-1, n, p * p * c), kernel.reshape(-1, self.features)
        return _over_last_axis(patches, kernel, bias, self.plain_matmuls, _operand_dtype(self))


class Dense(nn.Module):
    """`nn.Dense` (same `kernel` (in, out) and `bias` (out,)) over the last axis or, with `leading`,
    over the leading one: y[d, ...] = sum_s x[s, ...] kernel[s, d] + bias[d].

    On tokens-major activations (tokens, batch, channels), the leading-axis form is token mixing as
    one matmul, kernel^T @ x viewed as (tokens, batch * channels), with no transpose of the
    activations. The matmul's operands are in `matmul_dtype` (float32 accumulation), the result in
    `dtype`; `plain_matmuls` selects `matmul.dense_matmul` (see there) over XLA's layouts.
    `fused_gelu` (last axis, XLA's layouts) returns the tanh GELU of the result, from
    `dense_gelu.dense_gelu`: one Hopper kernel where it applies.
    """

    features: int
    axes: tuple[str, str]
    leading: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # None: dtype.
    plain_matmuls: bool = False
    fused_gelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[0] if self.leading else x.shape[-1]
        kernel, bias = _kernel_and_bias(self, (width, self.features), self.axes, self.param_dtype)
        x = x.astype(self.dtype)
        if self.fused_gelu:
            if self.leading or self.plain_matmuls:
                raise ValueError("fused_gelu needs a Dense over the last axis with XLA's matmul layouts")
            return dense_gelu.dense_gelu(x, kernel, bias, _operand_dtype(self))
        if not self.leading:
            return _over_last_axis(x, kernel, bias, self.plain_matmuls, _operand_dtype(self))
        # (tokens, batch * C): the batch is the outer part of the merged axis, so it stays sharded.
        y = _matmul(self.plain_matmuls)(x.reshape(width, -1), kernel, bias, True, _operand_dtype(self))
        return y.reshape(self.features, *x.shape[1:])


class DenseParams(nn.Module):
    """A `Dense`'s parameters alone, under the same names (`kernel` of `shape`, `bias`), for a layer
    whose arithmetic happens elsewhere (`dense_gelu.mlp`)."""

    shape: tuple[int, int]
    axes: tuple[str, str]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return _kernel_and_bias(self, self.shape, self.axes, self.param_dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense back to the input width, over the last axis (`axis=-1`) or the leading
    one (`axis=0`). `axes` = (input axis, hidden axis) names. `recompute_gelu`: the GELU's backward
    pass keeps only its input (`gelu.gelu`). `fused_gelu` (last axis, tanh GELU, XLA's layouts only):
    the whole MLP as `dense_gelu.mlp`, or with active dropout the first Dense and the GELU as
    `dense_gelu.dense_gelu`."""

    mlp_dim: int
    axes: tuple[str, str]
    axis: int = -1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None  # None: dtype.
    plain_matmuls: bool = False
    gelu_approximate: bool = True
    recompute_gelu: bool = False
    fused_gelu: bool = False
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        width = x.shape[self.axis]
        in_axis, hidden_axis = self.axes

        def dense(features: int, axes: tuple[str, str], name: str, fused_gelu: bool = False) -> nn.Module:
            return Dense(
                features,
                axes,
                self.axis == 0,
                self.dtype,
                self.param_dtype,
                self.matmul_dtype,
                self.plain_matmuls,
                fused_gelu,
                name=name,
            )

        if self.fused_gelu and not self.gelu_approximate:
            raise ValueError("fused_gelu computes the tanh GELU: it needs gelu_approximate=True")
        if self.fused_gelu and self.axis == -1 and not self.plain_matmuls and (deterministic or not self.dropout_rate):
            kernel_0, bias_0 = DenseParams((width, self.mlp_dim), self.axes, self.param_dtype, name="Dense_0")()
            kernel_1, bias_1 = DenseParams((self.mlp_dim, width), self.axes[::-1], self.param_dtype, name="Dense_1")()
            return dense_gelu.mlp(x.astype(self.dtype), kernel_0, bias_0, kernel_1, bias_1, _operand_dtype(self))
        y = dense(self.mlp_dim, (in_axis, hidden_axis), "Dense_0", self.fused_gelu)(x)
        if not self.fused_gelu:  # Else the Dense applied it.
            y = (gelu.gelu if self.recompute_gelu else nn.gelu)(y, self.gelu_approximate)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = dense(width, (hidden_axis, in_axis), "Dense_1")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


def drop_path(y: jax.Array, rate: jax.Array | float, rng: jax.Array, batch_axis: int = 0) -> jax.Array:
    """Stochastic depth: zero a residual branch per example (along `batch_axis`) with probability `rate`.

    Kept branches are scaled by 1/(1 - rate) ("inverted" scaling, as in DeiT/timm), so the
    expected branch output matches inference, where the branch is always kept unscaled.
    """
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = [1] * y.ndim
    shape[batch_axis] = y.shape[batch_axis]
    mask = jax.random.bernoulli(rng, keep, tuple(shape))
    return jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))


class MixerBlock(nn.Module):
    """LayerNorm -> token-mixing MLP (across patches) -> residual; LayerNorm -> channel MLP -> residual."""

    tokens_mlp_dim: int
    channels_mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gelu_approximate: bool = True
    dropout_rate: float = 0.0
    deterministic: bool = True
    matmul_dtype: Dtype | None = None  # None: dtype.
    plain_matmuls: bool = False
    recompute_gelu: bool = False
    fused_gelu: bool = False  # The channel MLPs' (`MlpBlock.fused_gelu`).
    recompute_layer_norm: bool = False
    drop_paths: bool = False  # Stochastic depth on the two residual branches (`MlpMixer.stoch_depth` > 0).

    @nn.compact
    def __call__(self, x: jax.Array, drop_rates: jax.Array) -> jax.Array:
        """x: (tokens, batch, channels), tokens-major: token mixing is a matmul over the leading axis
        and channel mixing one over the last, neither with a transpose. drop_rates: (2,)
        stochastic-depth rates of the two MLPs."""
        deterministic = self.deterministic
        mlp = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            gelu_approximate=self.gelu_approximate,
            dropout_rate=self.dropout_rate,
            matmul_dtype=self.matmul_dtype,
            plain_matmuls=self.plain_matmuls,
            recompute_gelu=self.recompute_gelu,
        )
        # Static: with stoch_depth 0 a traced rate of 0 would still cost a mask, a divide and a select.
        stochastic = self.drop_paths and not deterministic and self.has_rng("dropout")
        y = _layer_norm(self.dtype, self.param_dtype, self.recompute_layer_norm)(x)
        y = MlpBlock(self.tokens_mlp_dim, ("tokens", "token_mlp"), axis=0, name="token_mixing", **mlp)(
            y, deterministic=deterministic
        )
        if stochastic:
            y = drop_path(y, drop_rates[0], self.make_rng("dropout"), batch_axis=1)
        x = x + y
        y = _layer_norm(self.dtype, self.param_dtype, self.recompute_layer_norm)(x)
        y = MlpBlock(
            self.channels_mlp_dim, ("embed", "channel_mlp"), name="channel_mixing", fused_gelu=self.fused_gelu, **mlp
        )(y, deterministic=deterministic)
        if stochastic:
            y = drop_path(y, drop_rates[1], self.make_rng("dropout"), batch_axis=1)
        return x + y


class MlpMixer(nn.Module):
    """The Mixer classifier: patch stem, `num_blocks` Mixer blocks, LayerNorm, mean pool, head.

    The module knows its `image_size`: it fixes the number of tokens and so the token-mixing
    weight shapes. Inputs are NHWC images scaled to [-1, 1]; the output is float32 logits.
    Stochastic depth rises linearly over the 2·num_blocks MLPs, from 0 for the first to
    `stoch_depth` for the last (paper, Appendix B), with the scaling of `drop_path`.
    """

    num_classes: int
    patch_size: int
    hidden_dim: int
    num_blocks: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    image_size: int = 224
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gelu_approximate: bool = True
    dropout_rate: float = 0.0
    stoch_depth: float = 0.0
    scan_blocks: bool = False
    remat: str = "none"
    matmul_dtype: Dtype | None = None
    matmuls: str = "auto"
    gelu_backward: str = "auto"
    layer_norm_backward: str = "auto"

    def __post_init__(self):
        p = self.patch_size
        if self.image_size <= 0 or self.image_size % p:
            nearest = max(1, round(self.image_size / p)) * p
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch {p}: use a multiple of {p}, e.g. {nearest}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.matmuls not in MATMULS:
            raise ValueError(f"matmuls {self.matmuls!r} is not one of {MATMULS}")
        if self.matmuls == "fused" and not self.gelu_approximate:
            raise ValueError(
                "matmuls='fused' computes the tanh GELU (gelu_approximate=True); with the exact GELU "
                "use matmuls='auto' or 'xla'"
            )
        if self.gelu_backward not in GELU_BACKWARDS:
            raise ValueError(f"gelu_backward {self.gelu_backward!r} is not one of {GELU_BACKWARDS}")
        if self.layer_norm_backward not in LAYER_NORM_BACKWARDS:
            raise ValueError(f"layer_norm_backward {self.layer_norm_backward!r} is not one of {LAYER_NORM_BACKWARDS}")
        super().__post_init__()

    @property
    def operand_dtype(self) -> Dtype:
        """The dense layers' matmul operand dtype: `matmul_dtype`, by default `dtype`."""
        return _operand_dtype(self)

    @property
    def plain_matmuls(self) -> bool:
        """Whether the dense layers use `matmul.dense_matmul`: `matmuls="plain"`, or `"auto"` with
        bfloat16 operands on CPU, where only plain-layout bfloat16 dots reach the fast kernels."""
        if self.matmuls == "auto":
            return self.operand_dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
        return self.matmuls == "plain"

    @property
    def fused_gelu(self) -> bool:
        """Whether each channel MLP is `dense_gelu.mlp` (`matmuls="fused"`): on a single H100/H200 in
        bfloat16, Hopper kernels for its first Dense and GELU and for the GELU's input gradient;
        XLA's matmuls and GELU elsewhere."""
        return self.matmuls == "fused"

    @property
    def recompute_gelu(self) -> bool:
        """Whether the GELUs use `gelu.gelu`, whose backward pass keeps only the GELU's input:
        `gelu_backward="recompute"`, or `"auto"` on GPU (H100, B/16 bfloat16: 2% faster, peak 15.1
        instead of 20.2 GiB) and with float32 matmuls on CPU (up to 16% faster, B/16). With bfloat16
        matmuls on CPU the recomputed tanh cost more than it saved (S/16, `accum_steps=4`: 8%
        slower); TPU keeps autodiff's until it is measured there."""
        if self.gelu_backward == "auto":
            backend = jax.default_backend()
            return backend == "gpu" or (backend == "cpu" and self.operand_dtype == jnp.float32)
        return self.gelu_backward == "recompute"

    @property
    def recompute_layer_norm(self) -> bool:
        """Whether the LayerNorms use `layer_norm.LayerNorm`, whose backward pass keeps only the
        input and each row's mean and 1/std: `layer_norm_backward="recompute"`, or `"auto"` with
        float32 activations on CPU. Measured there (huge pages): float32 S/16 1-3% and B/16 4-7%
        faster with 16-18% less peak memory; bfloat16 matmuls (S/16) 7-10% faster with 5% less.
        On GPU it made no difference (H100, B/16 bfloat16: 4546 against 4551 images/s, peak 15.0
        against 15.1 GiB), so bfloat16 activations, GPU and TPU keep autodiff's."""
        if self.layer_norm_backward == "auto":
            return jax.default_backend() == "cpu" and jnp.dtype(self.dtype) == jnp.float32
        return self.layer_norm_backward == "recompute"

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def drop_rates(self) -> jax.Array:
        """(num_blocks, 2) stochastic-depth rates: linear from 0 (first MLP) to stoch_depth (last)."""
        n = 2 * self.num_blocks
        return (self.stoch_depth * jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)).reshape(-1, 2)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        _, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch {p}")
        if (h, w) != (self.image_size, self.image_size):
            fix = (
                f"create it with image_size={h}"
                if h == w
                else f"resize the images to {self.image_size}x{self.image_size}"
            )
            raise ValueError(
                f"images of {h}x{w} give a {h // p}x{w // p} grid of tokens, but the model was built for "
                f"image_size {self.image_size} (a {self.image_size // p}x{self.image_size // p} grid): {fix}"
            )
        # Tokens-major (tokens, batch, channels) from the stem on, through the blocks.
        x = PatchStem(
            self.hidden_dim, p, self.dtype, self.param_dtype, self.operand_dtype, self.plain_matmuls, name="stem"
        )(images)
        x = self._blocks(x, train)
        x = _layer_norm(self.dtype, self.param_dtype, self.recompute_layer_norm, name="pre_head_layer_norm")(x)
        x = jnp.mean(x, axis=0)
        self.sow("intermediates", "pre_logits", x)
        # The head runs in float32 whatever the compute dtype: bfloat16 logits would carry 8 bits into
        # the loss, and the head's gradients (its bias's: a sum over the batch) would be bfloat16
        # too. It is one small matmul per image.
        return _dense(
            self.num_classes,
            ("embed", "classes"),
            jnp.float32,
            self.param_dtype,
            kernel_init=nn.initializers.zeros_init(),
            name="head",
        )(x.astype(jnp.float32))

    def _blocks(self, x: jax.Array, train: bool) -> jax.Array:
        """The Mixer blocks: a Python loop (`MixerBlock_{i}`, the official layout) or one `nn.scan`
        over stacked parameters (`MixerBlock`, leading axis `layers`), whose compile time does not
        grow with depth. `remat` recomputes activations in the backward pass by a policy."""
        block = MixerBlock
        if self.remat != "none":
            block = nn.remat(MixerBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_blocks)
        kwargs = dict(
            tokens_mlp_dim=self.tokens_mlp_dim,
            channels_mlp_dim=self.channels_mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            gelu_approximate=self.gelu_approximate,
            dropout_rate=self.dropout_rate,
            deterministic=not train,
            matmul_dtype=self.operand_dtype,
            plain_matmuls=self.plain_matmuls,
            recompute_gelu=self.recompute_gelu,
            fused_gelu=self.fused_gelu,
            recompute_layer_norm=self.recompute_layer_norm,
            drop_paths=self.stoch_depth > 0,
        )
        rates = self.drop_rates()
        if not self.scan_blocks:
            for i in range(self.num_blocks):
                x = block(**kwargs, name=f"MixerBlock_{i}")(x, rates[i])
            return x
        scan = nn.scan(
            lambda module, carry, r: (module(carry, r), None),
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.num_blocks,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scan(block(**kwargs, name="MixerBlock"), x, rates)
        return x


# How the dense layers' matmuls are laid out: XLA's choice, `matmul.dense_matmul`'s plain layout,
# plain exactly for bfloat16 on CPU (`MlpMixer.plain_matmuls`), or XLA's with each channel MLP's
# first Dense and GELU fused (`MlpMixer.fused_gelu`).
MATMULS = ("auto", "xla", "plain", "fused")

# The GELUs' backward pass: autodiff's saved intermediates, `gelu.gelu`'s recomputation from the
# input, or recomputation where it is measured faster: GPU, and float32 matmuls on CPU
# (`MlpMixer.recompute_gelu`).
GELU_BACKWARDS = ("auto", "saved", "recompute")

# The LayerNorms' backward pass: autodiff's saved intermediates, `layer_norm.layer_norm`'s
# recomputation from the input and row statistics, or recomputation with float32 activations on CPU
# (`MlpMixer.recompute_layer_norm`).
LAYER_NORM_BACKWARDS = ("auto", "saved", "recompute")

# Which activations a rematerialised block keeps for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_blocks(params: dict) -> dict:
    """Official layout (`MixerBlock_{i}`) -> scanned layout (`MixerBlock`, stacked on axis 0)."""
    n = sum(k.startswith("MixerBlock_") for k in params)
    blocks = [params[f"MixerBlock_{i}"] for i in range(n)]
    rest = {k: v for k, v in params.items() if not k.startswith("MixerBlock_")}
    return rest | {"MixerBlock": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params: dict) -> dict:
    """Scanned layout -> official layout."""
    stacked = params["MixerBlock"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "MixerBlock"}
    return rest | {f"MixerBlock_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}


_FIELDS = {f.name for f in dataclasses.fields(MlpMixer)} - {"parent", "name", "num_classes"}


def create(variant: str, *, num_classes: int, image_size: int = 224, **overrides: Any) -> MlpMixer:
    """Creates a Mixer by paper name, e.g. `create("B/16", num_classes=1000)`.

    `overrides` use the official field names (`hidden_dim`, `num_blocks`, `tokens_mlp_dim`,
    `channels_mlp_dim`, `patch_size`) plus `dtype`, `param_dtype`, `gelu_approximate`,
    `dropout_rate`, `stoch_depth`, `scan_blocks`, `remat` (a key of REMAT_POLICIES), `matmul_dtype`
    (the dense layers' matmul operands; default `dtype`), `matmuls` (one of MATMULS),
    `gelu_backward` (one of GELU_BACKWARDS) and `layer_norm_backward` (one of LAYER_NORM_BACKWARDS).
    """
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown Mixer option(s) {unknown}; allowed: {sorted(_FIELDS)}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    fields = parse_variant(variant) | {"image_size": image_size} | overrides
    return MlpMixer(num_classes=num_classes, **fields)


def forward_macs(model: MlpMixer) -> int:
    """Multiply-adds of one forward pass for one image (DESIGN.md): stem, blocks and head."""
    s, c = model.num_tokens, model.hidden_dim
    stem = s * model.patch_size**2 * 3 * c
    block = 2 * s * model.tokens_mlp_dim * c + 2 * s * c * model.channels_mlp_dim
    return stem + model.num_blocks * block + c * model.num_classes
