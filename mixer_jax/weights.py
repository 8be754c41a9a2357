"""Weights in and out: official `.npz`, timm `.safetensors`/`.pth` and Orbax checkpoints -> params.

`load(path, model)` returns numpy params in exactly the layout `model.init` gives (scanned or not),
adapting them to the model: a zero-initialised head for `new_head=True`, and a larger image by
paper Appendix C (block-diagonal token-mixing MLPs) when the side grows by an integer factor K.
`save(params, path)` writes the official `.npz` layout or timm's `.safetensors` layout.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import models

HEAD_KEYS = ("head/kernel", "head/bias")
_TOKEN_KERNEL = "token_mixing/Dense_0/kernel"
_BLOCK_RE = re.compile(r"^MixerBlock_(\d+)/")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model. The message is meant for the user."""


# ---------------------------------------------------------------------------------------------
# Layouts: nested params <-> flat "a/b/c" keys (official), scanned <-> unscanned blocks.


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested params (scanned or not) -> {"MixerBlock_0/LayerNorm_0/scale": array}, the official layout."""
    params = nn.meta.unbox(params)
    if "MixerBlock" in params:  # Scanned: blocks stacked on axis 0.
        stacked = _flatten_nested(params["MixerBlock"])
        num_blocks = next(iter(stacked.values())).shape[0]
        params = {k: v for k, v in params.items() if k != "MixerBlock"}
        params |= {f"MixerBlock_{i}": _unflatten({k: v[i] for k, v in stacked.items()}) for i in range(num_blocks)}
    return _flatten_nested(params)


def _flatten_nested(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= _flatten_nested(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = np.asarray(jax.device_get(v))
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def unflatten(flat: Mapping[str, np.ndarray], *, scan_blocks: bool = False) -> dict[str, Any]:
    """Official flat layout -> nested params; `scan_blocks` stacks `MixerBlock_{i}` into `MixerBlock`."""
    if not scan_blocks:
        return _unflatten(flat)
    num_blocks = _num_blocks(flat)
    rest = {k: v for k, v in flat.items() if not _BLOCK_RE.match(k)}
    block_keys = sorted({_BLOCK_RE.sub("", k) for k in flat if _BLOCK_RE.match(k)})
    stacked = {
        f"MixerBlock/{k}": np.stack([flat[f"MixerBlock_{i}/{k}"] for i in range(num_blocks)]) for k in block_keys
    }
    return _unflatten(rest | stacked)


def _num_blocks(flat: Mapping[str, Any]) -> int:
    return len({m.group(1) for k in flat if (m := _BLOCK_RE.match(k))})


def model_shapes(model: models.MlpMixer) -> dict[str, tuple[int, ...]]:
    """The official-layout (unscanned) parameter shapes of `model`, without running anything."""
    unscanned = model.clone(scan_blocks=False, remat="none")
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: unscanned.init(jax.random.key(0), x), images)["params"]
    return {k: tuple(v.shape) for k, v in _flatten_abstract(nn.meta.unbox(abstract)).items()}


def _flatten_abstract(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out |= _flatten_abstract(v, f"{prefix}{k}/") if isinstance(v, Mapping) else {f"{prefix}{k}": v}
    return out


# ---------------------------------------------------------------------------------------------
# timm's layout (research notes 2.4): a pure renaming plus transposes of the conv and dense kernels.

_TIMM_NAMES = (
    ("stem/kernel", "stem.proj.weight"),
    ("stem/bias", "stem.proj.bias"),
    ("MixerBlock_{i}/LayerNorm_0/scale", "blocks.{i}.norm1.weight"),
    ("MixerBlock_{i}/LayerNorm_0/bias", "blocks.{i}.norm1.bias"),
    ("MixerBlock_{i}/token_mixing/Dense_0/kernel", "blocks.{i}.mlp_tokens.fc1.weight"),
    ("MixerBlock_{i}/token_mixing/Dense_0/bias", "blocks.{i}.mlp_tokens.fc1.bias"),
    ("MixerBlock_{i}/token_mixing/Dense_1/kernel", "blocks.{i}.mlp_tokens.fc2.weight"),
    ("MixerBlock_{i}/token_mixing/Dense_1/bias", "blocks.{i}.mlp_tokens.fc2.bias"),
    ("MixerBlock_{i}/LayerNorm_1/scale", "blocks.{i}.norm2.weight"),
    ("MixerBlock_{i}/LayerNorm_1/bias", "blocks.{i}.norm2.bias"),
    ("MixerBlock_{i}/channel_mixing/Dense_0/kernel", "blocks.{i}.mlp_channels.fc1.weight"),
    ("MixerBlock_{i}/channel_mixing/Dense_0/bias", "blocks.{i}.mlp_channels.fc1.bias"),
    ("MixerBlock_{i}/channel_mixing/Dense_1/kernel", "blocks.{i}.mlp_channels.fc2.weight"),
    ("MixerBlock_{i}/channel_mixing/Dense_1/bias", "blocks.{i}.mlp_channels.fc2.bias"),
    ("pre_head_layer_norm/scale", "norm.weight"),
    ("pre_head_layer_norm/bias", "norm.bias"),
    ("head/kernel", "head.weight"),
    ("head/bias", "head.bias"),
)


def _template_re(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_TO_TIMM = [(_template_re(o), t) for o, t in _TIMM_NAMES]
_FROM_TIMM = [(_template_re(t), o) for o, t in _TIMM_NAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        if m := pattern.match(key):
            return template.replace("{i}", m.group(1)) if m.groups() else template
    return None


def official_to_timm(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official flat layout -> timm `MlpMixer` state dict, fp32 and contiguous.

    The conv kernel goes from HWIO to OIHW, dense kernels from (in, out) to (out, in).
    """
    out = {}
    for key, value in flat.items():
        name = _rename(key, _TO_TIMM)
        if name is None:
            raise WeightsError(f"parameter {key!r} has no timm name; is this a Mixer?")
        value = np.asarray(value, np.float32)
        if key.endswith("kernel"):
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[name] = np.ascontiguousarray(value)
    return out


