"""Few-shot linear evaluation: closed-form ridge regression from frozen pre-logits to ±1 targets.

The paper's transfer proxy (Section 3; the protocol of ViT, Section 4.1): for each dataset and
each number of shots (1, 5, 10, 25 images per class), `num_seeds` class-balanced draws from the
train split are mapped to their pre-logits (the mean-pooled output of `pre_head_layer_norm`),
standardised by the draw's per-feature mean and std (as big_vision), and regressed onto one-hot
targets mapped to {-1, +1} with an l2 penalty. The test split is classified by the argmax.

Intercept: the bias is not regularised. Features and targets are centred on their train mean
before the closed-form solve and the bias is recovered as mean(y) - mean(x) @ W, which is
exactly scikit-learn's `Ridge(alpha=l2_reg, fit_intercept=True)`.

Standalone: python -m mixer_jax.fewshot --weights=PATH [--variant=Ti/4] --dataset=digits [--data_dir=DIR]
From the trainer: `Evaluator(...)(params, model) -> {"fewshot/digits_10shot": accuracy, ...}`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import models

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0**10  # big_vision's fewshot_lsr default, on standardised features.


def ridge_fit(x: np.ndarray, y: np.ndarray, l2_reg: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimising |y - x W - b|² + l2_reg |W|², b unregularised; closed form in float64.

    Solves the D x D system (XᵀX + λI) W = XᵀY when there are at least as many examples N as
    features D, else the N x N dual W = Xᵀ (XXᵀ + λI)⁻¹ Y; both give the same W.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if n >= d:
        w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ yc)
    else:
        w = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), yc)
    return w, y_mean - x_mean @ w


def probe_accuracy(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    l2_reg: float = DEFAULT_L2_REG,
) -> float:
    """Test accuracy of the ridge probe fitted on (train_x, train_labels); see the module docstring."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    targets = 2.0 * np.eye(num_classes)[train_labels] - 1.0
    w, b = ridge_fit((train_x - mean) / std, targets, l2_reg)
    scores = ((test_x - mean) / std) @ w + b
    return float(np.mean(np.argmax(scores, -1) == test_labels))


def pre_logits_fn(model: models.MlpMixer, params: Any) -> Callable[[Any, np.ndarray], jax.Array]:
    """A jitted `(params, images) -> pre-logits (float32)`; sharded params give replicated features."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    out = None
    if isinstance(sharding, jax.sharding.NamedSharding):  # Gather the features on every process.
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=out)
    def features(params: Any, images: jax.Array) -> jax.Array:
        _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
        return state["intermediates"]["pre_logits"][0].astype(jnp.float32)

    return features


def compute_features(
    model: models.MlpMixer,
    params: Any,
    images: np.ndarray,
    batch_size: int = 256,
    fn: Callable[[Any, np.ndarray], jax.Array] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> np.ndarray | None:
    """Pre-logits of `images` (N, H, W, 3), in fixed-size padded batches (one compile).

    `fn`: a `pre_logits_fn(model, params)` to reuse across calls, so nothing is compiled twice.
    `stop`: asked before each batch; None when it said stop.
    """
    fn = functools.partial(fn or pre_logits_fn(model, params), params)
    out = []
    for start in range(0, len(images), batch_size):
        if stop():
            return None
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(jax.device_get(fn(batch)))[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, model.hidden_dim), np.float32)


def parse_datasets(datasets: str | Sequence[str]) -> list[tuple[str, str, str]]:
    """'NAME,NAME:TRAIN:TEST,...' (or a sequence of such specs) -> [(name, train split, test split)]."""
    return [_parse_dataset(d) for d in _as_tuple(datasets)]


def _parse_dataset(spec: str) -> tuple[str, str, str]:
    """'NAME' or 'NAME:TRAIN_SPLIT:TEST_SPLIT' -> (name, train split, test split)."""
    parts = spec.split(":")
    if len(parts) == 1:
        return parts[0], "train", "test"
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise ValueError(f"few-shot dataset {spec!r}: write NAME or NAME:TRAIN_SPLIT:TEST_SPLIT, e.g. cifar10:train:test")


def _as_tuple(value: str | Sequence, cast: Callable = str) -> tuple:
    if isinstance(value, str):
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    return tuple(cast(v) for v in value)


class Evaluator:
    """Few-shot linear probes on `datasets` (TFDS names, optionally NAME:TRAIN_SPLIT:TEST_SPLIT).

    The images are read and preprocessed once, on the first call (the union of all draws: at most
    max(shots) x num_seeds per class, and the test split, capped at `max_test_examples` if > 0);
    each call computes features with the given params and returns {"fewshot/NAME_Kshot": mean
    test accuracy over the seeds}. `pp` is a preprocessing string without labels; "" means
    `resize(image_size)|rgb|value_range(-1,1)`.
    """

    def __init__(
        self,
        datasets: str | Sequence[str],
        *,
        image_size: int,
        data_dir: str = "",
        pp: str = "",
        shots: str | Sequence[int] = DEFAULT_SHOTS,
        l2_reg: float = DEFAULT_L2_REG,
        num_seeds: int = 3,
        batch_size: int = 256,
        max_test_examples: int = 0,
        seed: int = 0,
    ):
        from mixer_jax.data import preprocess

        self.datasets = parse_datasets(datasets)
        self.shots = _as_tuple(shots, int)
        if not self.datasets or not self.shots or min(self.shots) < 1:
            raise ValueError(f"few-shot evaluation needs datasets and positive shots, got {datasets!r}, {shots!r}")
        self.pp = preprocess.parse(pp or f"resize({image_size})|rgb|value_range(-1,1)", allow_batch_ops=False)
        self.data_dir, self.l2_reg, self.num_seeds = data_dir, l2_reg, num_seeds
        self.batch_size, self.max_test_examples, self.seed = batch_size, max_test_examples, seed
        self._data: dict[str, dict[str, Any]] = {}
        self._features: tuple[models.MlpMixer, Any] | None = None  # (model, its jitted pre_logits_fn)

    def _image(self, example: Mapping[str, Any], index: int) -> np.ndarray:
        return np.asarray(self.pp(dict(example), np.random.default_rng(index))["image"], np.float32)

    def _load(self, name: str, train_split: str, test_split: str) -> dict[str, Any]:
        """The draws' train images (per seed and shots, as indices into one pool) and the test set."""
        from mixer_jax.data import pipeline

        builder = pipeline.get_builder(name, self.data_dir)
        num_classes = builder.info.features["label"].num_classes
        train = builder.as_data_source(split=train_split)
        per_class = max(self.shots) * self.num_seeds
        pools: dict[int, list[int]] = {c: [] for c in range(num_classes)}
        images, labels = [], []
        for index in np.random.default_rng(self.seed).permutation(len(train)):
            example = train[int(index)]
            label = int(example["label"])
            if len(pools[label]) < per_class:
                pools[label].append(len(images))
                images.append(self._image(example, int(index)))
                labels.append(label)
                if all(len(p) == per_class for p in pools.values()):
                    break
        draws = {}
        for s in range(self.num_seeds):
            rng = np.random.default_rng([self.seed, s])
            order = {c: rng.permutation(p) for c, p in pools.items()}
            for k in self.shots:
                draws[s, k] = np.concatenate([o[:k] for o in order.values()]).astype(int)
        test = builder.as_data_source(split=test_split)
        count = len(test) if self.max_test_examples <= 0 else min(len(test), self.max_test_examples)
        test_examples = [test[i] for i in range(count)]
        return dict(
            num_classes=num_classes,
            train_images=np.stack(images),
            train_labels=np.asarray(labels),
            draws=draws,
            test_images=np.stack([self._image(ex, i) for i, ex in enumerate(test_examples)]),
            test_labels=np.asarray([int(ex["label"]) for ex in test_examples]),
        )

    def __call__(
        self, params: Any, model: models.MlpMixer, stop: Callable[[], bool] = lambda: False
    ) -> dict[str, float] | None:
        """The probes' accuracies; None if `stop()`, asked before each batch of images, said stop."""
        if self._features is None or self._features[0] is not model:
            self._features = (model, pre_logits_fn(model, params))
        fn = self._features[1]
        results = {}
        for name, train_split, test_split in self.datasets:
            key = f"{name}:{train_split}:{test_split}"
            if key not in self._data:
                self._data[key] = self._load(name, train_split, test_split)
            d = self._data[key]
            train_x = compute_features(model, params, d["train_images"], self.batch_size, fn, stop)
            if train_x is None:
                return None
            test_x = compute_features(model, params, d["test_images"], self.batch_size, fn, stop)
            if test_x is None:
                return None
            for k in self.shots:
                accuracies = [
                    probe_accuracy(
                        train_x[idx], d["train_labels"][idx], test_x, d["test_labels"], d["num_classes"], self.l2_reg
                    )
                    for idx in (d["draws"][s, k] for s in range(self.num_seeds))
                ]
                results[f"fewshot/{name}_{k}shot"] = float(np.mean(accuracies))
        return results


