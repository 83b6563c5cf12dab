"""RGB statistics of a training split for the paper's PCA lighting (§4.1) and normalisation.

    python -m alexnet_jax.pca_stats --config=configs/default.py --output=stats.json \
        --config.dataset.name=folder --config.dataset.path=DIR
    python -m alexnet_jax.main ... --config.dataset.pca_stats=stats.json

Streams `dataset.train_split` through the eval resize (shorter side to R, center R×R crop, pixels
in [0, 1]), accumulates the per-channel sums and the 3×3 sum of products in float64, and writes
{eigval, eigvec, mean, std, num_images, num_pixels}: the eigenvalues of the RGB covariance in
descending order, `eigvec` with rows R, G, B and one eigenvector per column (the layout of
`dataset.eigvec`). A config that points `dataset.pca_stats` at the file uses all four statistics.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from alexnet_jax import cli
from alexnet_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing the functions defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('output', None, 'JSON file to write.')
  flags.DEFINE_integer('num_images', -1, 'Use the first N images (-1: all).')
  flags.mark_flags_as_required(['config', 'output'])


def rgb_statistics(batches: Iterable[np.ndarray]) -> dict[str, Any]:
  """Mean, std and covariance eigen-decomposition of the pixels of [..., 3] arrays."""
  count, total, products, images = 0, np.zeros(3), np.zeros((3, 3)), 0
  for batch in batches:
    pixels = np.asarray(batch, np.float64).reshape(-1, 3)
    count += len(pixels)
    total += pixels.sum(axis=0)
    products += pixels.T @ pixels
    images += batch.shape[0] if batch.ndim == 4 else 1
  if count == 0:
    raise ConfigError('no images to compute statistics from; check dataset.train_split.')
  mean = total / count
  cov = products / count - np.outer(mean, mean)
  eigval, eigvec = np.linalg.eigh(cov)  # ascending
  order = np.argsort(eigval)[::-1]
  eigvec = eigvec[:, order] * np.sign(eigvec[:, order].sum(axis=0))  # a fixed sign per vector
  return {'eigval': eigval[order].tolist(), 'eigvec': eigvec.tolist(), 'mean': mean.tolist(),
          'std': np.sqrt(np.diag(cov)).tolist(), 'num_images': images, 'num_pixels': count}


def split_statistics(config: ml_collections.ConfigDict, num_images: int = -1) -> dict[str, Any]:
  """`rgb_statistics` of the first `num_images` (-1: all) of `dataset.train_split`, resized."""
  from alexnet_jax.quiet_tf import tf, tfds
  from alexnet_jax import input_pipeline as ip
  from alexnet_jax.preprocess import Preprocess

  split = ip.load_split(ip.get_builder(config.dataset), config.dataset.train_split, cache=False)
  # Only the preprocessing (the seam's Preprocess): the statistics do not depend on the model.
  size = Preprocess.from_config(config.dataset).resize_size
  ds = split.records.take(num_images).map(
      lambda ex: tf.cast(ip.square_image(ex['image'], size, split.stored), tf.float32) / 255,
      num_parallel_calls=tf.data.AUTOTUNE)
  return rgb_statistics(tfds.as_numpy(ds.batch(64).prefetch(2)))


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  cli.check_output(FLAGS.output, '--output')
  stats = split_statistics(FLAGS.config, FLAGS.num_images)
  with open(FLAGS.output, 'w') as f:
    json.dump(stats, f, indent=1)
  print(f'{stats["num_images"]} images: eigval {np.round(stats["eigval"], 5).tolist()} '
        f'mean {np.round(stats["mean"], 4).tolist()} std {np.round(stats["std"], 4).tolist()} '
        f'-> {FLAGS.output}', flush=True)


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.pca_stats --config=FILE --output=FILE.json '
          '[--num_images=N]')
