"""Preprocessing as a string of registered ops: `"resize(16)|rgb|value_range(-1,1)|onehot(10)"`.

An op is registered under a name with `@register`; its factory takes the literal arguments from the
string and returns `fn(example, rng) -> example`, acting on a dict of numpy values. `rng` is a
`numpy.random.Generator` seeded from (seed, example index), so random ops are reproducible and
independent of threads and processes. `parse` builds every op at once, so an unknown op or a bad
argument is a config error at start-up, not a crash in a worker thread.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

_REGISTRY: dict[str, Callable[..., Op]] = {}


class PreprocessError(ValueError):
    """A preprocessing string that names an unknown op or passes it bad arguments."""


def register(name: str):
    def wrap(factory: Callable[..., Op]) -> Callable[..., Op]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def _parse_op(spec: str) -> tuple[str, tuple, dict]:
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError:
        raise PreprocessError(f"cannot parse preprocessing op {spec!r}; write it as name or name(arg, ...)") from None
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise PreprocessError(f"preprocessing op {spec!r}: arguments must be literals") from None
        return node.func.id, args, kwargs
    raise PreprocessError(f"cannot parse preprocessing op {spec!r}; write it as name or name(arg, ...)")


def parse(pp: str) -> Op:
    """The composition of the ops in `pp`, split on `|`. Raises PreprocessError."""
    ops = []
    for spec in filter(None, (s.strip() for s in pp.split("|"))):
        name, args, kwargs = _parse_op(spec)
        if name not in _REGISTRY:
            raise PreprocessError(
                f"unknown preprocessing op {name!r} in {pp!r}; known ops: {', '.join(sorted(_REGISTRY))}"
            )
        try:
            ops.append(_REGISTRY[name](*args, **kwargs))
        except (TypeError, ValueError) as e:
            raise PreprocessError(f"preprocessing op {spec!r}: {e}") from None

    def apply(example: Example, rng: np.random.Generator) -> Example:
        for op in ops:
            example = op(example, rng)
        return example

    return apply


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _size(size: Any) -> tuple[int, int]:
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return _positive_int("height", size[0]), _positive_int("width", size[1])
    s = _positive_int("size", size)
    return s, s


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out[..., None] if squeeze else out


@register("resize")
def resize(size: Any) -> Op:
    """Bilinear resize of `image` to size x size, or to (height, width)."""
    h, w = _size(size)

    def op(ex, rng):
        return ex | {"image": _resize(ex["image"], h, w)}

    return op


@register("rgb")
def rgb() -> Op:
    """Grayscale (H, W, 1) -> (H, W, 3); RGB images pass through."""

    def op(ex, rng):
        im = ex["image"]
        return ex | {"image": np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im}

    return op


@register("pad_crop")
def pad_crop(pad: int) -> Op:
    """Random translation: zero-pad each side by `pad` pixels, then crop the original size."""
    _positive_int("pad", pad)

    def op(ex, rng):
        im = ex["image"]
        h, w = im.shape[:2]
        padded = np.pad(im, ((pad, pad), (pad, pad), (0, 0)))
        y, x = rng.integers(0, 2 * pad + 1, size=2)
        return ex | {"image": padded[y : y + h, x : x + w]}

    return op


@register("flip_lr")
def flip_lr() -> Op:
    """Horizontal flip with probability 1/2."""

    def op(ex, rng):
        return ex | {"image": ex["image"][:, ::-1]} if rng.random() < 0.5 else ex

    return op


@register("value_range")
def value_range(vmin: float = -1.0, vmax: float = 1.0) -> Op:
    """uint8 [0, 255] -> float32 [vmin, vmax]."""
    if not vmin < vmax:
        raise ValueError(f"value_range needs vmin < vmax, got ({vmin}, {vmax})")
    scale = (vmax - vmin) / 255.0

    def op(ex, rng):
        return ex | {"image": ex["image"].astype(np.float32) * np.float32(scale) + np.float32(vmin)}

    return op


@register("onehot")
def onehot(num_classes: int, key: str = "label", outkey: str = "labels") -> Op:
    """Integer label (or a list of labels: multi-hot) -> float32 vector `labels`."""
    _positive_int("num_classes", num_classes)

    def op(ex, rng):
        label = np.asarray(ex[key])
        if (label < 0).any() or (label >= num_classes).any():
            raise ValueError(f"label {label} outside [0, {num_classes})")
        out = np.zeros(num_classes, np.float32)
        out[label] = 1.0
        return ex | {outkey: out}

    return op


@register("keep")
def keep(*keys: str) -> Op:
    """Drops every field but `keys`."""

    def op(ex, rng):
        return {k: ex[k] for k in keys}

    return op
