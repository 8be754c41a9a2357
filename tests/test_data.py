"""The built-in digits dataset, preprocessing ops, and the grain pipelines."""

import os
import re

import numpy as np
import pytest
from conftest import assert_train_stream_resumes
from sklearn.datasets import load_digits

from mixer_jax.config import defaults
from mixer_jax.data import digits, pipeline, preprocess


def digits_config(data_dir, batch_size=64):
    c = defaults()
    c.input.dataset, c.input.data_dir = "digits", data_dir
    c.input.pp_train = "pad_crop(1)|resize(16)|rgb|value_range(-1,1)|onehot(10)"
    c.input.pp_eval = "resize(16)|rgb|value_range(-1,1)|onehot(10)"
    c.batch_size = batch_size
    return c


def test_digits_split_is_fixed_and_complete(data_dir):
    idx = digits.split_indices()
    assert len(idx["train"]) == 1437 and len(idx["test"]) == 360
    assert sorted(np.concatenate([idx["train"], idx["test"]]).tolist()) == list(range(1797))
    source = pipeline.get_builder("digits", data_dir).as_data_source()
    assert len(source["train"]) == 1437 and len(source["test"]) == 360
    # The stored examples are scikit-learn's, scaled to uint8: compare the whole test split as a multiset.
    sk = load_digits()
    want = sorted(
        (int(sk.target[i]), np.round(sk.images[i] * 255 / 16).astype(np.uint8).tobytes()) for i in idx["test"]
    )
    got = sorted((int(ex["label"]), ex["image"][..., 0].tobytes()) for ex in (source["test"][i] for i in range(360)))
    assert got == want


def test_digits_prepared_once(data_dir):
    path = os.path.join(data_dir, "digits", "1.0.0")
    stamp = os.path.getmtime(path)
    builder = pipeline.get_builder("digits", data_dir)
    assert builder.is_prepared() and os.path.getmtime(path) == stamp


def test_preprocess_ops():
    ex = {"image": np.full((8, 8, 1), 255, np.uint8), "label": 3}
    out = preprocess.parse("resize(16)|rgb|value_range(-1, 1)|onehot(10)")(ex, np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    np.testing.assert_allclose(out["image"], 1.0)
    np.testing.assert_array_equal(out["labels"], np.eye(10)[3])
    multi = preprocess.parse("onehot(5)")({"label": [0, 4]}, None)
    np.testing.assert_array_equal(multi["labels"], [1, 0, 0, 0, 1])
    shift = preprocess.parse("pad_crop(2)")
    crops = [shift({"image": np.ones((4, 4, 1), np.uint8)}, np.random.default_rng(s))["image"] for s in range(20)]
    assert all(c.shape == (4, 4, 1) for c in crops)
    assert {int(c.sum()) for c in crops} > {16} and min(int(c.sum()) for c in crops) >= 4


@pytest.mark.parametrize("pad", [1, 2, 5, 9])
def test_pad_crop_is_the_crop_of_the_zero_padded_image(pad):
    """Against np.pad, with the op's own draws; pads as wide as the image included."""
    image = np.random.default_rng(pad).integers(1, 256, (8, 6, 3), dtype=np.uint8)
    op = preprocess.parse(f"pad_crop({pad})")
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for seed in range(30):
        y, x = np.random.default_rng(seed).integers(0, 2 * pad + 1, size=2)
        got = op({"image": image}, np.random.default_rng(seed))["image"]
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, padded[y : y + 8, x : x + 6])


