import itertools

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import input_pipeline as ip
from alexnet_jax.color_stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC


@pytest.fixture
def split(config):
  builder = ip.get_builder(config.dataset)
  return ip.load_split(builder, 'train', cache=True)


def test_digits_split_is_fixed(config):
  builder = ip.get_builder(config.dataset)
  assert builder.info.splits['train'].num_examples == 1437
  assert builder.info.splits['validation'].num_examples == 360
  assert builder.info.features['label'].num_classes == 10


def test_train_batches_shapes_dtypes_ranges(config, split):
  pre = ip.Preprocess.from_config(config.dataset)
  batch = next(ip.train_batches(split, pre, 16, seed=0))
  assert batch['image'].shape == (16, 63, 63, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].min() >= 0 and batch['label'].max() <= 9
  assert batch['index'].dtype == np.int32 and len(set(batch['index'].tolist())) == 16
  # Normalised: background pixels ((0 - mean) / std plus lighting) are negative, strokes positive.
  assert -2.5 < batch['image'].min() < -1.5 and 1.5 < batch['image'].max() < 3.0


def test_resume_skips_exactly_to_the_step(config, split):
  pre = ip.Preprocess.from_config(config.dataset)
  steps_per_epoch = 1437 // 16
  start = steps_per_epoch - 1  # also crosses an epoch boundary
  full = list(itertools.islice(ip.train_batches(split, pre, 16, seed=3), start + 2))
  resumed = list(itertools.islice(ip.train_batches(split, pre, 16, seed=3, start_step=start), 2))
  for a, b in zip(full[start:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # A new epoch is a new order.
  assert not np.array_equal(full[0]['label'], full[steps_per_epoch]['label'])


def test_eval_batches_pad_and_mask(config):
  builder = ip.get_builder(config.dataset)
  val = ip.load_split(builder, 'validation', cache=False)
  pre = ip.Preprocess.from_config(config.dataset)
  batches = list(ip.eval_batches(val, pre, 100))
  assert [b['image'].shape[0] for b in batches] == [100] * 4
  assert [int(b['mask'].sum()) for b in batches] == [100, 100, 100, 60]
  again = list(ip.eval_batches(val, pre, 100))
  np.testing.assert_array_equal(batches[0]['image'], again[0]['image'])


def encoded_test_image(h=40, w=60):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  return tf.io.encode_png(image), image


def preprocess(**kw):
  base = dict(image_size=28, flip=False, lighting_std=0.0, eigval=IMAGENET_EIGVAL,
              eigvec=IMAGENET_EIGVEC, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  return ip.Preprocess(**{**base, **kw})


def test_resize_shorter_side_and_center_crop():
  encoded, _ = encoded_test_image(40, 60)
  out = ip.resize_and_center_crop(ip.decode(encoded), 32)
  assert out.shape == (32, 32, 3)
  full = tf.image.resize(ip.decode(encoded), [32, 48], antialias=True)
  np.testing.assert_allclose(out, full[:, 8:40], atol=1e-4)


def test_random_crop_is_a_window_and_flip_a_mirror():
  encoded, _ = encoded_test_image()
  p = preprocess()
  big = ip.resize_and_center_crop(ip.decode(encoded), p.resize_size).numpy() / 255.0
  windows = {(i, j): big[i:i + 28, j:j + 28] for i in range(5) for j in range(5)}
  flips = 0
  for s in range(20):
    seed = tf.constant([s, 1], tf.int64)
    plain = ip.train_image(encoded, seed, p).numpy()
    assert any(np.allclose(plain, w, atol=1e-6) for w in windows.values())
    flipped = ip.train_image(encoded, seed, preprocess(flip=True)).numpy()
    if not np.allclose(flipped, plain):
      np.testing.assert_allclose(flipped, plain[:, ::-1], atol=1e-6)
      flips += 1
  assert 3 <= flips <= 17


def test_lighting_is_eigvec_times_scaled_alpha():
  encoded, _ = encoded_test_image()
  seed = tf.constant([7, 7], tf.int64)
  plain = ip.train_image(encoded, seed, preprocess()).numpy()
  lit = ip.train_image(encoded, seed, preprocess(lighting_std=0.1)).numpy()
  shift = (lit - plain).reshape(-1, 3)
  np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-5)
  alpha_seed = tf.random.experimental.stateless_split(seed, 3)[2]
  alpha = tf.random.stateless_normal([3], seed=alpha_seed, stddev=0.1).numpy()
  expected = np.array(IMAGENET_EIGVEC) @ (alpha * np.array(IMAGENET_EIGVAL))
  np.testing.assert_allclose(shift[0], expected, rtol=1e-4, atol=1e-7)


def test_unknown_split_is_a_clear_error(config):
  builder = ip.get_builder(config.dataset)
  with pytest.raises(ValueError, match='eval_split'):
    ip.load_split(builder, 'test', cache=False)
