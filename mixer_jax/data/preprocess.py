"""Preprocessing as a string of registered ops, e.g.
`"decode|inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)|onehot(1000)|mixup(0.5)"`.

An op is registered under a name with `@register`; its factory takes the literal arguments from the
string and returns `fn(example, rng) -> example`, acting on a dict of numpy values. `rng` is a
`numpy.random.Generator` seeded from (seed, example index), so random ops are reproducible and
independent of threads and processes. Ops registered with `batch=True` (`mixup`) act on a whole
batch `fn(batch, rng) -> batch` after batching; they come last in the string. `parse` builds every
op at once, so an unknown op or a bad argument is a config error at start-up, not a crash in a
worker thread.

`decode` reads only the header of a JPEG. The next geometric op (`inception_crop`, `resize`,
`resize_small`, `central_crop`) decodes it (libjpeg-turbo, through simplejpeg) at the scale it needs:
JPEG's DCT scaling decodes at 1/2, 1/4 or 1/8 of the size when the output is that much smaller.
Other formats are decoded at once, by OpenCV. Resizing is OpenCV's bilinear with half-pixel
centres, as `tf.image.resize` in the reference pipelines; a downscale by 2x or more averages areas
instead, so it does not alias. `resize_small` always averages areas, the reference's method there.
OpenCV runs one thread per call: the pipeline's threads use the cores.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from mixer_jax.data import randaug as randaug_lib

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

_REGISTRY: dict[str, Callable[..., Op]] = {}
_BATCH_OPS: set[str] = set()

cv2.setNumThreads(1)


class PreprocessError(ValueError):
    """A preprocessing string that names an unknown op or passes it bad arguments."""


def register(name: str, *, batch: bool = False):
    """Registers an op factory under `name`; `batch=True`: the op acts on whole batches."""

    def wrap(factory: Callable[..., Op]) -> Callable[..., Op]:
        _REGISTRY[name] = factory
        if batch:
            _BATCH_OPS.add(name)
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


LABEL_OPS = ("onehot",)  # Ops that read and write labels only.


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A parsed preprocessing string. Call it on an example for the whole string (batch ops aside).

    Pipelines call `example_fn` per example and `batch_fn` per batch (the batch ops, `mixup`). A
    `value_range` followed only by label ops is left to `on_device`, the first op of the jitted
    step: the host then stacks and ships uint8 images, a quarter of the bytes, and skips a pass over
    them. (After `mixup` the batch is float32 in [0, 255]; the affine map commutes with mixing.)
    """

    ops: tuple[Op, ...]
    batch_ops: tuple[Op, ...]
    raw_image: bool  # Starts with `decode`: the source should hand over the encoded bytes.
    deferred: int | None = None  # Index in `ops` of the value_range that `on_device` applies.
    device_range: tuple[float, float] | None = None  # Its (vmin, vmax).
    num_classes: int | None = None  # The class count of the `onehot` op, if there is one.

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        for op in self.ops:
            example = op(example, rng)
        return example

    def example_fn(self, example: Example, rng: np.random.Generator) -> Example:
        for i, op in enumerate(self.ops):
            if i != self.deferred:
                example = op(example, rng)
        return example

    @property
    def has_batch_fn(self) -> bool:
        return bool(self.batch_ops)

    def batch_fn(self, batch: Example, rng: np.random.Generator | None) -> Example:
        for op in self.batch_ops:
            batch = op(batch, rng)
        return batch

    def on_device(self, images: Any) -> Any:
        """The deferred `value_range` of a batch of pipeline images (numpy or jax): float32 in
        [vmin, vmax]. Images pass through unchanged when the string has none to defer."""
        if self.device_range is None:
            return images
        vmin, vmax = self.device_range
        return images.astype(np.float32) * np.float32((vmax - vmin) / 255.0) + np.float32(vmin)


