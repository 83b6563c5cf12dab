import io
import itertools
import math

import numpy as np
import pytest

from alexnet_jax import input_pipeline as ip
from alexnet_jax.color_stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from alexnet_jax.preprocess import Preprocess, normalize
from alexnet_jax.quiet_tf import tf


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
  pre = Preprocess.from_config(config.dataset)
  batch = next(ip.train_batches(split, pre, 16, seed=0))
  assert batch['image'].shape == (16, 63, 63, 3) and batch['image'].dtype == np.uint8
  assert batch['shift'].shape == (16, 3) and batch['shift'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].min() >= 0 and batch['label'].max() <= 9
  assert batch['index'].dtype == np.int32 and len(set(batch['index'].tolist())) == 16
  # Black background and white strokes; lighting shifts of about 0.1 * sqrt(eigval).
  assert batch['image'].min() == 0 and batch['image'].max() > 200
  assert 0.001 < np.abs(batch['shift']).max() < 0.2


def test_resume_skips_exactly_to_the_step(config, split):
  pre = Preprocess.from_config(config.dataset)
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
  pre = Preprocess.from_config(config.dataset)
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
  return Preprocess(**{**base, **kw})


def photo_like(h, w, channels=3):
  """Smooth colour blobs with fine texture: compresses like a photo, unlike noise."""
  rng = np.random.default_rng(0)
  coarse = rng.uniform(0, 255, (4, 5, channels)).astype(np.float32)
  smooth = tf.image.resize(coarse, [h, w], method='bicubic').numpy()
  return np.clip(smooth + rng.normal(0, 8, (h, w, channels)), 0, 255).astype(np.uint8)


def resized_then_cropped(image, size):
  """The definition: shorter side → size (antialiased bilinear, rounded), then the central square."""
  h, w = image.shape[:2]
  new_h, new_w = (max(size, math.ceil(n * size / min(h, w) - 1e-3)) for n in (h, w))
  full = np.round(tf.image.resize(image, [new_h, new_w], antialias=True).numpy())
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return full[top:top + size, left:left + size].astype(np.int32)


@pytest.mark.parametrize('shape,fmt,max_diff,mean_diff', [
    ((75, 100), 'jpeg', 1, 0.01),  # > 2R: only the central window decoded and resampled
    ((20, 30), 'jpeg', 1, 0.01),  # < R: upscaled
    ((45, 60), 'gray-png', 1, 0.01),  # other formats decode whole; gray becomes RGB
    ((140, 190), 'jpeg', 6, 1.0),  # >= 4R: decoded at half scale by the IDCT, then resized
])
def test_decode_resize_center_crop_is_the_resized_center(shape, fmt, max_diff, mean_diff):
  """Rounding can land 1 apart (sums in another order); the reduced-scale IDCT filters a bit
  differently from the full-resolution triangle kernel."""
  size = 32
  image = photo_like(*shape, channels=1 if fmt == 'gray-png' else 3)
  encoded = tf.io.encode_png(image) if fmt == 'gray-png' else tf.io.encode_jpeg(image, quality=90)
  out = ip.decode_resize_center_crop(encoded, size)
  assert out.shape == (size, size, 3) and out.dtype == tf.uint8
  diff = np.abs(out.numpy() - resized_then_cropped(ip.decode(encoded).numpy(), size))
  assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


@pytest.mark.parametrize('shape,fmt', [((32, 64), 'jpeg'), ((50, 32), 'png')])
def test_shorter_side_at_the_size_is_only_cropped(shape, fmt):
  """(32, 64): the JPEG window starts on a block boundary, where a windowed decode differs."""
  image = photo_like(*shape)
  encoded = tf.io.encode_png(image) if fmt == 'png' else tf.io.encode_jpeg(image, quality=90)
  top, left = (shape[0] - 32) // 2, (shape[1] - 32) // 2
  np.testing.assert_array_equal(ip.decode_resize_center_crop(encoded, 32),
                                ip.decode(encoded)[top:top + 32, left:left + 32])


