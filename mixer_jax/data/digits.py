"""The built-in `digits` dataset: scikit-learn's bundled 8x8 handwritten digits, in TFDS format.

scikit-learn ships the 1,797 images inside its wheel, so preparing needs no network. Pixel values
0..16 are scaled to uint8 as round(v * 255 / 16). The split is a fixed permutation of the 1,797
examples by `numpy.random.default_rng(0)`: the first 1,437 are `train`, the last 360 `test`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1437
NUM_TEST = 360
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
    """Indices into `sklearn.datasets.load_digits()` for each split; fixed and documented above."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_TRAIN + NUM_TEST)
    return dict(zip(Digits.SPLITS, (perm[:NUM_TRAIN], perm[NUM_TRAIN:]), strict=True))


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (UCI optdigits test set), 8x8 grayscale, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    SPLITS = ("train", "test")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        data = load_digits()
        images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for i in indices:
            yield int(i), {"image": images[i], "label": int(data.target[i])}
