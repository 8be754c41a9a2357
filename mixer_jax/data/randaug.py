"""RandAugment (Cubuk et al., 2019) with PIL and numpy: `num_layers` random ops at one magnitude.

The op list, the magnitude scale and the argument ranges follow the reference TPU implementation
that the ViT and Mixer recipes were tuned with: magnitude 10 is the nominal maximum
(`MAX_LEVEL`), and the recipes use 15 and 20, beyond it. Each chosen op is applied: the reference
draws a probability from U(0.2, 0.8) for it but never uses it. Signed arguments (rotation, shear,
translation) are negated with probability 1/2; geometric ops fill with gray (128). All randomness
comes from the given `numpy.random.Generator`, so an augmented image is a pure function of the
example's rng.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_PIXELS = 100
CUTOUT_HALF_SIDE = 40


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, fillcolor=FILL)


def _solarize_add(image: Image.Image, addition: int, threshold: int = 128) -> Image.Image:
    x = np.asarray(image).astype(np.int16)
    return Image.fromarray(np.where(x < threshold, np.clip(x + addition, 0, 255), x).astype(np.uint8))


def _cutout(image: Image.Image, half_side: int, rng: np.random.Generator) -> Image.Image:
    x = np.array(image)
    h, w = x.shape[:2]
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    x[max(0, cy - half_side) : cy + half_side, max(0, cx - half_side) : cx + half_side] = FILL
    return Image.fromarray(x)


def _enhance(kind) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    return lambda im, level, rng: kind(im).enhance(level / MAX_LEVEL * 1.8 + 0.1)


# name -> fn(image, level, rng); the argument mappings are those of the reference implementation.
OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "AutoContrast": lambda im, level, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, level, rng: ImageOps.equalize(im),
    "Invert": lambda im, level, rng: ImageOps.invert(im),
    "Rotate": lambda im, level, rng: im.rotate(_signed(level / MAX_LEVEL * 30, rng), fillcolor=FILL),
    "Posterize": lambda im, level, rng: ImageOps.posterize(im, int(np.clip(int(level / MAX_LEVEL * 4), 0, 8))),
    "Solarize": lambda im, level, rng: ImageOps.solarize(im, int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda im, level, rng: _solarize_add(im, int(level / MAX_LEVEL * 110)),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda im, level, rng: _affine(im, (1, _signed(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda im, level, rng: _affine(im, (1, 0, 0, _signed(level / MAX_LEVEL * 0.3, rng), 1, 0)),
    "TranslateX": lambda im, level, rng: _affine(
        im, (1, 0, _signed(level / MAX_LEVEL * TRANSLATE_PIXELS, rng), 0, 1, 0)
    ),
    "TranslateY": lambda im, level, rng: _affine(
        im, (1, 0, 0, 0, 1, _signed(level / MAX_LEVEL * TRANSLATE_PIXELS, rng))
    ),
    "Cutout": lambda im, level, rng: _cutout(im, int(level / MAX_LEVEL * CUTOUT_HALF_SIDE), rng),
}
NAMES = tuple(OPS)


def randaugment(image: np.ndarray, num_layers: int, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Applies `num_layers` ops, each drawn uniformly from `OPS` (with repetition)."""
    gray = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(np.repeat(image, 3, axis=-1) if gray else image)
    for _ in range(num_layers):
        pil = OPS[NAMES[int(rng.integers(len(NAMES)))]](pil, magnitude, rng)
    out = np.asarray(pil)
    return out[..., :1] if gray else out
