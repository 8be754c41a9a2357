"""Classify image files with Mixer weights and print the top classes with their probabilities.

python -m mixer_jax.predict --weights=PATH [--variant=B/16] [--image_size=224] [--labels=imagenet2012|FILE|TFDS_NAME]
    [--data_dir=DIR] IMAGE...

Any JPEG or PNG of any size. A checkpoint of this trainer preprocesses the files as its run
evaluated (its saved `input.pp_eval`, label ops aside), so its predictions are those of its
evaluation. Weights files, a checkpoint at another --image_size, or --crop_fraction: the shorter
side is resized (bicubic) to image_size / crop_fraction, the centre image_size x image_size is
cropped, and pixels are scaled to [-1, 1].
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import numpy as np
from PIL import Image

from mixer_jax import models
from mixer_jax.data import preprocess

CROP_FRACTION = 0.875  # timm's crop_pct for the released Mixer weights.


class LabelsError(ValueError):
    """Class names that cannot be found; the message says where they were looked for."""


def load_image(path: str, image_size: int, crop_fraction: float = CROP_FRACTION) -> np.ndarray:
    """(image_size, image_size, 3) float32 in [-1, 1]: resize the shorter side, centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        short = max(image_size, round(image_size / crop_fraction))
        w, h = im.size
        scale = short / min(w, h)
        im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
        left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im, np.float32) / 127.5 - 1.0


def load_image_as_evaluated(path: str, pp_eval: str, image_size: int) -> np.ndarray:
    """(image_size, image_size, 3) float32: the file through a run's eval preprocessing `pp_eval`.

    A string that does not start with `decode` (a dataset stored decoded) gets the file decoded by
    the pipeline's own `decode` first, to RGB.
    """
    fallback = "; pass --crop_fraction to resize and crop instead"
    try:
        ops = preprocess.parse(preprocess.image_ops(pp_eval), allow_batch_ops=False)
    except preprocess.PreprocessError as e:
        raise ValueError(f"the checkpoint's input.pp_eval {pp_eval!r}: {e}{fallback}") from None
    with open(path, "rb") as f:
        example = {"image": f.read()}
    try:
        if not ops.raw_image:
            example = _DECODE(example, None)
        out = np.asarray(preprocess.pixels(ops(example, np.random.default_rng(0))["image"]), np.float32)
    except (ValueError, OSError, cv2.error) as e:  # An unreadable file, or an op that cannot take it.
        raise ValueError(f"{path}: {e}") from None
    if out.shape != (image_size, image_size, 3):
        raise ValueError(
            f"the checkpoint's input.pp_eval {pp_eval!r} makes {out.shape} of {path}, but the model takes "
            f"({image_size}, {image_size}, 3){fallback}"
        )
    return out


_DECODE = preprocess.decode()


def label_names(labels: str, num_classes: int, data_dir: str = "") -> list[str]:
    """Class names: "" (indices), a file with one name per line, "imagenet2012" (the WordNet IDs that
    tfds ships as its ClassLabel names) or any TFDS dataset prepared under `data_dir`."""
    if not labels:
        return [f"class {i}" for i in range(num_classes)]
    if os.path.isfile(labels):
        with open(labels) as f:
            names = [line.strip() for line in f if line.strip()]
        where = labels
    elif labels == "imagenet2012":
        names, where = _imagenet2012_names(), "tensorflow_datasets' imagenet2012 labels.txt"
    else:
        from mixer_jax.data import pipeline

        try:
            builder = pipeline.get_builder(labels, data_dir, prepare=False)
            names = list(builder.info.features["label"].names)
        except (pipeline.DatasetError, KeyError, AttributeError) as e:
            raise LabelsError(
                f"--labels={labels!r} is neither a file nor a TFDS dataset with a 'label' ClassLabel "
                f"under data_dir {pipeline.resolve_data_dir(data_dir)!r}: {e}"
            ) from None
        where = f"TFDS dataset {labels}"
    if len(names) != num_classes:
        raise LabelsError(f"{where} has {len(names)} class names, but the model has {num_classes} classes")
    return names


def _imagenet2012_names() -> list[str]:
    import importlib.resources

    try:
        text = importlib.resources.files("tensorflow_datasets").joinpath("datasets/imagenet2012/labels.txt")
        return text.read_text().split()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise LabelsError(
            f"the imagenet2012 class names ship with tensorflow_datasets, which is not usable here ({e}); "
            f"pass --labels=FILE with one class name per line"
        ) from None


def predict(params: Any, model: models.MlpMixer, images: np.ndarray) -> np.ndarray:
    """Softmax probabilities (N, num_classes) for images (N, H, W, 3) in [-1, 1]."""
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
    return np.asarray(jax.nn.softmax(logits, -1))


def main(argv: Sequence[str] | None = None) -> int:
    from mixer_jax import weights

    parser = argparse.ArgumentParser(prog="python -m mixer_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help=".npz, .safetensors, .pth, workdir or checkpoint")
    parser.add_argument("--variant", default=None, help="e.g. B/16; checked against the weights if given")
    parser.add_argument("--image_size", type=int, default=None, help="default: the weights' own")
    parser.add_argument("--labels", default="", help="imagenet2012, a file (one name per line) or a TFDS dataset")
    parser.add_argument("--data_dir", default="", help="TFDS data_dir for --labels=TFDS_NAME")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument(
        "--crop_fraction",
        type=float,
        default=None,
        help=f"resize the shorter side to image_size / this, centre crop (default {CROP_FRACTION}, timm's; "
        "a checkpoint of this trainer: its eval preprocessing)",
    )
    parser.add_argument(
        "--gelu_exact", action="store_true", help="exact GELU (timm-trained weights; a checkpoint's saved config says)"
    )
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    if args.crop_fraction is not None and not 0 < args.crop_fraction <= 1:
        parser.error(f"--crop_fraction={args.crop_fraction} must lie in (0, 1]; timm's is {CROP_FRACTION}")
    if args.top < 1:
        parser.error(f"--top={args.top} must be at least 1")
    try:
        saved = weights.saved_config(args.weights)  # {} for a weights file.
        model, params = weights.load_model(
            args.weights, args.variant, image_size=args.image_size, gelu_exact=args.gelu_exact, saved=saved
        )
        names = label_names(args.labels, model.num_classes, args.data_dir)
        pp_eval = saved.get("input", {}).get("pp_eval", "")
        if args.crop_fraction is None and pp_eval and saved.get("model", {}).get("image_size") == model.image_size:
            images = np.stack([load_image_as_evaluated(p, pp_eval, model.image_size) for p in args.images])
        else:
            crop = args.crop_fraction or CROP_FRACTION
            images = np.stack([load_image(p, model.image_size, crop) for p in args.images])
    except (weights.WeightsError, LabelsError, OSError, ValueError) as e:  # ValueError: e.g. --variant=X/4.
        print(f"mixer_jax.predict: error: {e}", file=sys.stderr)
        return 2
    probs = predict(params, model, images)
    for path, p in zip(args.images, probs, strict=True):
        print(path)
        for i in np.argsort(-p)[: args.top]:
            print(f"  {p[i]:.4f}  {i:>5d}  {names[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
