"""TFDS → tf.data input pipeline with the paper's augmentation (§4.1), on the host CPU.

train: decode → resize shorter side to R → center R×R crop → random S×S crop → random horizontal
       flip → PCA lighting noise → per-channel normalisation
eval:  decode → resize shorter side to R → center S×S crop → normalisation
with S = `dataset.image_size` and R = round(S·256/224) (the paper's 256/224 margin).

Randomness is stateless and keyed by (seed, epoch, position in the epoch), so the stream is a pure
function of the seed: a run resumed at step t sees exactly the batches it would have seen, and the
augmentation of an example does not depend on the device count. Every train batch carries `index`,
a run-wide example id that keys the model's dropout masks.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.errors import ConfigError

# TensorFlow only feeds the host; keep it off every accelerator so JAX owns them.
tf.config.set_visible_devices([], 'GPU')



@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Everything the per-example maps need, read once from `config.dataset`."""

  image_size: int
  flip: bool
  lighting_std: float  # 0 turns PCA lighting off
  eigval: tuple[float, ...]
  eigvec: tuple[tuple[float, ...], ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def resize_size(self) -> int:
    return round(self.image_size * 256 / 224)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Preprocess':
    return cls(image_size=config.image_size, flip=config.flip,
               lighting_std=config.lighting_std if config.lighting else 0.0,
               eigval=tuple(config.eigval), eigvec=tuple(map(tuple, config.eigvec)),
               mean=tuple(config.mean), std=tuple(config.std))


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG bytes → uint8 RGB (grayscale is repeated, alpha dropped)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resize_and_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Shorter side → `size` (bilinear, antialiased), then the central size×size square; float32."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new_hw = tf.cast(tf.math.ceil(shape * scale - 1e-3), tf.int32)
  image = tf.image.resize(image, tf.maximum(new_hw, size), method='bilinear', antialias=True)
  top = (tf.shape(image)[0] - size) // 2
  left = (tf.shape(image)[1] - size) // 2
  return image[top:top + size, left:left + size, :]


def pca_lighting(image: tf.Tensor, seed: tf.Tensor, p: Preprocess) -> tf.Tensor:
  """Adds eigvec @ (alpha * eigval), alpha ~ N(0, std) per image, to every pixel (§4.1)."""
  alpha = tf.random.stateless_normal([3], seed=seed, stddev=p.lighting_std)
  rgb = tf.linalg.matvec(tf.constant(p.eigvec, tf.float32), alpha * tf.constant(p.eigval))
  return image + rgb


def normalize(image: tf.Tensor, p: Preprocess) -> tf.Tensor:
  return (image - tf.constant(p.mean)) / tf.constant(p.std)


def train_image(encoded: tf.Tensor, seed: tf.Tensor, p: Preprocess) -> tf.Tensor:
  """One training example; `seed` (shape [2], int64) fixes its crop, flip and lighting."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = resize_and_center_crop(decode(encoded), p.resize_size) / 255.0
  image = tf.image.stateless_random_crop(image, [p.image_size, p.image_size, 3], seed=seeds[0])
  if p.flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
  if p.lighting_std > 0:
    image = pca_lighting(image, seeds[2], p)
  return normalize(image, p)


def eval_image(encoded: tf.Tensor, p: Preprocess) -> tf.Tensor:
  image = resize_and_center_crop(decode(encoded), p.resize_size) / 255.0
  offset = (p.resize_size - p.image_size) // 2
  image = image[offset:offset + p.image_size, offset:offset + p.image_size, :]
  return normalize(image, p)


OFFLINE_BUILDERS = ('digits',)  # ours: prepared from files on this machine, no download


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `config.dataset`.

  Our own builders are prepared on first use; a set that needs files you download yourself
  (imagenet2012) is prepared from `dataset.manual_dir`; anything else must already be prepared
  in `dataset.data_dir` — this never downloads.
  """
  import alexnet_jax.datasets  # noqa: F401  registers our builders
  name = config.name
  try:
    builder = tfds.builder(name, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f'dataset.name={name!r} is not a TFDS data set nor one of ours '
                      f'{OFFLINE_BUILDERS}; check the spelling (e.g. imagenet2012, cifar10).'
                      ) from None
  if builder.is_prepared():
    return builder
  manual_dir = config.get('manual_dir')
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    if not manual_dir or not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      raise ConfigError(
          f'{name} is not prepared in {builder.data_dir} and needs files you download yourself: '
          f'put them in a folder and pass --config.dataset.manual_dir=DIR (got {manual_dir!r}).')
  elif name.split(':')[0].split('/')[0] not in OFFLINE_BUILDERS:
    raise ConfigError(
        f'{name} is not prepared in {builder.data_dir}; this run does not download. Prepare it '
        f'where there is network (tfds build {name} --data_dir=DIR) and pass '
        f'--config.dataset.data_dir=DIR.')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None)
  return builder