@pytest.mark.parametrize('shape', [(75, 100), (32, 48)])
def test_a_crop_window_resamples_like_the_whole_square(shape):
  """Training from full-size images resamples only the crop window: the same pixels as cropping
  the whole square, up to a rare one-level rounding (sample positions from another origin);
  exact when the shorter side is already the size (no resampling)."""
  image = photo_like(*shape)
  encoded = tf.io.encode_jpeg(image, quality=90)
  square = ip.decode_resize_center_crop(encoded, 32).numpy().astype(np.int32)
  diffs = []
  for top, left in [(0, 0), (4, 1), (1, 4), (4, 4), (2, 3)]:
    window = ip.decode_resize_center_crop(encoded, 32, top, left, 28)
    assert window.shape == (28, 28, 3) and window.dtype == tf.uint8
    diffs.append(np.abs(window.numpy() - square[top:top + 28, left:left + 28]))
  diffs = np.stack(diffs)
  assert diffs.max() <= (0 if min(shape) == 32 else 1) and diffs.mean() < 1e-3, diffs.mean()


def draws(first, count=1, p=None, seed=0):
  return ip.augmentation_draws(tf.constant(first, tf.int64), count, seed, p or preprocess())


def row(d, k=0):
  return {key: value[k] for key, value in d.items()}


def test_draws_depend_only_on_seed_and_index():
  """However examples are grouped into batches (resume, device count), each gets the same draw."""
  p = preprocess(lighting_std=0.1)
  block = draws(1000, 64, p)
  np.testing.assert_array_equal(block['index'], np.arange(1000, 1064))
  for k in (0, 1, 37, 63):
    alone = draws(1000 + k, 1, p)
    for key in block:
      np.testing.assert_array_equal(block[key][k], alone[key][0])
  other_seed = draws(1000, 64, p, seed=1)
  assert not np.array_equal(block['top'], other_seed['top'])
  assert not np.array_equal(block['shift'], other_seed['shift'])
  # Offsets cover the R - S + 1 = 5 positions; about half the images are flipped.
  many = draws(0, 4000, p)
  assert set(many['top'].numpy()) == set(range(5)) == set(many['left'].numpy())
  assert 1800 < int(tf.reduce_sum(tf.cast(many['flip'], tf.int32))) < 2200


def test_random_crop_is_a_window_and_flip_a_mirror():
  encoded, _ = encoded_test_image()
  p = preprocess()
  big = ip.decode_resize_center_crop(encoded, p.resize_size).numpy()
  flips = 0
  for i in range(20):
    d = row(draws(i))
    top, left = int(d['top']), int(d['left'])
    plain = ip.train_image(encoded, d, p).numpy()
    np.testing.assert_array_equal(plain, big[top:top + 28, left:left + 28])
    flipped = ip.train_image(encoded, d, preprocess(flip=True)).numpy()
    np.testing.assert_array_equal(flipped, plain[:, ::-1] if d['flip'] else plain)
    flips += int(d['flip'])
  assert 3 <= flips <= 17


def test_lighting_is_a_shift_along_the_scaled_eigenvectors():
  """shift = V (alpha * lambda): no shift with lighting off, and alpha scales with lighting_std."""
  encoded, _ = encoded_test_image()
  d = row(draws(7, p=preprocess()))
  np.testing.assert_array_equal(d['shift'], np.zeros(3))
  lit, brighter = row(draws(7, p=preprocess(lighting_std=0.1))), row(draws(7, p=preprocess(lighting_std=0.2)))
  np.testing.assert_array_equal(ip.train_image(encoded, d, preprocess()),
                                ip.train_image(encoded, lit, preprocess(lighting_std=0.1)))
  basis = np.array(IMAGENET_EIGVEC) * np.array(IMAGENET_EIGVAL)
  alpha = np.linalg.solve(basis, lit['shift'].numpy())
  np.testing.assert_allclose(np.linalg.solve(basis, brighter['shift'].numpy()), 2 * alpha,
                             rtol=1e-4)
  assert 1e-3 < np.abs(alpha).max() < 0.5


def test_unknown_split_is_a_clear_error(config):
  builder = ip.get_builder(config.dataset)
  with pytest.raises(ValueError, match='eval_split'):
    ip.load_split(builder, 'test', cache=False)


@pytest.mark.parametrize('train_crop', ['paper', 'inception'])
@pytest.mark.parametrize('shape,fmt', [((5, 400), 'png'), ((300, 7), 'jpeg'), ((12, 12), 'jpeg')])
def test_tiny_and_extreme_images_give_full_crops(train_crop, shape, fmt):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, size=shape + (1,), dtype=np.uint8)  # single channel
  encoded = tf.io.encode_png(gray) if fmt == 'png' else tf.io.encode_jpeg(gray)
  p = preprocess(train_crop=train_crop, flip=True, lighting_std=0.1)
  for i in range(3):
    image = ip.train_image(encoded, row(draws(i, p=p)), p)
    assert image.shape == (28, 28, 3) and image.dtype == tf.uint8
  assert ip.eval_image(encoded, p, crops=10).shape == (10, 28, 28, 3)


