"""Input pipelines: TFDS ArrayRecord data sources read through grain.

Training order is a pure function of (seed, example position): a global shuffle, reshuffled every
epoch, with per-example augmentation randomness keyed by the global position. Process p of P
takes positions p, p+P, p+2P, ... so global batch b is always the examples at positions
[b*B, (b+1)*B), whatever the number of processes. The iterator's state (`get_state`/`set_state`)
resumes the stream exactly.

Batch-level ops (`mixup`) run after batching with an rng seeded by (seed, batch index), so they
are part of the same pure function of (seed, step) and resume exactly.

When the preprocessing starts with `decode`, the source hands over the encoded JPEG/PNG bytes
(TFDS `SkipDecoding`) and the ops decode them, at reduced scale where they can. A final
`value_range` runs in the jitted step (`Preprocess.on_device`): batches leave the host as uint8.

Evaluation visits every example exactly once: the split is padded to a whole number of global
batches with masked copies, so every process runs the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mixer_jax.data import digits, preprocess

BUILTIN = {"digits": digits.Digits}
SYNTHETIC = "synthetic"
SYNTHETIC_SPLITS = {"train": 1_281_167, "test": 10_000}  # ImageNet-sized train split.


class SyntheticSource:
    """Random uint8 images and labels, a pure function of the index: bring-up and benchmarks
    without data. Same fields as a TFDS image classification source (`label`), plus the same
    label as a one-element list `labels` for multi-label recipes."""

    def __init__(self, num_examples: int, image_size: int, num_classes: int):
        self.num_examples, self.image_size, self.num_classes = num_examples, image_size, num_classes

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        label = int(rng.integers(self.num_classes))
        return {"image": image, "label": label, "labels": np.array([label])}


FIELDS = ("image", "labels")
BATCH_RNG_TAG = 0x6D6978  # Decorrelates batch-level randomness from the per-example streams.


class DatasetError(ValueError):
    """A dataset that cannot be read as configured. The message names the fix."""


def resolve_data_dir(data_dir: str) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def prepared_version_dir(name: str, data_dir: str) -> str | None:
    """DATA_DIR/NAME/VERSION (the highest version holding a dataset_info.json), or None."""
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        return None
    versions = [
        tuple(map(int, entry.split(".")))
        for entry in os.listdir(root)
        if re.fullmatch(r"\d+\.\d+\.\d+", entry) and os.path.isfile(os.path.join(root, entry, "dataset_info.json"))
    ]
    return os.path.join(root, ".".join(map(str, max(versions)))) if versions else None


def get_builder(name: str, data_dir: str, *, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`; built-in datasets are prepared on first use.

    A name outside the TFDS catalog is read from the files under DATA_DIR/NAME/VERSION (the highest
    version), so user-prepared datasets such as `imagenet21k` or an imported image folder load by name.
    """
    data_dir = resolve_data_dir(data_dir)
    if name in BUILTIN:
        builder = BUILTIN[name](data_dir=data_dir, file_format="array_record")
        if prepare and not builder.is_prepared():
            builder.download_and_prepare()
        return builder
    build_cmd = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
    import_cmd = f"python -m mixer_jax.data.prepare --image_folder=DIR --name={name} --data_dir={data_dir}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown or unreadable datasets.
        if not (version_dir := prepared_version_dir(name, data_dir)):
            raise DatasetError(
                f"dataset {name!r} was not found under data_dir {data_dir} ({type(e).__name__}): it is neither "
                f"in the TFDS catalog nor prepared at {os.path.join(data_dir, name)}/VERSION. Prepare a catalog "
                f"dataset with `{build_cmd}`, import an image folder DIR/SPLIT/CLASS/*.jpg with `{import_cmd}`, "
                f"or set config key 'input.data_dir' to where it lives."
            ) from None
        builder = tfds.builder_from_directory(version_dir)
    if not builder.is_prepared():
        raise DatasetError(
            f"dataset {name!r} is not prepared under data_dir {data_dir}. Prepare it with "
            f"`{build_cmd}` (ImageNet needs its archives in the manual dir first), or set config "
            f"key 'input.data_dir' to where it lives."
        )
    fmt = builder.info.file_format
    if fmt is None or fmt.value != "array_record":
        raise DatasetError(
            f"dataset {name!r} under {data_dir} is stored as {fmt.value if fmt else 'unknown'}, but "
            f"random access needs array_record. Convert it with `tfds convert_format "
            f"--root_data_dir={data_dir} --out_file_format=array_record` (after `pip install apache-beam`), "
            f"or rebuild with `{build_cmd}`."
        )
    return builder