@dataclasses.dataclass
class Split:
  """This process's shard of a split, read once; iterate with `train_batches` / `eval_batches`."""

  records: tf.data.Dataset  # {'image': encoded bytes, 'label': int64}
  num_examples: int  # in this shard
  num_classes: int
  shard: int = 0  # this process's index among `num_shards` (one shard per process)
  num_shards: int = 1
  largest_shard: int = 0  # examples in the largest shard: every process runs as many eval steps


def load_split(builder: tfds.core.DatasetBuilder, split: str, cache: bool, *, shard: int = 0,
               num_shards: int = 1, drop_remainder: bool = False) -> Split:
  """Shard `shard` of `num_shards` equal parts of `split` (TFDS split slicing, one per process)."""
  if split not in builder.info.splits:
    raise ConfigError(f'split {split!r} is not in {builder.name} (it has '
                      f'{sorted(builder.info.splits)}); set dataset.train_split/eval_split.')
  parts = (tfds.even_splits(split, n=num_shards, drop_remainder=drop_remainder)
           if num_shards > 1 else [split])
  sizes = [builder.info.splits[part].num_examples for part in parts]
  ds = builder.as_dataset(split=parts[shard], shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})
  if cache:
    ds = ds.cache()
  return Split(ds, sizes[shard], builder.info.features['label'].num_classes, shard, num_shards,
               max(sizes))


def train_batches(split: Split, p: Preprocess, batch_size: int, *, seed: int,
                  start_step: int = 0, shuffle_buffer: int = 10_000) -> Iterator[dict[str, Any]]:
  """Endless numpy batches {'image', 'label', 'index'}, epoch after epoch, from `start_step` on.

  Epoch e is the shard shuffled with seed (seed, e), cut into full batches (the remainder is
  dropped); resuming skips the records already consumed before decoding them. `index` is unique
  over the whole run and all processes; it keys the example's augmentation and dropout.
  """
  steps_per_epoch = split.num_examples // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'train.batch_size={batch_size} is larger than the training split '
                     f'({split.num_examples} examples); lower it.')
  first_epoch, offset = divmod(start_step, steps_per_epoch)

  def epoch(e: int, skip: int) -> tf.data.Dataset:
    epoch_seed = tf.constant([seed, e], tf.int64)
    ds = split.records.shuffle(min(shuffle_buffer, split.num_examples),
                               seed=(seed * 1_000_003 + e) % 2**31, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip * batch_size)

    def example(i, ex):
      index = (e * split.num_shards + split.shard) * split.num_examples + i
      ex_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
      return {'image': train_image(ex['image'], ex_seed, p), 'label': ex['label'],
              'index': tf.cast(index, tf.int32)}

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  for e in itertools.count(first_epoch):
    yield from tfds.as_numpy(epoch(e, offset if e == first_epoch else 0))


def eval_batches(split: Split, p: Preprocess, batch_size: int) -> Iterator[dict[str, Any]]:
  """One pass in order; batches are padded to `batch_size` (`mask` = 1 marks real examples), and
  a shard smaller than the largest one ends with empty batches, so all processes step together."""
  ds = split.records.map(lambda ex: {'image': eval_image(ex['image'], p), 'label': ex['label']},
                         num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  count = 0
  for batch in tfds.as_numpy(ds):
    count += 1
    yield pad_batch(batch, batch_size)
  empty = {'image': np.zeros((0, p.image_size, p.image_size, 3), np.float32),
           'label': np.zeros((0,), np.int64)}
  for _ in range(count, -(-split.largest_shard // batch_size)):
    yield pad_batch(empty, batch_size)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads every array to `batch_size` rows with zeros and adds `mask` (1 = real example)."""
  n = len(batch['label'])
  padded = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded['mask'] = (np.arange(batch_size) < n).astype(np.float32)
  return padded

