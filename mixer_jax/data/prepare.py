"""Image-folder import: DIR/<split>/<class>/*.jpg|*.png -> a TFDS ArrayRecord dataset, loadable by name.

python -m mixer_jax.data.prepare --image_folder=DIR --name=NAME [--data_dir=DATA_DIR] [--version=1.0.0]

Every sub-directory of DIR is a split and every sub-directory of a split a class; the class names
(the union over splits, sorted) become the `label` ClassLabel names. RGB JPEG and PNG files are
stored byte for byte; grayscale, palette, CMYK and alpha images are converted to RGB and re-encoded.
Files that cannot be decoded are skipped, counted and listed in a report, which is printed and
written to DATA_DIR/NAME/VERSION/import_report.txt. The result trains with
`--config.input.dataset=NAME --config.input.data_dir=DATA_DIR`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import sys
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png")
REPORT = "import_report.txt"


@dataclasses.dataclass
class ImportReport:
    """What the import kept and skipped, per split."""

    name: str
    directory: str
    class_names: list[str]
    kept: dict[str, int] = dataclasses.field(default_factory=dict)
    converted: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    ignored: list[str] = dataclasses.field(default_factory=list)  # Not .jpg/.jpeg/.png.

    def text(self) -> str:
        lines = [f"dataset {self.name} at {self.directory}", f"{len(self.class_names)} classes"]
        for split, n in self.kept.items():
            lines.append(f"split {split}: {n} images ({self.converted[split]} converted to RGB)")
        lines.append(f"skipped {len(self.skipped)} unreadable file(s)")
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} file(s) that are not {'/'.join(EXTENSIONS)}")
            lines += [f"  {path}" for path in self.ignored]
        return "\n".join(lines) + "\n"


def _load(path: str) -> tuple[bytes, bool]:
    """(bytes to store, whether they were re-encoded as RGB). Raises on an unreadable image."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Decodes fully: truncated and corrupt files fail here.
        if image.format in ("JPEG", "PNG") and image.mode == "RGB":
            return data, False
        out = io.BytesIO()
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: convert() would clip at 255.
            image = Image.fromarray((np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8))
        rgb = image.convert("RGB")
        if image.format == "JPEG":
            rgb.save(out, format="JPEG", quality=95)
        else:
            rgb.save(out, format="PNG")
        return out.getvalue(), True


def _scan(image_folder: str) -> dict[str, list[tuple[str, str]]]:
    """split -> [(relative path, class name)], sorted."""
    splits = {}
    for split in sorted(os.listdir(image_folder)):
        split_dir = os.path.join(image_folder, split)
        if not os.path.isdir(split_dir):
            continue
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split directory {split_dir!r}: split names may use only letters, digits and '_'")
        files = []
        for cls in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, cls)
            if os.path.isdir(class_dir):
                for root, _, names in os.walk(class_dir):
                    files += [(os.path.relpath(os.path.join(root, n), image_folder), cls) for n in sorted(names)]
        splits[split] = files
    if not splits:
        raise ValueError(f"image folder {image_folder!r} has no split directories; expected DIR/<split>/<class>/*.jpg")
    return splits


def import_image_folder(
    image_folder: str, name: str, data_dir: str, *, version: str = "1.0.0", verbose: bool = True
) -> ImportReport:
    """Writes the image folder as TFDS dataset `name` (ArrayRecord) under `data_dir`; returns the report."""
    from mixer_jax.data import pipeline

    data_dir = pipeline.resolve_data_dir(data_dir)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    if name in pipeline.BUILTIN or name == pipeline.SYNTHETIC:
        raise ValueError(f"dataset name {name!r} is taken by a built-in dataset; choose another")
    target = os.path.join(data_dir, name, version)
    if os.path.exists(target):
        raise ValueError(f"{target} already exists; delete it or import under another --version")
    scanned = _scan(image_folder)
    class_names = sorted({cls for files in scanned.values() for _, cls in files})
    if not class_names:
        raise ValueError(f"image folder {image_folder!r} has no class directories with images")
    report = ImportReport(name, target, class_names)
    label = {cls: i for i, cls in enumerate(class_names)}

    # One pass to check every file, so the report is complete before anything is written.
    good: dict[str, list[tuple[str, str, bool]]] = {}
    for split, files in scanned.items():
        good[split] = []
        for rel, cls in files:
            if not rel.lower().endswith(EXTENSIONS):
                report.ignored.append(rel)
                continue
            try:
                _, converted = _load(os.path.join(image_folder, rel))
            except Exception as e:  # PIL raises many types for corrupt data.
                report.skipped.append((rel, f"{type(e).__name__}: {e}"))
                continue
            good[split].append((rel, cls, converted))
        report.kept[split] = len(good[split])
        report.converted[split] = sum(c for *_, c in good[split])

    def examples(split: str) -> Iterator[tuple[str, dict]]:
        for rel, cls, _ in good[split]:
            data, _ = _load(os.path.join(image_folder, rel))
            yield rel, {"image": data, "label": label[cls], "file_name": rel}

    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=class_names),
            "file_name": tfds.features.Text(),
        }
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version=version,
        features=features,
        split_datasets={split: examples(split) for split in good if good[split]},
        data_dir=data_dir,
        description=f"Imported from the image folder {os.path.abspath(image_folder)}.",
        file_format="array_record",
    )
    text = report.text()
    with open(os.path.join(target, REPORT), "w") as f:
        f.write(text)
    if verbose:
        print(text, end="")
    return report


def synthetic_image_folder(
    directory: str, *, num_images: int, num_classes: int = 10, size: tuple[int, int] = (500, 375), seed: int = 0
) -> None:
    """Writes DIR/train/<class>/*.jpg: smooth random images with fine texture (about ImageNet's
    JPEG size and decode cost at 500x375, quality 90), for benchmarks where no dataset is at hand."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(num_images):
        coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        texture = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(image, np.float32) + texture, 0, 255).astype(np.uint8)
        class_dir = os.path.join(directory, "train", f"class_{i % num_classes:03d}")
        os.makedirs(class_dir, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(class_dir, f"{i:06d}.jpg"), quality=90)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    try:
        report = import_image_folder(f.image_folder, f.name, f.data_dir, version=f.version)
    except ValueError as e:
        sys.exit(f"mixer_jax.data.prepare: error: {e}")
    print(f"train on it with --config.input.dataset={report.name} --config.input.data_dir={f.data_dir or '...'}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("image_folder", None, "DIR holding DIR/<split>/<class>/*.jpg|*.png.", required=True)
    flags.DEFINE_string("name", None, "TFDS name of the new dataset.", required=True)
    flags.DEFINE_string("data_dir", "", "TFDS data_dir to write to ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).")
    flags.DEFINE_string("version", "1.0.0", "Dataset version.")
    app.run(main)