def check(config: ml_collections.ConfigDict, *, process_count: int = 1) -> None:
    """Start-up checks: the ops parse and fit the model and batch; the dataset and splits exist.

    Raises DatasetError/PreprocessError.
    """
    input_config = config.input
    parsed = {key: _parse(config.input[key], f"input.{key}") for key in ("pp_train", "pp_eval")}
    _check_batch_ops(parsed["pp_train"], config.batch_size, process_count)
    for key, pp in parsed.items():
        classes = pp.num_classes
        if classes is not None and classes != config.model.num_classes:
            raise preprocess.PreprocessError(
                f"config key 'input.{key}' makes {classes}-class labels (onehot({classes})), but config key "
                f"'model.num_classes' is {config.model.num_classes}; make them agree."
            )
    builder = None  # Catalog and imported datasets: their split sizes are known before reading.
    if input_config.dataset == SYNTHETIC:
        splits = tuple(SYNTHETIC_SPLITS)
        known = lambda split: split in splits  # noqa: E731
    elif input_config.dataset in BUILTIN:  # Prepared on first use; its splits are fixed.
        splits = BUILTIN[input_config.dataset].SPLITS
        known = lambda split: split.split("[")[0] in splits  # noqa: E731
    else:
        builder = get_builder(input_config.dataset, input_config.data_dir, prepare=False)
        splits = list(builder.info.splits)
        known = lambda split: _split_exists(builder, split)  # noqa: E731
    for key in ("train_split", "eval_split"):
        if not known(input_config[key]):
            raise DatasetError(
                f"config key 'input.{key}' is {input_config[key]!r}, but dataset "
                f"{input_config.dataset!r} has the splits {sorted(splits)}."
            )
        if builder is not None and not builder.info.splits[input_config[key]].num_examples:
            raise DatasetError(
                f"config key 'input.{key}' is {input_config[key]!r}, which holds no examples of dataset "
                f"{input_config.dataset!r}; choose a split or slice with some."
            )
    _check_fewshot(config)


def _check_fewshot(config: ml_collections.ConfigDict) -> None:
    """Every few-shot dataset is prepared (or built in), has its splits and a `label` ClassLabel, and
    `fewshot.pp` parses: found now, not at the probe after the last step."""
    from mixer_jax import fewshot

    f = config.fewshot
    if not f.datasets:
        return
    if f.pp:
        _parse(f.pp, "fewshot.pp")
    try:
        datasets = fewshot.parse_datasets(f.datasets)
    except ValueError as e:
        raise DatasetError(f"config key 'fewshot.datasets': {e}.") from None
    for name, *wanted in datasets:
        if name in BUILTIN:  # Prepared on first use.
            splits = BUILTIN[name].SPLITS
            label = True
        else:
            builder = get_builder(name, config.input.data_dir, prepare=False)
            splits = list(builder.info.splits)
            label = isinstance(builder.info.features.get("label"), tfds.features.ClassLabel)
        if missing := [s for s in wanted if s.split("[")[0] not in splits]:
            raise DatasetError(
                f"config key 'fewshot.datasets': {name!r} has no split {missing[0]!r}; it has {sorted(splits)} "
                "(write NAME:TRAIN_SPLIT:TEST_SPLIT)."
            )
        if not label:
            raise DatasetError(
                f"config key 'fewshot.datasets': {name!r} has no 'label' ClassLabel feature, which the "
                "few-shot probe classifies."
            )


def check_examples(config: ml_collections.ConfigDict) -> None:
    """The first example of each split through its preprocessing fits the model: images of
    (image_size, image_size, 3) and labels num_classes wide. Needs the dataset prepared."""
    size, classes = config.model.image_size, config.model.num_classes
    for key, split in (("pp_train", config.input.train_split), ("pp_eval", config.input.eval_split)):
        pp = _parse(config.input[key], f"input.{key}")
        example = _source(config, split, raw_image=pp.raw_image)[0]
        try:
            example = _select(pp.example_fn(example, np.random.default_rng(0)))
        except ValueError as e:  # An op that cannot take this example, or missing fields.
            raise DatasetError(
                f"config key 'input.{key}' ({config.input[key]!r}) fails on the first example of split {split!r}: {e}"
            ) from None
        image, labels = np.shape(example["image"]), np.shape(example["labels"])
        if image != (size, size, 3):
            raise DatasetError(
                f"config key 'input.{key}' makes images of shape {image}, but the model takes ({size}, {size}, 3) "
                f"(config key 'model.image_size' is {size}); end its image ops with resize({size}) or a {size}-px crop."
            )
        if labels != (classes,):
            raise DatasetError(
                f"config key 'input.{key}' makes labels of shape {labels}, but config key 'model.num_classes' "
                f"is {classes}; end it with onehot({classes})."
            )