def parse(pp: str, *, allow_batch_ops: bool = True) -> Preprocess:
    """The ops in `pp`, split on `|`. Raises PreprocessError."""
    ops, batch_ops, specs, num_classes = [], [], [], None
    for spec in filter(None, (s.strip() for s in pp.split("|"))):
        name, args, kwargs = _parse_op(spec)
        if name not in _REGISTRY:
            raise PreprocessError(
                f"unknown preprocessing op {name!r} in {pp!r}; known ops: {', '.join(sorted(_REGISTRY))}"
            )
        if name in _BATCH_OPS and not allow_batch_ops:
            raise PreprocessError(
                f"preprocessing op {spec!r} mixes the examples of a training batch; it belongs at the end of "
                f"config key 'input.pp_train', not in {pp!r}"
            )
        if name not in _BATCH_OPS and batch_ops:
            raise PreprocessError(
                f"preprocessing op {spec!r} acts on single examples, so it must come before the batch op(s) "
                f"{[n for n, _, _ in specs if n in _BATCH_OPS]} in {pp!r}"
            )
        try:
            (batch_ops if name in _BATCH_OPS else ops).append(_REGISTRY[name](*args, **kwargs))
        except (TypeError, ValueError) as e:
            raise PreprocessError(f"preprocessing op {spec!r}: {e}") from None
        specs.append((name, args, kwargs))
        if name == "onehot":
            num_classes = kwargs.get("num_classes", args[0] if args else None)
    example_specs = [(n, a, k) for n, a, k in specs if n not in _BATCH_OPS]
    deferred = device_range = None
    for i in reversed(range(len(example_specs))):
        name, args, kwargs = example_specs[i]
        if name == "value_range":
            bound = inspect.signature(value_range).bind(*args, **kwargs)
            bound.apply_defaults()
            deferred, device_range = i, (float(bound.arguments["vmin"]), float(bound.arguments["vmax"]))
        if name not in LABEL_OPS:
            break
    raw_image = bool(specs) and specs[0][0] == "decode"
    return Preprocess(
        tuple(ops),
        tuple(batch_ops),
        raw_image=raw_image,
        deferred=deferred,
        device_range=device_range,
        num_classes=num_classes,
    )


def image_ops(pp: str) -> str:
    """`pp` without its label and batch ops: what it does to an image alone (e.g. an eval string
    applied to image files that come without labels)."""
    specs = filter(None, (s.strip() for s in pp.split("|")))
    return "|".join(s for s in specs if _parse_op(s)[0] not in (*LABEL_OPS, *_BATCH_OPS))


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _size(size: Any) -> tuple[int, int]:
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return _positive_int("height", size[0]), _positive_int("width", size[1])
    s = _positive_int("size", size)
    return s, s


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A JPEG whose header alone is read; `mode` is the mode it is delivered in (RGB or L)."""

    data: bytes
    height: int
    width: int
    mode: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.height, self.width


def _height_width(image: np.ndarray | Encoded) -> tuple[int, int]:
    return image.size if isinstance(image, Encoded) else image.shape[:2]


def _channels_last(out: np.ndarray) -> np.ndarray:
    return out[..., None] if out.ndim == 2 else out


def _finish(image: Image.Image, mode: str | None) -> np.ndarray:
    if mode and image.mode != mode:
        image = image.convert(mode)
    return _channels_last(np.asarray(image))


def _decode_any(data: bytes, mode: str) -> np.ndarray:
    """PNG, GIF, BMP, CMYK JPEG, ...: OpenCV, else PIL (which raises on what neither reads)."""
    flags = (cv2.IMREAD_COLOR_RGB if mode == "RGB" else cv2.IMREAD_GRAYSCALE) | cv2.IMREAD_IGNORE_ORIENTATION
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return _finish(Image.open(io.BytesIO(data)), mode) if out is None else _channels_last(out)


def _decode(image: Encoded, reduce: int = 1) -> np.ndarray:
    """The uint8 (H, W, C) pixels of a JPEG, at 1/`reduce` (1, 2, 4 or 8) of its size by DCT scaling.

    The fast integer IDCT with smooth chroma upsampling gives the same pixels as `tf.io.decode_jpeg`'s
    defaults, which the reference pipelines use. EXIF orientation is ignored, as there.
    """
    try:
        return simplejpeg.decode_jpeg(
            image.data,
            colorspace="RGB" if image.mode == "RGB" else "GRAY",
            fastdct=True,
            min_height=-(-image.height // reduce),
            min_width=-(-image.width // reduce),
        )
    except ValueError:  # CMYK or YCCK: libjpeg's own colour conversion.
        return _decode_any(image.data, image.mode)


def pixels(image: np.ndarray | Encoded) -> np.ndarray:
    """The uint8 (H, W, C) pixels of a decoded array or an `Encoded` image."""
    return _decode(image) if isinstance(image, Encoded) else image


def _crop_resize(
    image: np.ndarray | Encoded, box: tuple[float, ...], height: int, width: int, *, area: bool = False
) -> np.ndarray:
    """Crops `box` (left, top, right, bottom) and resizes it to height x width: bilinear, or by area
    averaging when `area` is set or the crop shrinks by 2x or more.

    Without `area`, an `Encoded` JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that
    keeps the box at least the output size, so a large image is decoded at a fraction of its size.
    (The scales in between decode slower than the full size.) With `area` it is decoded whole: DCT
    scaling is not area averaging.
    """
    shrink = min((box[2] - box[0]) / width, (box[3] - box[1]) / height)
    if isinstance(image, Encoded):
        full_h, full_w = image.size
        reduce = min(8, 2 ** math.floor(math.log2(shrink))) if shrink >= 2 and not area else 1
        image = _decode(image, reduce)
        sy, sx = image.shape[0] / full_h, image.shape[1] / full_w
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        shrink *= min(sx, sy)
    left, top = round(box[0]), round(box[1])
    right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
    crop = image[top:bottom, left:right]
    if crop.shape[:2] == (height, width):
        return crop
    interpolation = cv2.INTER_AREA if area or shrink >= 2 else cv2.INTER_LINEAR
    return _channels_last(cv2.resize(crop, (width, height), interpolation=interpolation))


def _resize(image: np.ndarray | Encoded, height: int, width: int, *, area: bool = False) -> np.ndarray:
    h, w = _height_width(image)
    return _crop_resize(image, (0, 0, w, h), height, width, area=area)


def _encoded_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        return value.item()
    return None


@register("decode")
def decode(channels: int = 3) -> Op:
    """Encoded JPEG/PNG bytes -> an `Encoded` image, decoded by the next op that needs pixels.

    Delivers `channels` = 3 (RGB; grayscale, palette and CMYK images are converted) or 1 (L).
    Already decoded images (datasets read without `decode` first) get the same channel count.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    mode = "RGB" if channels == 3 else "L"

    def op(ex, rng):
        image = ex["image"]
        if (data := _encoded_bytes(image)) is not None:
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                return ex | {"image": Encoded(data, height, width, mode)}
            except ValueError:  # Not a JPEG: nothing to gain from decoding later.
                return ex | {"image": _decode_any(data, mode)}
        image = pixels(image)
        if image.shape[-1] != channels:
            image = _finish(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), mode)
        return ex | {"image": image}

    return op


