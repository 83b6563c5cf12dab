"""scikit-learn's bundled handwritten digits as a TFDS data set: the offline default.

1,797 8x8 grayscale images of the digits 0-9 (UCI optdigits test set), shipped inside scikit-learn,
so preparing it needs no network. Split: every 5th image (index % 5 == 0) is `validation` (360),
the rest `train` (1,437) — fixed and deterministic. Pixels 0..16 are scaled to 0..255.
"""

from __future__ import annotations

import numpy as np

from alexnet_jax.datasets.local import LocalBuilder
from alexnet_jax.quiet_tf import tfds


class Digits(LocalBuilder):
  """scikit-learn `load_digits`, served through TFDS."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    is_val = np.arange(len(images)) % 5 == 0
    return {
        'train': self._generate_examples(images[~is_val], digits.target[~is_val],
                                         np.flatnonzero(~is_val)),
        'validation': self._generate_examples(images[is_val], digits.target[is_val],
                                              np.flatnonzero(is_val)),
    }

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      yield int(index), {'image': image, 'label': int(label)}