@pytest.mark.parametrize(
    "pp,message",
    [
        ("resize(16)|blur(2)", "unknown preprocessing op 'blur'"),
        ("resize(0)", "size must be a positive integer"),
        ("value_range(1, -1)", "vmin < vmax"),
        ("resize(16", "cannot parse preprocessing op"),
        ("onehot(n)", "arguments must be literals"),
        ("resize(16, 16, 16)", "resize(16, 16, 16)"),
    ],
)
def test_preprocess_errors(pp, message):
    with pytest.raises(preprocess.PreprocessError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preprocess.parse(pp)


def test_train_stream_is_deterministic_and_process_independent(data_dir):
    c = digits_config(data_dir)
    one = pipeline.make_train(c, process_index=0, process_count=1)
    again = pipeline.make_train(c, process_index=0, process_count=1)
    halves = [pipeline.make_train(c, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        a, b = next(one), next(again)
        np.testing.assert_array_equal(a["image"], b["image"])
        parts = [next(h) for h in halves]
        assert a["image"].shape == (64, 16, 16, 3) and parts[0]["image"].shape == (32, 16, 16, 3)
        # Same examples, augmentation included: process p holds positions p, p+2, ...
        union = np.empty_like(a["image"])
        union[0::2], union[1::2] = parts[0]["image"], parts[1]["image"]
        np.testing.assert_array_equal(union, a["image"])
    c.seed = 1
    other = pipeline.make_train(c, process_index=0, process_count=1)
    assert not np.array_equal(
        next(other)["image"],
        next(pipeline.make_train(digits_config(data_dir), process_index=0, process_count=1))["image"],
    )


def test_train_iterator_resumes_exactly(data_dir):
    assert_train_stream_resumes(digits_config(data_dir))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once(data_dir, process_count):
    c = digits_config(data_dir, batch_size=64)
    views = [pipeline.make_eval(c, process_index=p, process_count=process_count) for p in range(process_count)]
    assert all(v.num_examples == 360 and v.num_batches == 6 for v in views)  # ceil(360 / 64)
    labels, masks = [], []
    for v in views:
        batches = list(v)
        assert len(batches) == 6 and all(b["image"].shape[0] == 64 // process_count for b in batches)
        labels.append(np.concatenate([b["labels"].argmax(-1) for b in batches]))
        masks.append(np.concatenate([b["mask"] for b in batches]))
    assert sum(m.sum() for m in masks) == 360
    # The real examples are the test split in order, each exactly once.
    order = np.empty(6 * 64, np.int64)
    mask = np.empty(6 * 64, bool)
    for p in range(process_count):
        order[p::process_count], mask[p::process_count] = labels[p], masks[p]
    source = pipeline.get_builder("digits", data_dir).as_data_source("test")
    np.testing.assert_array_equal(order[mask], [source[i]["label"] for i in range(360)])
    assert mask[:360].all() and not mask[360:].any()


@pytest.mark.parametrize(
    "key, pp, message",
    [
        ("pp_eval", "resize(32)|rgb|value_range(-1,1)|onehot(10)", "'input.pp_eval' makes images of shape (32, 32, 3)"),
        ("pp_train", "resize(16)|value_range(-1,1)|onehot(10)", "images of shape (16, 16, 1)"),
        ("pp_eval", "resize(16)|rgb|value_range(-1,1)", "'input.pp_eval' ('resize(16)|rgb|value_range(-1,1)') fails"),
        ("pp_eval", "resize(16)|rgb|value_range(-1,1)", "left no ['labels'] field"),
        ("pp_train", "rgb|central_crop(16)|value_range(-1,1)|onehot(10)", "'input.pp_train' ('rgb|central_crop"),
    ],
)
def test_first_examples_must_fit_the_model(key, pp, message, data_dir):
    """Found before training (the trainer calls this first), not at the first evaluation."""
    c = digits_config(data_dir)
    c.model.update(variant="Mu/4", image_size=16, num_classes=10)
    pipeline.check_examples(c)
    c.input[key] = pp
    with pytest.raises(pipeline.DatasetError, match=re.escape(message)):
        pipeline.check_examples(c)


@pytest.mark.parametrize("key", ["pp_train", "pp_eval"])
def test_start_up_check_names_the_preprocessing_key(key, data_dir):
    c = digits_config(data_dir)
    c.input[key] = "resize(0)|value_range(-1,1)|onehot(10)"
    with pytest.raises(preprocess.PreprocessError, match=f"config key 'input.{key}': .*size must be a positive"):
        pipeline.check(c)


def test_missing_dataset_message(tmp_path):
    with pytest.raises(pipeline.DatasetError, match="tfds build cifar10 --data_dir=.* --file_format=array_record"):
        pipeline.get_builder("cifar10", str(tmp_path))