def timm_to_official(state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> dict[str, np.ndarray]:
    """timm `MlpMixer` state dict -> official flat layout. Keys of another architecture are an error."""
    out, unexpected = {}, []
    for key, value in state_dict.items():
        name = _rename(key, _FROM_TIMM)
        if name is None:
            unexpected.append(key)
            continue
        value = np.asarray(value)
        if name.endswith("kernel"):
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        out[name] = np.ascontiguousarray(value)
    expected = {t.replace("{i}", str(i)) for o, t in _TIMM_NAMES for i in range(max(_num_blocks(out), 1))}
    # A headless export (`num_classes=0`) is whole: `new_head` fine-tuning needs no head.
    missing = sorted(expected - set(state_dict) - {"head.weight", "head.bias"}, key=_natural)
    if unexpected or missing:
        raise WeightsError(
            f"{source} is not a timm MlpMixer state dict: "
            f"{_listing('unexpected key', sorted(unexpected, key=_natural))}; {_listing('missing key', missing)}"
        )
    return out


def _natural(key: str) -> list:
    """Sort key: stem, blocks by index, final norm, head; kernels and scales before biases."""
    group = next(
        i for i, p in enumerate(("stem", "MixerBlock", "blocks", "pre_head", "norm", "head", "")) if key.startswith(p)
    )
    return [group] + [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key.replace("bias", "~bias"))]


