"""The input pipeline at scale: encoded images, augmentation recipes, exact resume, image-folder import."""

import io
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import assert_train_stream_resumes, load_config
from PIL import Image

from mixer_jax import checkpointing, train
from mixer_jax.config import defaults
from mixer_jax.data import pipeline, prepare, preprocess

CLASSES = ("bird", "cat", "dog")
NUM_TEST = 1003
AUGMENT = "decode|inception_crop(16)|flip_lr|randaug(2,15)|value_range(-1,1)|onehot(3)|mixup(0.5)"


def _image(rng, cls: int, size=(40, 30)) -> Image.Image:
    """A smooth random image tinted by its class, so the classes are tellable apart."""
    coarse = rng.integers(0, 160, (4, 4, 3)).astype(np.uint8)
    coarse[..., cls] += 90
    return Image.fromarray(coarse).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder (JPEG, PNG, one grayscale JPEG, one palette PNG, two corrupt files), imported once."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 36), ("test", NUM_TEST)):
        for i in range(count):
            cls = i % 3
            d = root / split / CLASSES[cls]
            d.mkdir(parents=True, exist_ok=True)
            size = (40, 30) if split == "train" else (16, 16)
            _image(rng, cls, size).save(d / f"{i:04d}.{'jpg' if i % 2 else 'png'}")
    _image(rng, 1).convert("L").save(root / "train" / "cat" / "gray.jpg")
    _image(rng, 0).convert("P").save(root / "train" / "bird" / "palette.png")
    Image.fromarray(np.full((30, 40), 32896, np.uint16)).save(root / "train" / "dog" / "gray16.png")  # 128.5 * 256.
    (root / "train" / "dog" / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    png = io.BytesIO()
    _image(rng, 1).save(png, format="PNG")
    (root / "train" / "cat" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    report = prepare.import_image_folder(str(root), "toy_folder", data_dir, verbose=False)
    return data_dir, report


def folder_config(data_dir, pp_train=AUGMENT, batch_size=8):
    c = defaults()
    c.input.dataset, c.input.data_dir = "toy_folder", data_dir
    c.input.pp_train = pp_train
    c.input.pp_eval = "decode|resize(16)|value_range(-1,1)|onehot(3)"
    c.model.update(variant="Mu/4", image_size=16, num_classes=3)
    c.batch_size = batch_size
    return c


def test_image_folder_import(folder):
    data_dir, report = folder
    assert report.kept == {"train": 39, "test": NUM_TEST} and report.converted["train"] == 3
    assert sorted(p for p, _ in report.skipped) == ["train/cat/truncated.png", "train/dog/garbage.jpg"]
    with open(os.path.join(report.directory, prepare.REPORT)) as f:
        text = f.read()
    assert "skipped 2 unreadable file(s)" in text and "train/dog/garbage.jpg" in text
    builder = pipeline.get_builder("toy_folder", data_dir)
    assert builder.info.features["label"].names == list(CLASSES)
    source = builder.as_data_source("train")
    by_name = {bytes(source[i]["file_name"]).decode(): source[i] for i in range(len(source))}
    gray = by_name["train/cat/gray.jpg"]
    assert gray["image"].shape == (30, 40, 3) and gray["label"] == 1
    assert by_name["train/bird/palette.png"]["image"].shape == (30, 40, 3)
    assert (by_name["train/dog/gray16.png"]["image"] == 128).all()  # Scaled to 8 bits, not clipped to 255.
    with pytest.raises(ValueError, match="already exists"):
        prepare.import_image_folder(str(data_dir), "toy_folder", data_dir, verbose=False)


def test_encoded_source_and_ops(folder):
    data_dir, _ = folder
    c = folder_config(data_dir)
    raw = pipeline._source(c, "train", raw_image=True)[0]
    assert isinstance(raw["image"], bytes)
    pp = preprocess.parse("decode|inception_crop(16, area_min=50)|flip_lr|randaug(3, 20)|value_range(0, 1)")
    out = pp(raw, np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    evaluated = preprocess.parse("decode|resize_small(20)|central_crop(18)")(raw, None)["image"]
    assert evaluated.shape == (18, 18, 3) and evaluated.dtype == np.uint8  # 40x30 -> 27x20 -> 18x18.
    # JPEG draft mode: an 8x larger image cropped to the same output decodes at reduced scale.
    big = io.BytesIO()
    _image(np.random.default_rng(1), 2, (800, 600)).save(big, format="JPEG", quality=95)
    small = preprocess.parse("decode|resize(30)")({"image": big.getvalue()}, None)["image"]
    direct = np.asarray(Image.open(big).convert("RGB").resize((30, 30), Image.BILINEAR))
    assert small.shape == (30, 30, 3) and np.abs(small.astype(int) - direct).mean() < 3
    for op in preprocess.randaug_lib.NAMES:  # Every RandAugment op keeps shape and dtype.
        image = np.asarray(_image(np.random.default_rng(2), 0, (24, 24)))
        augmented = preprocess.randaug_lib.OPS[op](Image.fromarray(image), 15, np.random.default_rng(0))
        assert np.asarray(augmented).shape == (24, 24, 3), op


def test_decode_and_resize_match_tensorflow():
    """JPEGs decode to exactly `tf.io.decode_jpeg`'s pixels (the reference pipelines' decoder), other
    formats and modes to PIL's; crops resize as `tf.image.resize` (bilinear, half-pixel centres)."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).resize((320, 240), Image.BICUBIC)
    encoded = {}
    for name, image, fmt in (
        ("rgb.jpg", photo, "JPEG"),
        ("gray.jpg", photo.convert("L"), "JPEG"),
        ("cmyk.jpg", photo.convert("CMYK"), "JPEG"),
        ("rgb.png", photo, "PNG"),
        ("palette.png", photo.convert("P"), "PNG"),
        ("rgba.png", photo.convert("RGBA"), "PNG"),
    ):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, quality=90)
        encoded[name] = buffer.getvalue()
    for name, data in encoded.items():
        for channels in (3, 1):
            ours = preprocess.pixels(preprocess.parse(f"decode({channels})")({"image": data}, None)["image"])
            if name.endswith(".jpg") and name != "cmyk.jpg":
                reference = tf.io.decode_jpeg(data, channels=channels).numpy()
                np.testing.assert_array_equal(ours, reference, err_msg=name)
            else:
                reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if channels == 3 else "L"))
                diff = np.abs(ours.astype(int) - reference.reshape(ours.shape))
                # PNGs are lossless (grayscale rounds differently by 1); CMYK JPEGs go through another
                # IDCT and colour conversion than PIL's.
                tolerance = (8, 1.0) if name == "cmyk.jpg" else (1, 1.0) if channels == 1 else (0, 1.0)
                assert ours.shape[-1] == channels, (name, channels, ours.shape)
                assert diff.max() <= tolerance[0] and diff.mean() < tolerance[1], (name, channels, diff.max())
    # Crop and resize: inception_crop's box, resized like TF's bilinear (no antialiasing below 2x).
    data = encoded["rgb.jpg"]
    box = (37, 21, 37 + 190, 21 + 170)  # left, top, right, bottom: shrink 190/160 and 170/120.
    decoded = preprocess.parse("decode")({"image": data}, None)["image"]
    ours = preprocess._crop_resize(decoded, box, 120, 160)
    crop = tf.io.decode_jpeg(data, channels=3)[box[1] : box[3], box[0] : box[2]]
    reference = tf.image.resize(crop, (120, 160), method="bilinear", antialias=False).numpy()
    diff = np.abs(ours.astype(np.float32) - reference)
    assert ours.shape == (120, 160, 3) and diff.max() <= 1 and diff.mean() < 0.5, (diff.max(), diff.mean())
    # resize_small averages areas, as `tf.image.resize(method="area")` (which truncates to uint8), by
    # less than 2x and by more (where a JPEG is not decoded at a reduced DCT scale).
    for size in (180, 100):
        ours = preprocess.parse(f"decode|resize_small({size})")({"image": data}, None)["image"]
        shape = (size, round(size * 4 / 3))
        reference = tf.cast(tf.image.resize(tf.io.decode_jpeg(data, channels=3), shape, method="area"), tf.uint8)
        diff = np.abs(ours.astype(int) - reference.numpy())
        assert ours.shape == (*shape, 3) and diff.max() <= 1 and diff.mean() < 0.6, (size, diff.max(), diff.mean())


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b, grid = np.sort(a), np.sort(b), np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def test_inception_crop_draws_boxes_as_tensorflow():
    """inception_crop's boxes follow `tf.image.sample_distorted_bounding_box` (the reference pipelines'
    sampler): area, aspect ratio and vertical position, each over 2,000 draws with fixed seeds. The
    KS distance stays under 0.062, the 0.001 level; torchvision's sampler (area uniform, 10 tries),
    used before, is at 0.19 in area."""
    import tensorflow as tf

    height, width, draws = 375, 500, 2000
    ours, theirs = [], []
    for i in range(draws):
        left, top, right, bottom = preprocess._distorted_box(height, width, (0.05, 1.0), np.random.default_rng(i))
        ours.append((top, bottom - top, right - left))
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3],
            tf.zeros([0, 0, 4]),
            seed=[i, 1],
            area_range=(0.05, 1.0),
            min_object_covered=0,
            use_image_if_no_bounding_boxes=True,
        )
        theirs.append((int(begin[0]), int(size[0]), int(size[1])))
    ours, theirs = np.array(ours), np.array(theirs)
    for name, stat in (
        ("area", lambda b: b[:, 1] * b[:, 2] / (height * width)),
        ("aspect ratio", lambda b: b[:, 2] / b[:, 1]),
        ("top", lambda b: b[:, 0] / np.maximum(1, height - b[:, 1])),
    ):
        assert _ks_distance(stat(ours), stat(theirs)) < 0.062, name
    assert (ours[:, 0] + ours[:, 1] <= height).all() and (ours[:, 1] * ours[:, 2] >= 0.05 * height * width).all()


def test_randaug_applies_an_op_in_every_layer(monkeypatch):
    """As the reference: each of the num_layers draws applies its op (the drawn probability is unused)."""
    applied = []
    for name, op in list(preprocess.randaug_lib.OPS.items()):
        monkeypatch.setitem(
            preprocess.randaug_lib.OPS, name, lambda im, level, rng, op=op: applied.append(1) or op(im, level, rng)
        )
    image = np.asarray(_image(np.random.default_rng(2), 0, (24, 24)))
    for seed in range(50):
        preprocess.randaug_lib.randaugment(image, 2, 15, np.random.default_rng(seed))
    assert len(applied) == 100


@pytest.mark.parametrize(
    "pp,allow,message",
    [
        ("decode|mixup(0.5)|flip_lr", True, "must come before the batch op"),
        ("decode|value_range(-1,1)|onehot(3)|mixup(0.5)", False, "belongs at the end of config key 'input.pp_train'"),
        ("mixup(-1)", True, "alpha must be a number > 0"),
        ("randaug(2, 45)", True, r"magnitude must be a number in \[0, 30\]"),
        ("inception_crop(224, area_min=0)", True, "0 < area_min <= area_max <= 100"),
        ("decode(channels=2)", True, "channels must be 1 or 3"),
    ],
)
def test_new_op_errors(pp, allow, message):
    with pytest.raises(preprocess.PreprocessError, match=message):
        preprocess.parse(pp, allow_batch_ops=allow)


def test_an_empty_split_is_a_config_error(folder):
    c = folder_config(folder[0])
    c.input.eval_split = "test[:0]"
    with pytest.raises(pipeline.DatasetError, match=r"'input.eval_split' is 'test\[:0\]', which holds no examples"):
        pipeline.check(c)


def test_mixup_needs_an_even_share_per_process():
    c = load_config("b16_i1k", "variant=Mu/32")
    c.input.dataset, c.input.eval_split, c.batch_size = "synthetic", "test", 6
    pipeline.check(c, process_count=1)
    with pytest.raises(preprocess.PreprocessError, match="'batch_size' 6 over 2 process.*odd 3"):
        pipeline.check(c, process_count=2)


def test_augmented_stream_deterministic_across_process_counts(folder):
    data_dir, _ = folder
    c = folder_config(data_dir)
    one = pipeline.make_train(c, process_index=0, process_count=1)
    again = pipeline.make_train(c, process_index=0, process_count=1)
    halves = [pipeline.make_train(c, process_index=p, process_count=2) for p in range(2)]
    unmixed = pipeline.make_train(
        folder_config(data_dir, AUGMENT.removesuffix("|mixup(0.5)")), process_index=0, process_count=1
    )
    for step in range(6):  # 48 positions: the 38 examples and part of the next epoch.
        a, b, x = next(one), next(again), next(unmixed)
        parts = [next(h) for h in halves]
        for key in ("image", "labels"):
            np.testing.assert_array_equal(a[key], b[key])
            union = np.empty_like(a[key])
            union[0::2], union[1::2] = parts[0][key], parts[1][key]
            np.testing.assert_array_equal(union, a[key])
        # Mixup: w * x + (1 - w) * (x rolled by half the batch), w ~ Beta(0.5, 0.5) from (seed, step).
        w = np.float32(np.random.default_rng((0, pipeline.BATCH_RNG_TAG, step)).beta(0.5, 0.5))
        for key in ("image", "labels"):
            np.testing.assert_allclose(a[key], w * x[key] + (1 - w) * np.roll(x[key], 4, axis=0), atol=1e-6)
        # The host ships [0, 255]; the step maps it to value_range(-1,1).
        assert a["image"].min() >= 0 and a["image"].max() <= 255
        scaled = preprocess.parse(c.input.pp_train).on_device(a["image"])
        assert scaled.dtype == np.float32 and scaled.min() >= -1 and scaled.max() <= 1
    c.seed = 1
    assert not np.array_equal(next(pipeline.make_train(c, process_index=0, process_count=1))["image"], a["image"])
    c.seed, c.batch_size = 0, 6
    with pytest.raises(preprocess.PreprocessError, match="odd 3"):
        pipeline.make_train(c, process_index=0, process_count=2)


def test_augmented_stream_resumes_exactly(folder):
    data_dir, _ = folder
    assert_train_stream_resumes(folder_config(data_dir))


def _mock_imagenet_metadata(data_dir: str) -> None:
    """imagenet2012's real feature metadata, stored as ArrayRecord, for tfds.testing.mock_data."""
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    splits = [
        tfds.core.SplitInfo(
            name=name,
            shard_lengths=[n],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_path, dataset_name="imagenet2012", split=name, filetype_suffix="array_record"
            ),
        )
        for name, n in (("train", 1_281_167), ("validation", 50_000))
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.set_file_format("array_record", override=True)
    os.makedirs(builder.data_path, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def test_imagenet2012_on_mock_data(tmp_path):
    data_dir = str(tmp_path)
    _mock_imagenet_metadata(data_dir)
    c = load_config("b16_i1k", "variant=Mu/16")
    c.input.data_dir = data_dir
    c.input.pp_train = c.input.pp_train.replace("224", "32")
    c.input.pp_eval = c.input.pp_eval.replace("256", "36").replace("224", "32")
    c.batch_size = 8
    with tfds.testing.mock_data(num_examples=21, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
        pipeline.check(c)
        assert isinstance(pipeline._source(c, "train", raw_image=True)[0]["image"], bytes)  # JPEG bytes.
        stream = pipeline.make_train(c, process_index=0, process_count=1)
        to_train_input = preprocess.parse(c.input.pp_train).on_device
        for _ in range(3):
            batch = next(stream)  # Mixup mixes the uint8 images; the step scales them.
            assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
            images = to_train_input(batch["image"])
            assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1
            assert batch["labels"].shape == (8, 1000)
            np.testing.assert_allclose(batch["labels"].sum(-1), 1, rtol=1e-6)
        evaluation = pipeline.make_eval(c, process_index=0, process_count=1)
        batches = list(evaluation)
        assert evaluation.num_examples == 21 and len(batches) == evaluation.num_batches == 3
        labels = np.concatenate([b["labels"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert mask.sum() == 21 and (labels.sum(-1) == 1).all() and labels.shape == (24, 1000)
        images = np.concatenate([b["image"] for b in batches])
        assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8  # Scaled in the eval step:
        images = preprocess.parse(c.input.pp_eval).on_device(images)
        assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1


def test_eval_counts_every_example_through_trainer(folder, tmp_path):
    """1,003 examples, batch 64, 8 devices: the trainer counts each once and matches a plain loop."""
    data_dir, _ = folder
    assert jax.device_count() == 8
    c = folder_config(data_dir, pp_train="decode|inception_crop(16)|flip_lr|value_range(-1,1)|onehot(3)", batch_size=64)
    c.update(total_steps=3, warmup_steps=1, lr=0.01, log_every=1, eval_every=0, checkpoint_every=0)
    c.input.eval_split = "test"
    pipeline.check(c)
    metrics = train.train_and_evaluate(c, str(tmp_path))
    assert metrics["eval/examples"] == NUM_TEST

    _, state = checkpointing.load_state_numpy(str(tmp_path / "checkpoints"))
    model = train.create_model(c)
    source = pipeline.get_builder("toy_folder", data_dir).as_data_source("test")
    pp = preprocess.parse(c.input.pp_eval)
    examples = [pp(source[i], None) for i in range(len(source))]
    images = np.stack([preprocess.pixels(e["image"]) for e in examples])
    labels = np.array([e["label"] for e in examples])
    logits = np.asarray(model.apply({"params": state["params"]}, images, train=False))
    correct = int((logits.argmax(-1) == labels).sum())
    assert len(source) == NUM_TEST and metrics["eval/accuracy"] == correct / NUM_TEST


@pytest.mark.parametrize("name", ["b16_i1k", "l16_i21k", "jft"])
def test_recipe_runs_two_synthetic_steps(name, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.SYNTHETIC_SPLITS, "test", 16)
    c = load_config(name, "variant=Mu/32")
    c.input.dataset, c.input.eval_split = "synthetic", "test"
    c.input.num_workers = 2
    c.update(batch_size=8, total_steps=2, warmup_steps=1, log_every=1, eval_every=0, checkpoint_every=0)
    metrics = train.train_and_evaluate(c, str(tmp_path))
    assert metrics["eval/examples"] == 16 and np.isfinite(metrics["eval/loss"])