def test_inception_crop_is_a_resized_window_of_the_image():
  encoded, _ = encoded_test_image(60, 80)
  decoded = ip.decode(encoded).numpy().astype(np.float32)
  p = preprocess(train_crop='inception', image_size=16)
  sizes = set()
  for i in range(10):
    d = row(draws(i, p=p))
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        [60, 80, 3], tf.zeros([1, 0, 4]), seed=d['window_seed'], min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    (t, l, _), (h, w, _) = begin.numpy(), extent.numpy()
    assert 0.08 * 4800 <= h * w <= 4800
    sizes.add((h, w))
    expected = tf.image.resize(decoded[t:t + h, l:l + w], [16, 16], antialias=True).numpy()
    np.testing.assert_allclose(ip.train_image(encoded, d, p), expected, atol=0.5 + 1e-3)
  assert len(sizes) > 5  # the window really is random


def test_ten_crops_are_the_corners_center_and_mirrors_of_a_flipped_run():
  encoded, _ = encoded_test_image(40, 60)
  p = preprocess(image_size=28, flip=True)  # R = 32
  big = ip.decode_resize_center_crop(encoded, 32).numpy()
  five = [big[:28, :28], big[:28, 4:], big[4:, :28], big[4:, 4:], big[2:30, 2:30]]
  expected = np.stack(five + [c[:, ::-1] for c in five])
  np.testing.assert_array_equal(ip.eval_image(encoded, p, crops=10), expected)
  np.testing.assert_array_equal(ip.eval_image(encoded, p), expected[4])
  assert ip.eval_crop_names(10, p) == ip.FIVE_CROPS + tuple(f'{n} mirrored' for n in ip.FIVE_CROPS)

  # A run trained without flips is scored on the five unmirrored crops only.
  no_flip = preprocess(image_size=28, flip=False)
  np.testing.assert_array_equal(ip.eval_image(encoded, no_flip, crops=10), expected[:5])
  assert ip.eval_crop_names(10, no_flip) == ip.FIVE_CROPS
  assert ip.eval_crop_names(1, no_flip) == ('center',)
  with pytest.raises(ValueError, match=r'crops=5 is not supported; use one of \(1, 10\)'):
    ip.eval_crop_names(5, no_flip)