def evaluate(params: Any, model: models.MlpMixer, datasets: str | Sequence[str], **options: Any) -> dict[str, float]:
    """One-off few-shot evaluation: `Evaluator(datasets, image_size=model.image_size, **options)(params, model)`.

    A trainer evaluating periodically should keep one `Evaluator`, which reads the images once.
    """
    return Evaluator(datasets, image_size=model.image_size, **options)(params, model)


def main(argv: Sequence[str] | None = None) -> int:
    from mixer_jax import weights

    parser = argparse.ArgumentParser(prog="python -m mixer_jax.fewshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help=".npz, .safetensors, .pth, workdir or checkpoint")
    parser.add_argument("--variant", default=None, help="e.g. B/16; checked against the weights if given")
    parser.add_argument("--image_size", type=int, default=None, help="default: the weights' own")
    parser.add_argument(
        "--gelu_exact", action="store_true", help="exact GELU (timm-trained weights; a checkpoint's saved config says)"
    )
    parser.add_argument("--dataset", default="digits", help="comma-separated NAME or NAME:TRAIN_SPLIT:TEST_SPLIT")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)))
    parser.add_argument("--l2_reg", type=float, default=DEFAULT_L2_REG)
    parser.add_argument("--num_seeds", type=int, default=3)
    parser.add_argument("--pp", default="", help="preprocessing without labels; default resize|rgb|value_range(-1,1)")
    parser.add_argument("--max_test_examples", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model, params = weights.load_model(
            args.weights, args.variant, image_size=args.image_size, gelu_exact=args.gelu_exact, need_head=False
        )
        evaluator = Evaluator(
            args.dataset,
            image_size=model.image_size,
            data_dir=args.data_dir,
            pp=args.pp,
            shots=args.shots,
            l2_reg=args.l2_reg,
            num_seeds=args.num_seeds,
            max_test_examples=args.max_test_examples,
        )
        results = evaluator(params, model)
    except (weights.WeightsError, ValueError) as e:
        print(f"mixer_jax.fewshot: error: {e}", file=sys.stderr)
        return 2
    for key, accuracy in results.items():
        print(f"{key.removeprefix('fewshot/')}: {100 * accuracy:.2f}% (mean of {args.num_seeds} draws)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
