import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from alexnet_jax import input_pipeline as ip
from alexnet_jax.preprocess import Preprocess
from alexnet_jax import pca_stats
from conftest import REPO, tiny_config

EIGVAL = np.array([0.012, 0.004, 0.001])
EIGVEC = np.linalg.qr(np.array([[1.0, 0.9, 0.8], [0.5, -0.2, -0.6], [0.1, -0.7, 0.6]]))[0]
MEAN = np.array([0.5, 0.45, 0.4])


def write_colour_folder(root, num_images: int, side: int) -> None:
  """Images whose pixels are i.i.d. N(MEAN, EIGVEC diag(EIGVAL) EIGVEC^T), side×side (no resize
  blur), ~5 sigma inside [0, 1]."""
  rng = np.random.default_rng(0)
  for split, n in (('train', num_images), ('val', 2)):
    for i in range(n):
      label = ('a', 'b')[i % 2]  # two classes: a folder set needs at least two
      os.makedirs(root / split / label, exist_ok=True)
      z = rng.standard_normal((side, side, 3)) * np.sqrt(EIGVAL)
      pixels = np.clip(np.round((MEAN + z @ EIGVEC.T) * 255), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / split / label / f'{i}.png')


def test_pca_stats_recover_a_known_colour_covariance(tmp_path):
  config = tiny_config(None)  # 63 crops of the 72 image
  config.dataset.name, config.dataset.path = 'folder', str(tmp_path)
  write_colour_folder(tmp_path, 24, 72)
  stats = pca_stats.split_statistics(config)
  assert stats['num_images'] == 24 and stats['num_pixels'] == 24 * 72 * 72
  np.testing.assert_allclose(stats['eigval'], EIGVAL, rtol=0.02)
  cosines = np.abs(np.sum(np.array(stats['eigvec']) * EIGVEC, axis=0))
  assert cosines.min() >= 0.999, cosines
  np.testing.assert_allclose(stats['mean'], MEAN, atol=2e-3)
  np.testing.assert_allclose(stats['std'], np.sqrt(np.diag(EIGVEC @ np.diag(EIGVAL) @ EIGVEC.T)),
                             rtol=0.01)


def test_rgb_statistics_match_numpy():
  rng = np.random.default_rng(1)
  batches = [rng.random((4, 5, 6, 3)), rng.random((2, 5, 6, 3))]
  stats = pca_stats.rgb_statistics(batches)
  pixels = np.concatenate([b.reshape(-1, 3) for b in batches])
  cov = np.cov(pixels.T, bias=True)
  np.testing.assert_allclose(np.array(stats['eigvec']) @ np.diag(stats['eigval']) @
                             np.array(stats['eigvec']).T, cov, atol=1e-12)
  assert stats['eigval'] == sorted(stats['eigval'], reverse=True) and stats['num_images'] == 6


def test_cli_output_is_the_lighting_training_uses(tmp_path):
  write_colour_folder(tmp_path, 3, 40)
  out = tmp_path / 'stats.json'
  run = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.pca_stats', '--config=configs/default.py',
       f'--output={out}', '--config.dataset.name=folder', f'--config.dataset.path={tmp_path}',
       '--config.dataset.image_size=32'], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '3 images: eigval' in run.stdout
  stats = json.loads(out.read_text())
  config = tiny_config(None)
  config.dataset.pca_stats = str(out)
  p = Preprocess.from_config(config.dataset)
  np.testing.assert_allclose(p.eigval, stats['eigval'])
  np.testing.assert_allclose(p.eigvec, stats['eigvec'])
  # The training lighting shift is eigvec @ (alpha * eigval) with these statistics: the same
  # alpha as under the default ones.
  from alexnet_jax.quiet_tf import tf
  first = tf.constant(3, tf.int64)
  shifts = ip.augmentation_draws(first, 8, 0, p)['shift'].numpy()
  assert np.abs(shifts).min() > 0
  default = ip.augmentation_draws(first, 8, 0, Preprocess.from_config(tiny_config(None).dataset))
  alpha = np.linalg.solve(np.array(stats['eigvec']) * stats['eigval'], shifts.T)
  default_basis = np.array(config.dataset.eigvec) * config.dataset.eigval
  np.testing.assert_allclose(alpha, np.linalg.solve(default_basis, default['shift'].numpy().T),
                             rtol=1e-3, atol=1e-6)