def sample_photo_jpegs():
  """ImageNet-shaped JPEGs (500x375 and 375x500, as experiments/make_photo_folder.py cuts them)
  of the two photos scikit-learn ships."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  views = [((500, 375), (0, 0, 560, 420)), ((500, 375), (80, 7, 640, 427)),
           ((375, 500), (300, 20, 600, 420))]  # (width, height), a box of the 640x427 photo
  for pixels in load_sample_images().images:
    photo = Image.fromarray(pixels)
    for size, box in views:
      buffer = io.BytesIO()
      photo.resize(size, Image.BICUBIC, box=box).save(buffer, 'JPEG', quality=90)
      yield buffer.getvalue()


def torchvision_reference(jpeg, resize=256, crop=224):
  """torchvision's documented eval transform with PIL: Resize(256) (shorter side 256, longer side
  int(256 * long / short), PIL bilinear, which antialiases when reducing), CenterCrop(224) at
  int(round((new - 224) / 2.0))."""
  from PIL import Image
  image = Image.open(io.BytesIO(jpeg)).convert('RGB')
  w, h = image.size
  w, h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
  resized = np.asarray(image.resize((w, h), Image.BILINEAR), np.int32)
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  return resized[top:top + crop, left:left + crop]


def test_torchvision_eval_resize_is_torchvisions_crop_of_a_photo():
  """Within a grey level of PIL's on average (its resize is fixed-point); the paper's resize
  (longer side rounded up, offsets floored) lands several levels away."""
  torchvision, paper = (preprocess(image_size=224, eval_resize=r) for r in ('torchvision', 'paper'))
  for jpeg in sample_photo_jpegs():
    reference = torchvision_reference(jpeg)
    ours = ip.eval_image(jpeg, torchvision).numpy()
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    diff = np.abs(ours - reference)
    assert diff.mean() <= 0.5 and diff.max() <= 2, (diff.mean(), diff.max())
    assert np.abs(ip.eval_image(jpeg, paper).numpy() - reference).mean() > 1.5


def test_torchvision_center_crop_rounds_half_to_even():
  """A 256x343 image is not resized; (343 - 224) / 2 = 59.5 rounds to 60 (Python's round), where
  the paper's central square puts the crop at 59."""
  image = photo_like(256, 343)
  encoded = tf.io.encode_png(image)
  torchvision = preprocess(image_size=224, eval_resize='torchvision')
  np.testing.assert_array_equal(ip.eval_image(encoded, torchvision), image[16:240, 60:284])
  np.testing.assert_array_equal(ip.eval_image(encoded, preprocess(image_size=224)),
                                image[16:240, 59:283])
  with pytest.raises(ValueError, match="eval_resize='torchvision' defines only its center crop"):
    ip.eval_image(encoded, torchvision, crops=10)


def test_torchvision_eval_resize_needs_full_size_images(config):
  config.dataset.eval_resize, config.dataset.prepared = 'torchvision', True
  assert Preprocess.from_config(config.dataset).eval_resize == 'torchvision'
  with pytest.raises(ValueError, match=r"a prepared set holds only the paper's central square; "
                                       r"set --config.dataset.prepared=False\.$"):
    ip.get_builder(config.dataset)
  config.dataset.eval_resize = 'pil'
  with pytest.raises(ValueError, match=r"dataset.eval_resize='pil' is unknown; use one of "):
    Preprocess.from_config(config.dataset)


def test_lighting_noise_has_the_pca_covariance():
  """shift = V (alpha * lambda), alpha ~ N(0, sigma^2 I): whitened by (V diag(lambda))^-1 it is
  N(0, sigma^2 I), i.e. Cov(shift) = sigma^2 V diag(lambda^2) V^T."""
  sigma = 0.1
  p = preprocess(lighting_std=sigma)
  shifts = draws(0, 20_000, p)['shift'].numpy().astype(np.float64)
  basis = np.array(IMAGENET_EIGVEC) * np.array(IMAGENET_EIGVAL)
  alpha = np.linalg.solve(basis, shifts.T).T
  np.testing.assert_allclose(np.cov(alpha.T) / sigma**2, np.eye(3), atol=0.04)
  np.testing.assert_allclose(alpha.mean(axis=0) / sigma, 0.0, atol=0.03)


def test_pca_stats_file_replaces_the_statistics(tmp_path, config):
  import json
  stats = {'eigval': [0.3, 0.2, 0.1], 'eigvec': np.eye(3)[::-1].tolist(), 'mean': [0.1, 0.2, 0.3],
           'std': [0.4, 0.5, 0.6]}
  (tmp_path / 'stats.json').write_text(json.dumps(stats))
  config.dataset.pca_stats = str(tmp_path / 'stats.json')
  p = Preprocess.from_config(config.dataset)
  assert (p.eigval, p.eigvec, p.mean, p.std) == (
      (0.3, 0.2, 0.1), tuple(map(tuple, stats['eigvec'])), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
  config.dataset.pca_stats = str(tmp_path / 'missing.json')
  with pytest.raises(ValueError, match='does not exist'):
    Preprocess.from_config(config.dataset)
  config.dataset.pca_stats = None
  config.dataset.train_crop = 'random'
  with pytest.raises(ValueError, match='train_crop'):
    Preprocess.from_config(config.dataset)


def test_device_normalisation_is_the_host_formula():
  """((pixels / 255 + shift) - mean) / std, as the host computed it before batches became uint8."""
  from alexnet_jax.color_stats import IMAGENET_MEAN, IMAGENET_STD
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
  shift = rng.normal(0, 0.05, (4, 3)).astype(np.float32)
  mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
  expected = ((pixels / 255.0 + shift[:, None, None, :]) - mean) / std
  np.testing.assert_allclose(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD, shift), expected,
                             atol=1e-6)
  crops = rng.integers(0, 256, (2, 10, 5, 5, 3), dtype=np.uint8)  # ten crops, no lighting
  np.testing.assert_allclose(normalize(crops, IMAGENET_MEAN, IMAGENET_STD),
                             (crops / 255.0 - mean) / std, atol=1e-6)
