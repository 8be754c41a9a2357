"""Input pipelines: TFDS ArrayRecord data sources read through grain.

Training order is a pure function of (seed, example position): a global shuffle, reshuffled every
epoch, with per-example augmentation randomness keyed by the global position. Process p of P
takes positions p, p+P, p+2P, ... so global batch b is always the examples at positions
[b*B, (b+1)*B), whatever the number of processes. The iterator's state (`get_state`/`set_state`)
resumes the stream exactly.

Evaluation visits every example exactly once: the split is padded to a whole number of global
batches with masked copies, so every process runs the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
    without data. Same fields as a TFDS image classification source."""

    def __init__(self, num_examples: int, image_size: int, num_classes: int):
        self.num_examples, self.image_size, self.num_classes = num_examples, image_size, num_classes

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        return {"image": image, "label": int(rng.integers(self.num_classes))}


FIELDS = ("image", "labels")


class DatasetError(ValueError):
    """A dataset that cannot be read as configured. The message names the fix."""


def resolve_data_dir(data_dir: str) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def get_builder(name: str, data_dir: str, *, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`; built-in datasets are prepared on first use."""
    data_dir = resolve_data_dir(data_dir)
    if name in BUILTIN:
        builder = BUILTIN[name](data_dir=data_dir, file_format="array_record")
        if prepare and not builder.is_prepared():
            builder.download_and_prepare()
        return builder
    build_cmd = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several types for unknown or unreadable datasets.
        raise DatasetError(
            f"dataset {name!r} was not found under data_dir {data_dir} ({type(e).__name__}). Prepare it "
            f"with `{build_cmd}`, or set config key 'input.data_dir' to where it lives."
        ) from None
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


def check(input_config: ml_collections.ConfigDict) -> None:
    """Start-up checks: the ops parse, the dataset and splits exist. Raises DatasetError/PreprocessError."""
    preprocess.parse(input_config.pp_train)
    preprocess.parse(input_config.pp_eval)
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


def _source(config: ml_collections.ConfigDict, split: str):
    if config.input.dataset == SYNTHETIC:
        return SyntheticSource(SYNTHETIC_SPLITS[split], config.model.image_size, config.model.num_classes)
    builder = get_builder(config.input.dataset, config.input.data_dir)
    return builder.as_data_source(split=split)


def _select(example: dict[str, Any]) -> dict[str, np.ndarray]:
    missing = [k for k in FIELDS if k not in example]
    if missing:
        raise DatasetError(
            f"preprocessing left no {missing} field(s); end it with ops that produce them, e.g. "
            f"'value_range(-1,1)|onehot(NUM_CLASSES)'. It produced {sorted(example)}."
        )
    return {k: example[k] for k in FIELDS}


def make_train(config: ml_collections.ConfigDict, *, process_index: int, process_count: int) -> grain.DatasetIterator:
    """The infinite, checkpointable stream of this process's training batches."""
    pp = preprocess.parse(config.input.pp_train)
    ds = grain.MapDataset.source(_source(config, config.input.train_split))
    ds = ds.seed(config.seed).shuffle().repeat()
    ds = ds.random_map(lambda ex, rng: _select(pp(ex, rng)))
    ds = ds[process_index::process_count]
    ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
    options = grain.ReadOptions(num_threads=config.input.num_workers, prefetch_buffer_size=config.input.prefetch)
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
    source = _source(config, split or config.input.eval_split)
    pp = preprocess.parse(config.input.pp_eval)
    num_examples = len(source)
    num_batches = math.ceil(num_examples / config.batch_size)

    def load(position: int) -> dict[str, np.ndarray]:
        example = _select(pp(source[min(position, num_examples - 1)], np.random.default_rng(position)))
        return example | {"mask": np.bool_(position < num_examples)}

    ds = grain.MapDataset.range(num_batches * config.batch_size)[process_index::process_count]
    ds = ds.map(load).batch(config.batch_size // process_count)
    options = grain.ReadOptions(num_threads=config.input.num_workers, prefetch_buffer_size=config.input.prefetch)
    return EvalData(ds, num_examples, num_batches, options)
