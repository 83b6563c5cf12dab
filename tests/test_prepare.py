"""Prepared sets: the paper's stored R×R squares, made once, killed and restarted, read fast."""

import os
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import input_pipeline as ip
from alexnet_jax.preprocess import Preprocess
from alexnet_jax.datasets import prepared
from alexnet_jax.quiet_tf import tf, tfds
from conftest import REPO, tiny_config


def records(builder, split):
  """[(label, stored image)] in the set's order."""
  data = ip.load_split(builder, split, cache=False)
  return [(int(ex['label']), ex['image'].tobytes() if data.stored == 'raw' else ex['image'])
          for ex in tfds.as_numpy(data.records)]


@pytest.mark.parametrize('stored', ['jpeg', 'raw'])
def test_prepared_set_has_the_sources_labels_classes_splits_and_r_squares(digits_dir, stored):
  config = tiny_config(digits_dir)  # image_size 63: R = 72
  source = ip.get_builder(config.dataset)
  config.dataset.prepared, config.dataset.prepared_format = True, stored
  builder = ip.get_builder(config.dataset)
  assert isinstance(builder, prepared.Prepared) and builder.stored == stored
  assert builder.info.features['label'].names == source.info.features['label'].names
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      k: v.num_examples for k, v in source.info.splits.items()}
  for split in ('train', 'validation'):
    source_labels = [int(ex['label']) for ex in tfds.as_numpy(
        ip.load_split(source, split, cache=False).records)]
    got = records(builder, split)
    assert [label for label, _ in got] == source_labels  # the source's order
  pre = Preprocess.from_config(config.dataset)
  assert pre.resize_size == 72
  for _, image in got[:20]:
    square = ip.square_image(tf.constant(image) if stored == 'jpeg' else
                             tf.reshape(tf.io.decode_raw(image, tf.uint8), [72, 72, 3]), 72, stored)
    assert square.shape == (72, 72, 3) and square.dtype == tf.uint8


def test_raw_squares_give_the_batches_of_the_full_size_path(digits_dir):
  """Same examples, crops, flips, lighting and order; pixels may differ by one level where the
  full-size path's crop window rounds differently (none do on digits), and 10-crop eval reads
  the same squares."""
  config = tiny_config(digits_dir)
  pre = Preprocess.from_config(config.dataset)
  full = ip.load_split(ip.get_builder(config.dataset), 'train', cache=False)
  config.dataset.prepared, config.dataset.prepared_format = True, 'raw'
  raw = ip.load_split(ip.get_builder(config.dataset), 'train', cache=False)
  for a, b in zip(ip.train_batches(full, pre, 16, seed=1, start_step=88),
                  ip.train_batches(raw, pre, 16, seed=1, start_step=88)):  # crosses an epoch
    assert a.keys() == b.keys()
    for key in a.keys() - {'image'}:
      np.testing.assert_array_equal(a[key], b[key])
    assert np.abs(a['image'].astype(np.int32) - b['image']).max() <= 1
    if a['index'][0] > 1437:
      break
  for a, b in zip(ip.eval_batches(full, pre, 64, crops=10), ip.eval_batches(raw, pre, 64, crops=10)):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_a_jpeg_crop_window_decodes_like_the_whole_square(digits_dir):
  """Prepared JPEGs decode only the crop window; the pixels are the full decode's."""
  config = tiny_config(digits_dir)
  config.dataset.prepared = True
  config.dataset.flip = True
  data = ip.load_split(ip.get_builder(config.dataset), 'train', cache=False)
  pre = Preprocess.from_config(config.dataset)
  for i, ex in enumerate(data.records.take(8)):
    d = {k: v[0] for k, v in ip.augmentation_draws(tf.constant(i, tf.int64), 1, 4, pre).items()}
    image = ip.train_image(ex['image'], d, pre, 'jpeg')
    top, left = int(d['top']), int(d['left'])
    expected = ip.square_image(ex['image'], 72, 'jpeg')[top:top + 63, left:left + 63]
    np.testing.assert_array_equal(image, expected[:, ::-1] if d['flip'] else expected)


def test_inception_crop_on_a_prepared_set_is_one_line(digits_dir):
  config = tiny_config(digits_dir)
  config.dataset.prepared, config.dataset.train_crop = True, 'inception'
  with pytest.raises(ValueError, match="train_crop='inception' needs the full image"):
    ip.get_builder(config.dataset)
  config.dataset.train_crop, config.dataset.prepared_format = 'paper', 'png'
  with pytest.raises(ValueError, match="prepared_format='png' is unknown"):
    ip.get_builder(config.dataset)


def test_a_killed_preparation_restarts_where_it_stopped(tmp_path, digits_dir):
  data_dir = tmp_path / 'tfds'
  command = [sys.executable, '-m', 'alexnet_jax.prepare', '--config=configs/default.py',
             f'--config.dataset.data_dir={data_dir}', '--config.dataset.image_size=63',
             '--chunk_size=300']
  killed = subprocess.run(command + ['--debug_kill_after_chunks=3'], cwd=REPO,
                          capture_output=True, text=True)
  assert killed.returncode == -9, killed.stderr[-3000:]
  config = tiny_config(str(data_dir))
  config.dataset.prepared = True
  source = ip.get_builder(tiny_config(str(data_dir)).dataset)
  squares = prepared.Prepared(source=source, size=72, stored='jpeg', quality=95)
  assert not squares.is_prepared()  # nothing that looks finished
  train_chunks = sorted(os.listdir(os.path.join(squares.work_dir, 'train')))
  assert train_chunks == ['0000000000.npz', '0000000300.npz', '0000000600.npz']

  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resuming: 900 of 1797 images already prepared' in again.stdout + again.stderr
  assert f'Ready: {squares.builder_config.name}' in again.stdout
  assert not os.path.exists(squares.work_dir)
  finished = ip.get_builder(config.dataset)
  assert finished.is_prepared() and finished.data_dir == squares.data_dir
  # The same set as one uninterrupted preparation (the session's, in digits_dir).
  config_ref = tiny_config(digits_dir)
  config_ref.dataset.prepared = True
  reference = ip.get_builder(config_ref.dataset)
  for split in ('train', 'validation'):
    assert records(finished, split) == records(reference, split)