def _distorted_box(
    height: int, width: int, area_range: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random crop box (left, top, right, bottom) drawn as `tf.image.sample_distorted_bounding_box`
    draws it with `min_object_covered=0`, as the reference pipelines' `inception_crop` calls it.

    Up to 100 attempts: an aspect ratio (width / height) uniform in [0.75, 1.33], then a height
    uniform between those of the smallest and the largest allowed area (clipped to the image), and an
    offset uniform over the positions that keep the box inside (TF's upper bound is exclusive, so a
    box never touches the bottom or right edge unless it spans the image). All attempts failing, the
    whole image. Python's `round` is TF's `lrintf` (ties to even).
    """
    min_area, max_area = (a * height * width for a in area_range)
    for _ in range(100):
        ratio = rng.uniform(0.75, 1.33)
        h, h_max = round(math.sqrt(min_area / ratio)), round(math.sqrt(max_area / ratio))
        if round(h_max * ratio) > width:  # The tallest box whose rounded width fits.
            h_max = int((width + 0.5 - 1e-7) / ratio)
            if round(h_max * ratio) > width:
                h_max -= 1
        h_max = min(h_max, height)
        h = min(h, h_max)
        if h < h_max:
            h += int(rng.integers(h_max - h + 1))
        w = round(h * ratio)
        if w * h < min_area:  # Rounding errors: a slightly larger box, then a slightly smaller one.
            h += 1
            w = round(h * ratio)
        if w * h > max_area:
            h -= 1
            w = round(h * ratio)
        if min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(height - h)) if h < height else 0
            x = int(rng.integers(width - w)) if w < width else 0
            return x, y, x + w, y + h
    return 0, 0, width, height


@register("inception_crop")
def inception_crop(size: Any, area_min: float = 5, area_max: float = 100) -> Op:
    """Random crop of area_min..area_max percent of the image, aspect ratio 0.75..1.33 (Szegedy et
    al.), drawn as in the reference pipelines (`_distorted_box`), resized to size x size (or
    (height, width))."""
    h, w = _size(size)
    if not 0 < area_min <= area_max <= 100:
        raise ValueError(f"inception_crop needs 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}")
    area_range = (area_min / 100, area_max / 100)

    def op(ex, rng):
        box = _distorted_box(*_height_width(ex["image"]), area_range, rng)
        return ex | {"image": _crop_resize(ex["image"], box, h, w)}

    return op


@register("resize")
def resize(size: Any) -> Op:
    """Bilinear resize of `image` to size x size, or to (height, width)."""
    h, w = _size(size)

    def op(ex, rng):
        return ex | {"image": _resize(ex["image"], h, w)}

    return op


@register("resize_small")
def resize_small(size: int) -> Op:
    """Resize so that the shorter side is `size`, keeping the aspect ratio, by area averaging: the
    reference pipelines' `resize_small` (`tf.image.resize`'s "area" method)."""
    _positive_int("size", size)

    def op(ex, rng):
        height, width = _height_width(ex["image"])
        scale = size / min(height, width)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        return ex | {"image": _resize(ex["image"], new_height, new_width, area=True)}

    return op


@register("central_crop")
def central_crop(size: Any) -> Op:
    """The central size x size (or (height, width)) window."""
    h, w = _size(size)

    def op(ex, rng):
        height, width = _height_width(ex["image"])
        if height < h or width < w:
            raise ValueError(f"central_crop({h}, {w}) of an image of {height}x{width}; resize it first")
        top, left = (height - h) // 2, (width - w) // 2
        image = ex["image"]
        if isinstance(image, Encoded):
            return ex | {"image": _crop_resize(image, (left, top, left + w, top + h), h, w)}
        return ex | {"image": image[top : top + h, left : left + w]}

    return op


@register("rgb")
def rgb() -> Op:
    """Grayscale (H, W, 1) -> (H, W, 3); RGB images pass through."""

    def op(ex, rng):
        im = pixels(ex["image"])
        return ex | {"image": np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im}

    return op


@register("pad_crop")
def pad_crop(pad: int) -> Op:
    """Random translation: zero-pad each side by `pad` pixels, then crop the original size."""
    _positive_int("pad", pad)

    def op(ex, rng):
        im = pixels(ex["image"])
        y, x = rng.integers(0, 2 * pad + 1, size=2)
        # The crop at (y, x) of the padded image, written straight into zeros (np.pad took most of
        # this op's time on small images).
        (out_y, in_y), (out_x, in_x) = _shift(im.shape[0], y - pad), _shift(im.shape[1], x - pad)
        out = np.zeros_like(im)
        out[out_y, out_x] = im[in_y, in_x]
        return ex | {"image": out}

    return op


def _shift(n: int, d: int) -> tuple[slice, slice]:
    """(output, input) slices of an axis of n pixels whose content moves by -d (pixel i + d lands on i)."""
    lo = max(-d, 0)
    hi = max(lo, min(n, n - d))
    return slice(lo, hi), slice(lo + d, hi + d)


@register("flip_lr")
def flip_lr() -> Op:
    """Horizontal flip with probability 1/2."""

    def op(ex, rng):
        im = pixels(ex["image"])
        if rng.random() < 0.5:  # A contiguous copy: numpy stacks reversed views about 10x slower.
            im = cv2.flip(im, 1).reshape(im.shape) if im.dtype == np.uint8 else np.ascontiguousarray(im[:, ::-1])
        return ex | {"image": im}

    return op


@register("randaug")
def randaug(num_layers: int = 2, magnitude: float = 15) -> Op:
    """RandAugment: `num_layers` random ops at `magnitude` (10 = the reference's nominal maximum)."""
    _positive_int("num_layers", num_layers)
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= 30:
        raise ValueError(f"magnitude must be a number in [0, 30], got {magnitude!r}")

    def op(ex, rng):
        return ex | {"image": randaug_lib.randaugment(pixels(ex["image"]), num_layers, magnitude, rng)}

    return op


@register("value_range")
def value_range(vmin: float = -1.0, vmax: float = 1.0) -> Op:
    """uint8 [0, 255] -> float32 [vmin, vmax]; elementwise, so it applies to a batch as well."""
    if not vmin < vmax:
        raise ValueError(f"value_range needs vmin < vmax, got ({vmin}, {vmax})")
    scale = (vmax - vmin) / 255.0

    def op(ex, rng):
        out = np.multiply(pixels(ex["image"]), np.float32(scale), dtype=np.float32)
        out += np.float32(vmin)
        return ex | {"image": out}

    return op


@register("onehot")
def onehot(num_classes: int, key: str = "label", outkey: str = "labels") -> Op:
    """Integer label (or a list of labels: multi-hot) -> float32 vector `labels`."""
    _positive_int("num_classes", num_classes)

    def op(ex, rng):
        label = np.asarray(ex[key])
        labels = (int(label),) if label.ndim == 0 else (label.min(), label.max()) if label.size else ()
        if any(not 0 <= x < num_classes for x in labels):
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


@register("mixup", batch=True)
def mixup(alpha: float = 0.5) -> Op:
    """Batch-level mixup (Zhang et al.): images and labels become w * x + (1 - w) * x', w ~ Beta(alpha, alpha).

    The partner x' of the example at local position i is the one at i + n/2 (mod n) in the local
    batch of n: globally, position j + B/2 of the global batch of B, which lives on the same process
    for any process count, so the mixed global batch does not depend on the number of processes.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")

    def op(batch, rng):
        n = len(batch["image"])
        if n % 2:
            raise ValueError(f"mixup pairs the halves of each process's batch, which has an odd size {n}")
        weight = np.float32(rng.beta(alpha, alpha))
        mixed = {}
        for key in ("image", "labels"):
            x = batch[key].astype(np.float32, copy=False)
            mixed[key] = weight * x + (1 - weight) * np.roll(x, n // 2, axis=0)
        return batch | mixed

    return op