def _listing(what: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return f"no {what}s"
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{len(keys)} {what}{'s' if len(keys) > 1 else ''} ({shown})"


# ---------------------------------------------------------------------------------------------
# Reading files.


def read(path: str) -> dict[str, np.ndarray]:
    """Any supported source -> official flat layout (unscanned), as stored: no adaptation to a model.

    `.npz` (official release, keys joined by "/"), `.safetensors` / `.pth` / `.pt` (timm state
    dict), or a directory: a workdir, its `checkpoints/` directory, or one `checkpoints/STEP`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"weights {path!r} do not exist")
    if os.path.isdir(path):
        return _read_orbax(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return _read_npz(path)
    if ext == ".safetensors":
        return timm_to_official(_read_safetensors(path), source=path)
    if ext in (".pth", ".pt", ".bin"):
        return timm_to_official(_read_torch(path), source=path)
    raise WeightsError(
        f"weights {path!r}: unknown format {ext or '(no extension)'}; use an official .npz, a timm "
        f".safetensors or .pth, or an Orbax checkpoint directory"
    )


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {}
            for key in npz.files:
                try:
                    out[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise WeightsError(
                            f"{path}: array {key!r} holds pickled Python objects, which are not read "
                            f"(allow_pickle=False, for safety); save plain numeric arrays, e.g. with weights.save"
                        ) from None
                    raise
            return out
    except WeightsError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, KeyError) as e:
        raise WeightsError(f"cannot read {path} as .npz: the file is truncated or not an .npz ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:  # SafetensorError, and OSError on short reads.
        raise WeightsError(
            f"cannot read {path} as .safetensors: the file is truncated or not safetensors ({e})"
        ) from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # Optional: only .pth files need it.
    except ImportError:
        raise WeightsError(
            f"reading {path} needs torch (pip install torch), or convert it to .safetensors elsewhere"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"cannot read {path} as a torch state dict: the file is truncated or not one ({type(e).__name__}: {e})"
        ) from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def saved_model_config(path: str) -> dict[str, Any]:
    """The `model` config saved with the Orbax checkpoint at `path` (as `read` takes it); {} for a
    weights file or a checkpoint without a readable config."""
    return dict(saved_config(path).get("model", {}))


def saved_config(path: str) -> dict[str, Any]:
    """The whole config saved with the Orbax checkpoint at `path` (as `read` takes it), as a dict;
    {} for a weights file or a checkpoint without a readable config."""
    if not os.path.isdir(path):
        return {}
    from mixer_jax import checkpointing

    directory, step = checkpointing.locate(path)
    if not os.path.isdir(directory):
        return {}
    ckpt = checkpointing.Checkpointer(directory, keep=1, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        return dict(ckpt.saved_config(step)) if step is not None else {}
    except checkpointing.CheckpointError:
        return {}
    finally:
        ckpt.close()


def _read_orbax(path: str) -> dict[str, np.ndarray]:
    from mixer_jax import checkpointing

    path = os.path.abspath(path)
    directory, step = checkpointing.locate(path)
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax warns about metadata it does not need here.
    try:
        _, state = checkpointing.load_state_numpy(directory, step)
    except FileNotFoundError as e:
        raise WeightsError(
            f"no Orbax checkpoint in {path} ({e}); pass a workdir, its checkpoints/ directory or checkpoints/STEP"
        ) from None
    except Exception as e:  # Orbax and TensorStore raise many kinds for a damaged checkpoint.
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"the Orbax checkpoint in {path} is unreadable ({reason}); pass another step's directory "
            "(checkpoints/STEP) or another checkpoint"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
    if "params" not in state:
        raise WeightsError(f"the checkpoint in {path} has no 'params' (it holds {sorted(state)})")
    return flatten(state["params"])


# ---------------------------------------------------------------------------------------------
# Adapting weights to a model: head swap, paper Appendix C.


def load(path: str, model: models.MlpMixer, *, new_head: bool = False) -> dict[str, Any]:
    """Weights at `path` as numpy params for `model` (its layout, shapes and param dtype).

    new_head=True: a zero-initialised head for model.num_classes (paper fine-tuning), whatever the
    stored head; otherwise a head of another class count is an error. A larger model.image_size is
    adapted by paper Appendix C when the side grows by an integer factor K (the model's token MLP
    must be widened to K²·D_S: see `finetune_overrides`).
    """
    return convert(read(path), model, new_head=new_head, source=os.fspath(path))


def convert(
    flat: Mapping[str, np.ndarray], model: models.MlpMixer, *, new_head: bool = False, source: str = "the weights"
) -> dict[str, Any]:
    """Official flat weights -> numpy params for `model` (see `load`)."""
    target = model_shapes(model)
    missing = sorted(set(target) - set(flat) - (set(HEAD_KEYS) if new_head else set()), key=_natural)
    unexpected = sorted(set(flat) - set(target), key=_natural)
    if set(missing) == set(HEAD_KEYS) and not unexpected:
        raise WeightsError(f"{source} has no head; pass new_head=True (config init.new_head=True) for a new zero head")
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not fit the model ({_num_blocks(flat)} blocks stored, the model has "
            f"{model.num_blocks}): {_listing('missing key', missing)}; {_listing('unexpected key', unexpected)}"
        )
    if flat["stem/kernel"].shape != target["stem/kernel"]:  # Another patch or width: nothing else can fit.
        raise WeightsError(
            f"stem/kernel has shape {flat['stem/kernel'].shape} in {source}, but the model expects "
            f"{target['stem/kernel']} (patch x patch x 3 x hidden width): the weights are of another variant"
        )
    out = dict(flat)
    for i in range(model.num_blocks):
        block = f"MixerBlock_{i}/"
        stored = flat[block + _TOKEN_KERNEL].shape
        wanted = target[block + _TOKEN_KERNEL]
        if len(stored) == len(wanted) == 2 and stored[0] != wanted[0]:  # Another token count.
            k, grid = _appendix_c_factor(block + _TOKEN_KERNEL, stored, wanted, model, source)
            out |= {block + n: v for n, v in expand_token_mixing(_block_tensors(flat, block), k, grid).items()}
    for key, shape in sorted(target.items(), key=lambda item: _natural(item[0])):
        if key in HEAD_KEYS and new_head:
            out[key] = np.zeros(shape)
        elif out[key].shape != shape:
            hint = ""
            if key.endswith(_TOKEN_KERNEL) and out[key].shape[0] == shape[0]:
                hint = f": {_WIDENED_HINT.format(stored=out[key].shape[1], wanted=shape[1])}"
            if key in HEAD_KEYS and out[key].shape[:-1] == shape[:-1]:
                hint = (
                    f": the stored head has {out[key].shape[-1]} classes and the model "
                    f"{model.num_classes}; pass new_head=True (config init.new_head=True) for a new zero head"
                )
            raise WeightsError(f"{key} has shape {out[key].shape} in {source}, but the model expects {shape}{hint}")
    dtype = jnp.dtype(model.param_dtype)
    out = {k: np.asarray(out[k], dtype) for k in target}
    return unflatten(out, scan_blocks=model.scan_blocks)


_WIDENED_HINT = (
    "create the model with tokens_mlp_dim={stored} (not {wanted}; weights.finetune_overrides). In a config, "
    "model.pretrain_image_size gives it: set it to the resolution of the original pretraining, where the token "
    "MLP has the variant's width, also for weights already fine-tuned at a higher resolution"
)


def _block_tensors(flat: Mapping[str, np.ndarray], block: str) -> dict[str, np.ndarray]:
    names = [f"token_mixing/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")]
    return {n: flat[block + n] for n in names}


def _appendix_c_factor(
    key: str, stored: tuple[int, ...], wanted: tuple[int, ...], model: models.MlpMixer, source: str
) -> tuple[int, int]:
    """(K, stored grid side) for growing `stored` (S, D_S) to `wanted` (K²S, K²D_S), or a WeightsError."""
    (tokens, mlp_dim), (new_tokens, new_mlp_dim) = stored, wanted
    grid, new_grid = math.isqrt(tokens), math.isqrt(new_tokens)
    p = model.patch_size
    if grid * grid != tokens or new_grid * new_grid != new_tokens:
        raise WeightsError(f"{key} has shape {stored} in {source}, but the model expects {wanted}")
    if new_grid % grid:
        raise WeightsError(
            f"{key} has shape {stored} in {source} ({grid}x{grid} tokens, image size {grid * p}), but the model "
            f"expects {wanted} ({new_grid}x{new_grid} tokens, image size {model.image_size}): the side ratio "
            f"{new_grid}/{grid} = {new_grid / grid:g} is not an integer, and paper Appendix C only grows the "
            f"side by an integer factor K; use an image size of K x {grid * p}"
        )
    k = new_grid // grid
    if new_mlp_dim != k * k * mlp_dim:
        raise WeightsError(
            f"{key} has shape {stored} in {source}, but the model expects {wanted}: the model's token MLP was "
            f"not widened. Growing {grid}x{grid} to {new_grid}x{new_grid} tokens (K={k}, paper Appendix C) needs "
            f"tokens_mlp_dim = K²·D_S = {k * k * mlp_dim}, but the model has tokens_mlp_dim={new_mlp_dim}; "
            + _WIDENED_HINT.format(stored=k * k * mlp_dim, wanted=new_mlp_dim)
        )
    return k, grid


def token_permutation(grid: int, k: int) -> np.ndarray:
    """perm[t] = row-major index, on the (K·grid)² token grid, of token t in grouped order.

    Grouped order concatenates the K² spatial groups (sub-images of grid x grid patches; group
    g = a·K + b is the a-th row, b-th column), each in its own row-major order.
    """
    a, b, h, w = np.meshgrid(*(np.arange(n) for n in (k, k, grid, grid)), indexing="ij")
    return ((a * grid + h) * (k * grid) + (b * grid + w)).reshape(-1)


def expand_token_mixing(block: Mapping[str, np.ndarray], k: int, grid: int) -> dict[str, np.ndarray]:
    """Paper Appendix C for one token-mixing MLP: K² block-diagonal copies of both Dense layers and
    tiled biases, acting on grouped tokens; rows/columns are then permuted once so the model keeps
    row-major token order. Keys are those of `_block_tensors` (`token_mixing/Dense_{0,1}/...`)."""
    copies = k * k
    eye = np.eye(copies, dtype=block["token_mixing/Dense_0/kernel"].dtype)
    perm = token_permutation(grid, k)
    w0 = np.kron(eye, block["token_mixing/Dense_0/kernel"])  # (K²S, K²D_S): rows are grouped tokens.
    w1 = np.kron(eye, block["token_mixing/Dense_1/kernel"])  # (K²D_S, K²S): columns are grouped tokens.
    b1 = np.tile(block["token_mixing/Dense_1/bias"], copies)
    w0_rows, w1_cols, b1_rows = np.empty_like(w0), np.empty_like(w1), np.empty_like(b1)
    w0_rows[perm] = w0
    w1_cols[:, perm] = w1
    b1_rows[perm] = b1
    return {
        "token_mixing/Dense_0/kernel": w0_rows,
        "token_mixing/Dense_0/bias": np.tile(block["token_mixing/Dense_0/bias"], copies),
        "token_mixing/Dense_1/kernel": w1_cols,
        "token_mixing/Dense_1/bias": b1_rows,
    }


def finetune_overrides(variant: str, image_size: int, pretrain_image_size: int) -> dict[str, int]:
    """`models.create` overrides for fine-tuning at `image_size` weights pretrained at `pretrain_image_size`.

    {} when the resolution is unchanged (or pretrain_image_size is 0); else {"tokens_mlp_dim": K²·D_S}
    (paper Appendix C). Raises ValueError when the side ratio K is not an integer.
    """
    if not pretrain_image_size or pretrain_image_size == image_size:
        return {}
    fields = models.parse_variant(variant)
    p = fields["patch_size"]
    k, rest = divmod(image_size, pretrain_image_size)
    if rest or k < 1 or pretrain_image_size % p:
        raise ValueError(
            f"image_size {image_size} is not an integer multiple K of pretrain_image_size {pretrain_image_size} "
            f"(patch {p}); paper Appendix C only grows the side by an integer factor, e.g. image_size "
            f"{2 * pretrain_image_size}"
        )
    return {"tokens_mlp_dim": k * k * fields["tokens_mlp_dim"]}


def architecture(flat: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The Mixer fields that stored weights fix: patch, widths, depth, classes (0 without a head, as
    timm's num_classes=0 export) and image size."""
    try:
        patch, _, _, hidden = flat["stem/kernel"].shape
        tokens, tokens_mlp_dim = flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape
        channels_mlp_dim = flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[1]
        num_classes = flat["head/kernel"].shape[1] if "head/kernel" in flat else 0
    except (KeyError, ValueError, IndexError) as e:
        raise WeightsError(f"the weights are not an MLP-Mixer's (no or odd {e})") from None
    return dict(
        patch_size=patch,
        hidden_dim=hidden,
        num_blocks=_num_blocks(flat),
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=channels_mlp_dim,
        num_classes=num_classes,
        image_size=math.isqrt(tokens) * patch,
    )


def model_for(
    flat: Mapping[str, np.ndarray], variant: str | None = None, *, image_size: int | None = None, **options: Any
) -> models.MlpMixer:
    """A model that the stored weights fit, at `image_size` (default: theirs; larger by Appendix C).

    `variant`, if given, must agree with the stored architecture (its token MLP may be widened).
    Weights without a head get a model with one class, unless `num_classes` is given.
    """
    arch = architecture(flat)
    if variant:
        want = models.parse_variant(variant)
        fixed = ("patch_size", "hidden_dim", "num_blocks")
        wrong = [f"{k} {arch[k]} (not {want[k]})" for k in fixed if arch[k] != want[k]]
        if wrong:
            raise WeightsError(f"the weights are not a Mixer-{variant}: they have {', '.join(wrong)}")
    image_size = image_size or arch["image_size"]
    fields = {k: arch[k] for k in ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim")}
    if image_size != arch["image_size"]:
        k = image_size // arch["image_size"]
        if image_size % arch["image_size"]:
            raise WeightsError(
                f"image_size {image_size} is not an integer multiple of the weights' image size "
                f"{arch['image_size']}; paper Appendix C only grows the side by an integer factor"
            )
        fields["tokens_mlp_dim"] *= k * k
    return models.create(
        variant or f"B/{arch['patch_size']}",
        num_classes=options.pop("num_classes", arch["num_classes"] or 1),
        image_size=image_size,
        **fields,
        **options,
    )


def load_model(
    path: str,
    variant: str | None = None,
    *,
    image_size: int | None = None,
    gelu_exact: bool = False,
    need_head: bool = True,
    saved: Mapping[str, Any] | None = None,
) -> tuple[models.MlpMixer, dict[str, Any]]:
    """The model that the weights at `path` fit (`model_for`) and their params: what the tools load.

    Its GELU is the one a checkpoint of this trainer was trained with (its saved config: `saved`,
    if the caller has read it with `saved_config`), else the tanh form of the official release,
    unless `gelu_exact` (timm's weights). Weights without a head get a zero one-class head where
    `need_head` is False (pre-logits suffice), else are an error.
    """
    flat = read(path)
    headless = "head/kernel" not in flat
    if headless and need_head:
        raise WeightsError(f"{path} has no head (an export with num_classes=0), and classifying needs one")
    saved = saved_config(path) if saved is None else saved
    approximate = not gelu_exact and saved.get("model", {}).get("gelu_approximate", True)
    model = model_for(flat, variant, image_size=image_size, gelu_approximate=approximate)
    return model, convert(flat, model, new_head=headless, source=os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Writing.


def save(params: Mapping[str, Any], path: str) -> None:
    """Writes params (scanned or not) as `.npz` in the official layout or `.safetensors` in timm's (fp32).

    The file appears complete or not at all (written beside it, then renamed).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    flat = {k: np.asarray(v, np.float32) if v.dtype != np.float32 else v for k, v in flatten(params).items()}
    tmp = f"{path}.tmp{os.getpid()}{ext}"
    if ext == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **flat)
    elif ext == ".safetensors":
        import safetensors.numpy

        safetensors.numpy.save_file(official_to_timm(flat), tmp, metadata={"format": "pt"})
    else:
        raise WeightsError(f"cannot save weights as {path!r}: use a .npz (official layout) or .safetensors (timm)")
    os.replace(tmp, path)
