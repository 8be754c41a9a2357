"""predict and visualize on real files: JPEG/PNG inputs of odd sizes, PNG outputs checked for size and content."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from mixer_jax import predict, visualize
from mixer_jax.data import pipeline, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(digits_run):
    return digits_run.workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A digit-like JPEG of 300x200 and a grayscale PNG of 40x64, drawn with PIL."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    jpeg = str(d / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(jpeg, quality=90)
    png = str(d / "seven.png")
    seven = np.zeros((64, 40), np.uint8)
    seven[8:14, 6:34] = 255
    seven[14:58, 24:30] = 255
    Image.fromarray(seven, mode="L").save(png)
    return jpeg, png


def top_lines(out: str) -> dict[str, list[tuple[float, int, str]]]:
    result, current = {}, None
    for line in out.splitlines():
        if m := re.fullmatch(r"  ([\d.]+)\s+(\d+)  (.+)", line):
            result[current].append((float(m.group(1)), int(m.group(2)), m.group(3)))
        else:
            current = line
            result[current] = []
    return result


def test_load_image_resizes_and_crops(images):
    jpeg, png = images
    for path in images:
        x = predict.load_image(path, 16)
        assert x.shape == (16, 16, 3) and x.dtype == np.float32 and -1 <= x.min() < x.max() <= 1
    assert predict.load_image(png, 224).shape == (224, 224, 3)


def test_predict_top5_with_label_sources(workdir, images, data_dir, tmp_path, capsys):
    assert predict.main([f"--weights={workdir}", "--variant=Ti/4", *images]) == 0
    tops = top_lines(capsys.readouterr().out)
    assert list(tops) == list(images)
    for rows in tops.values():
        probs = [p for p, _, _ in rows]
        assert len(rows) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert all(name == f"class {i}" for _, i, name in rows)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit-{i}\n" for i in range(10)))
    assert predict.main([f"--weights={workdir}", f"--labels={names}", "--top=3", images[1]]) == 0
    rows = top_lines(capsys.readouterr().out)[images[1]]
    assert len(rows) == 3 and all(name.startswith("digit-") for _, _, name in rows)
    assert predict.main([f"--weights={workdir}", "--labels=digits", f"--data_dir={data_dir}", images[1]]) == 0
    assert all(name == str(i) for _, i, name in top_lines(capsys.readouterr().out)[images[1]])
    assert predict.main([f"--weights={workdir}", "--labels=imagenet2012", images[1]]) == 2
    assert "has 1000 class names, but the model has 10 classes" in capsys.readouterr().err
    assert predict.label_names("imagenet2012", 1000)[:2] == ["n01440764", "n01443537"]


def test_predict_takes_the_checkpoints_gelu_and_checks_its_arguments(workdir, images, tmp_path, capsys, monkeypatch):
    """A checkpoint saved with exact GELU predicts with it, as --gelu_exact asks for on any weights."""
    seen = []

    def record(params, model, batch):
        seen.append(model.gelu_approximate)
        return np.full((len(batch), model.num_classes), 1 / model.num_classes)

    monkeypatch.setattr(predict, "predict", record)
    exact = tmp_path / "exact"
    shutil.copytree(workdir, exact, ignore=shutil.ignore_patterns("events.*"))
    step = max((d for d in os.listdir(exact / "checkpoints") if d.isdigit()), key=int)
    saved = exact / "checkpoints" / step / "config" / "metadata"
    config = json.loads(saved.read_text())
    assert config["model"]["gelu_approximate"] is True
    config["model"]["gelu_approximate"] = False
    saved.write_text(json.dumps(config))
    for args in ([f"--weights={workdir}"], [f"--weights={workdir}", "--gelu_exact"], [f"--weights={exact}"]):
        assert predict.main([*args, images[0]]) == 0
    assert seen == [True, False, False]
    assert predict.main([f"--weights={workdir}", "--variant=X/4", images[0]]) == 2
    assert "unknown model variant 'X/4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([f"--weights={workdir}", "--crop_fraction=0", images[0]])
    assert "--crop_fraction=0.0 must lie in (0, 1]" in capsys.readouterr().err


def test_predict_preprocesses_as_the_run_evaluated(workdir, data_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint's image files go through its saved input.pp_eval: digits test images saved as PNGs
    reach the model exactly as its evaluation's inputs. --crop_fraction asks for resize and crop."""
    config = load_config("digits")
    config.input.data_dir = data_dir
    pp = preprocess.parse(config.input.pp_eval, allow_batch_ops=False)
    source, paths, expected = pipeline._source(config, "test"), [], []
    for i in range(3):
        example = source[i]
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(example["image"][..., 0], mode="L").save(paths[-1])
        expected.append(pp(dict(example), None)["image"])
    seen = []
    monkeypatch.setattr(predict, "predict", lambda p, model, batch: seen.append(batch) or np.ones((len(batch), 10)))
    assert predict.main([f"--weights={workdir}", *paths]) == 0
    np.testing.assert_array_equal(seen[0], np.stack(expected))
    assert predict.main([f"--weights={workdir}", "--crop_fraction=0.875", *paths]) == 0
    assert seen[1].shape == seen[0].shape and not np.array_equal(seen[1], seen[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert predict.main([f"--weights={workdir}", paths[0], str(bad)]) == 2
    assert f"error: {bad}: " in capsys.readouterr().err


def test_predict_command_line(workdir, images):
    result = subprocess.run(
        [sys.executable, "-m", "mixer_jax.predict", f"--weights={workdir}", "--variant=Ti/4", *images],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [len(rows) for rows in top_lines(result.stdout).values()] == [5, 5]


def assert_png(path: str, size: tuple[int, int]):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # Not blank.
    assert (pixels < 200).any(axis=-1).mean() > 0.01


def test_visualize_tokens(workdir, tmp_path):
    out = str(tmp_path / "tokens.png")
    assert visualize.main(["tokens", f"--weights={workdir}", "--variant=Ti/4", "--blocks=0,3", f"--out={out}"]) == 0
    # Ti/4 at 16: 64 hidden units on a 4x4 grid, 16 per row, each 48 px + 2 px gaps; two titled sections.
    assert_png(out, (16 * 50 + 2, 2 * (4 * 50 + 2 + 18)))
    units = visualize.token_mixing_units(
        {"MixerBlock_0/token_mixing/Dense_0/kernel": np.arange(32.0).reshape(16, 2)}, 0
    )
    np.testing.assert_array_equal(units[1], np.arange(1, 32, 2).reshape(4, 4))  # Unit 1 over the 4x4 tokens.
    assert visualize.main(["tokens", f"--weights={workdir}", "--blocks=9", f"--out={out}"]) == 2


def test_visualize_curves_from_jsonl_and_events(workdir, tmp_path):
    out = str(tmp_path / "curves.png")
    assert visualize.main(["curves", f"--workdir={workdir}", f"--out={out}"]) == 0
    assert_png(out, (3 * 480, 320))
    series = visualize.read_metrics(workdir)
    assert {"train/loss", "train/lr", "eval/accuracy"} <= set(series)
    events_only = tmp_path / "events_only"
    events_only.mkdir()
    for name in os.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            shutil.copy(os.path.join(workdir, name), events_only)
    from_events = visualize.read_metrics(str(events_only))
    assert [s for s, _ in from_events["train/loss"]] == [s for s, _ in series["train/loss"]]
    np.testing.assert_allclose([v for _, v in from_events["train/loss"]], [v for _, v in series["train/loss"]], 1e-6)
    assert visualize.main(["curves", f"--workdir={events_only}"]) == 0
    assert_png(str(events_only / "curves.png"), (3 * 480, 320))