def _parse(pp: str, key: str) -> preprocess.Preprocess:
    """Parses preprocessing string `pp`, the value of config key `key`; its errors name the key.
    Batch ops (mixup) belong to the training string only."""
    try:
        return preprocess.parse(pp, allow_batch_ops=key == "input.pp_train")
    except preprocess.PreprocessError as e:
        raise preprocess.PreprocessError(f"config key '{key}': {e}") from None


def _check_batch_ops(pp: preprocess.Preprocess, batch_size: int, process_count: int) -> None:
    local_batch = batch_size // process_count
    if pp.batch_ops and local_batch % 2:
        raise preprocess.PreprocessError(
            f"mixup pairs the two halves of each process's batch, but config key 'batch_size' "
            f"{batch_size} over {process_count} process(es) gives an odd {local_batch}; use an even share."
        )


def _split_exists(builder: tfds.core.DatasetBuilder, split: str) -> bool:
    try:
        builder.info.splits[split]
        return True
    except (KeyError, ValueError):
        return False


def prepare(input_config: ml_collections.ConfigDict) -> None:
    """Prepares a built-in dataset if it is not yet (call on one process, then synchronise)."""
    if input_config.dataset in BUILTIN:
        get_builder(input_config.dataset, input_config.data_dir)


def _source(config: ml_collections.ConfigDict, split: str, *, raw_image: bool = False):
    """The split's random-access source; `raw_image`: images as encoded bytes, not decoded."""
    if config.input.dataset == SYNTHETIC:
        return SyntheticSource(SYNTHETIC_SPLITS[split], config.model.image_size, config.model.num_classes)
    builder = get_builder(config.input.dataset, config.input.data_dir)
    decoders = None
    features = builder.info.features
    if raw_image and "image" in features and isinstance(features["image"], tfds.features.Image):
        decoders = {"image": tfds.decode.SkipDecoding()}
    return builder.as_data_source(split=split, decoders=decoders)


def _select(example: dict[str, Any]) -> dict[str, np.ndarray]:
    missing = [k for k in FIELDS if k not in example]
    if missing:
        raise DatasetError(
            f"preprocessing left no {missing} field(s); end the string with ops that produce them, e.g. "
            f"'value_range(-1,1)|onehot(NUM_CLASSES)'. It produced {sorted(example)}."
        )
    return {"image": preprocess.pixels(example["image"]), "labels": example["labels"]}


def _read_options(input_config: ml_collections.ConfigDict) -> grain.ReadOptions:
    """Each of `num_workers` threads prepares whole batches; at least one batch per thread is in flight."""
    workers = input_config.num_workers
    return grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(input_config.prefetch, workers))


def make_train(config: ml_collections.ConfigDict, *, process_index: int, process_count: int) -> grain.DatasetIterator:
    """The infinite, checkpointable stream of this process's training batches."""
    pp = preprocess.parse(config.input.pp_train)
    local_batch = config.batch_size // process_count
    _check_batch_ops(pp, config.batch_size, process_count)
    ds = grain.MapDataset.source(_source(config, config.input.train_split, raw_image=pp.raw_image))
    ds = ds.seed(config.seed).shuffle().repeat()
    ds = ds.random_map(lambda ex, rng: _select(pp.example_fn(ex, rng)))
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    if pp.has_batch_fn:  # Batch b of every process is a share of global batch b.
        seed = config.seed
        ds = ds.map_with_index(lambda b, batch: pp.batch_fn(batch, np.random.default_rng((seed, BATCH_RNG_TAG, b))))
    options = _read_options(config.input)
    return iter(ds.to_iter_dataset(options))


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One process's view of an evaluation split: `num_batches` padded batches with a `mask`."""

    dataset: grain.MapDataset
    num_examples: int
    num_batches: int
    options: grain.ReadOptions

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset.to_iter_dataset(self.options))


def make_eval(
    config: ml_collections.ConfigDict, *, process_index: int, process_count: int, split: str | None = None
) -> EvalData:
    pp = preprocess.parse(config.input.pp_eval, allow_batch_ops=False)
    source = _source(config, split or config.input.eval_split, raw_image=pp.raw_image)
    num_examples = len(source)
    num_batches = math.ceil(num_examples / config.batch_size)

    def load(position: int) -> dict[str, np.ndarray]:
        example = _select(pp.example_fn(source[min(position, num_examples - 1)], np.random.default_rng(position)))
        return example | {"mask": np.bool_(position < num_examples)}

    ds = grain.MapDataset.range(num_batches * config.batch_size)[process_index::process_count]
    ds = ds.map(load).batch(config.batch_size // process_count)
    if pp.has_batch_fn:
        ds = ds.map(lambda batch: pp.batch_fn(batch, None))
    options = _read_options(config.input)
    return EvalData(ds, num_examples, num_batches, options)
