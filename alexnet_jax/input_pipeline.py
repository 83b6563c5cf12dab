"""TFDS → tf.data input pipeline with the paper's augmentation (§4.1), on the host CPU.

Every image first becomes the paper's stored form (§2): shorter side scaled to R, central R×R
square, uint8. A prepared set (`dataset.prepared=True`, alexnet_jax/prepare.py) stores exactly
that once, so the host only decodes (a JPEG only inside the crop window) and crops. From a
full-size image, training resamples only the S×S crop window of the square (a quarter less work
than the whole square; a pixel may land one grey level apart, ~1 in 10⁴).

train (`dataset.train_crop='paper'`): stored R×R square → random S×S crop → random horizontal
       flip, as uint8, plus the PCA lighting shift of §4.1 drawn per image (3 floats);
       (`'inception'`, full-size sources only): decode a random window of 8-100% of the area,
       aspect 3/4-4/3 (fused with the JPEG decode) → resize to S×S → flip → lighting draw
eval:  stored R×R square → center S×S crop; or the paper's 10 crops (four corners and center of
       the R×R image, and their mirrors; only the five for a run trained without flips:
       `eval_crop_names`); (`dataset.eval_resize='torchvision'`, full-size sources only):
       torchvision's Resize(R) → CenterCrop(S), center crop only
with S = `dataset.image_size` and R = round(S·256/224) (the paper's 256/224 margin).

Batches leave the host as uint8 (a quarter of float32's bytes); the lighting shift and the
per-channel normalisation are arithmetic the train and eval steps do on the device
(`preprocess.normalize`).

Randomness is stateless and keyed by (seed, run-wide example index), and the index by (epoch,
process, position in the epoch), so the stream is a pure function of the seed: a run resumed at
step t sees exactly the batches it would have seen, and the augmentation of an example does not
depend on the device count. Every train batch carries `index`, which also keys the model's dropout
masks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import os
import shutil
import time
from typing import IO, Any, Callable, Iterator, TypeVar

import ml_collections
import numpy as np

from alexnet_jax.errors import ConfigError
from alexnet_jax.preprocess import Preprocess
from alexnet_jax.quiet_tf import tf, tfds

EVAL_CROPS = (1, 10)  # what evaluation may ask for (`eval_crop_names`: what it gets)
FIVE_CROPS = ('top-left', 'top-right', 'bottom-left', 'bottom-right', 'center')


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG bytes → uint8 RGB (grayscale is repeated, alpha dropped)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_resize_center_crop(encoded: tf.Tensor, size: int, top: Any = 0, left: Any = 0,
                              crop: int | None = None, resize: str = 'paper') -> tf.Tensor:
  """Encoded image → shorter side `size` (bilinear, antialiased) → central size×size square; uint8.
  With `crop`: only the crop×crop window of that square at (`top`, `left`).

  `resize='torchvision'`: torchvision's Resize(size) then CenterCrop(crop) instead: the longer
  side becomes int(size·long/short) (truncated; 'paper' rounds it up), and the window is the
  crop×crop center of that whole image at offsets rounded half to even (Python's
  round((new - crop) / 2); 'paper' floors), moved by (`top`, `left`). JPEGs then decode as PIL
  does for torchvision (the accurate integer IDCT, at full size): the crop is within a grey level
  of torchvision's on average (tests/test_input_pipeline.py).

  Resized pixels are rounded back to 8 bits, as in the paper's stored 256×256 images (and PIL);
  an image whose shorter side is already `size` is only cropped, which keeps pre-resized data
  sets fast. Only the requested window is resampled, and a JPEG decodes only the pixels that
  window reads; a window's pixels may differ from the same pixels of the whole square by one
  grey level, rarely (the kernel's sample positions are computed from another origin). A JPEG
  whose shorter side is at least 4·`size` is decoded at half size by the IDCT: close to, not
  equal to, a full-resolution resize (within 6 levels, 1 on average: tests/test_input_pipeline.py).

  Few graph nodes, as in tf.data each one costs time, up to ~10 µs once large images have
  churned the heap, taken branch or not.
  """
  crop = size if crop is None else crop
  is_jpeg = tf.io.is_jpeg(encoded)
  jpeg_hw = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                    lambda: tf.ones([2], tf.int32))  # other formats: known once decoded
  corner = tf.stack([tf.cast(top, tf.int32), tf.cast(left, tf.int32)])  # in the square
  window = _window(jpeg_hw, size, corner, crop, resize)

  def other() -> tuple[tf.Tensor, ...]:
    image = decode(encoded)
    return image, tf.zeros([2], tf.int32), tf.shape(image)[:2], tf.constant(1.0)

  exact = resize == 'torchvision'
  half = tf.constant(False) if exact else tf.reduce_min(jpeg_hw) >= 4 * size
  # Pixels, the position of their first one, the image's [H, W], and the IDCT's scale-down.
  pixels, begin, hw, ratio = tf.switch_case(
      tf.where(is_jpeg, tf.cast(half, tf.int32), 2),
      [lambda: (tf.image.decode_and_crop_jpeg(encoded, window, channels=3,
                                              dct_method='INTEGER_ACCURATE' if exact else ''),
                window[:2], jpeg_hw, tf.constant(1.0)),
       lambda: (tf.io.decode_jpeg(encoded, channels=3, ratio=2), tf.zeros([2], tf.int32), jpeg_hw,
                tf.constant(2.0)),
       other])
  new_hw, first = _resized_shape_and_first(hw, size, corner, crop, resize)
  # ScaleAndTranslate's, as tf.image.resize passes it: output pixels per input pixel.
  scale = tf.cast(new_hw, tf.float32) / tf.cast(hw, tf.float32) * ratio
  translation = tf.cast(begin, tf.float32) * scale - tf.cast(first, tf.float32)
  shorter = tf.reduce_min(hw)
  image = tf.switch_case(tf.where(shorter == size, 0, tf.where(shorter < 2 * size, 1, 2)), [
      lambda: tf.slice(pixels, tf.concat([first - begin, [0]], 0), [crop, crop, 3]),
      lambda: _resample_by_rows(pixels, scale, translation, crop),
      lambda: _resample(pixels, scale, translation, crop)])
  image.set_shape([crop, crop, 3])
  return image


def _resized_shape_and_first(hw: tf.Tensor, size: int, corner: tf.Tensor, crop: int,
                             resize: str) -> tuple[tf.Tensor, tf.Tensor]:
  """[H, W] with the shorter side scaled to `size` (the longer rounded up, or truncated for
  'torchvision'), and the [top, left] of `decode_resize_center_crop`'s window in it."""
  if resize == 'torchvision':  # integer arithmetic: exactly int(size * long / short)
    new_hw = hw * size // tf.reduce_min(hw)
    return new_hw, tf.cast(tf.round(tf.cast(new_hw - crop, tf.float32) / 2), tf.int32) + corner
  hw = tf.cast(hw, tf.float32)
  new_hw = tf.maximum(tf.cast(tf.math.ceil(hw * (size / tf.reduce_min(hw)) - 1e-3), tf.int32),
                      size)
  return new_hw, (new_hw - size) // 2 + corner


def _window(hw: tf.Tensor, size: int, corner: tf.Tensor, crop: int, resize: str) -> tf.Tensor:
  """[top, left, height, width] of the pixels of an [H, W] image that the crop×crop window at
  `corner` of the central size×size square of its resize reads. The antialiased triangle kernel
  reaches max(1, 1/scale) ≤ 1 + 1/scale pixels either side of a sample; one pixel more for
  rounding and one because the JPEG decoder's chroma upsampling differs at a window's edge."""
  new_hw, first = _resized_shape_and_first(hw, size, corner, crop, resize)
  inverse = tf.cast(hw, tf.float32) / tf.cast(new_hw, tf.float32)
  first = tf.cast(first, tf.float32)
  edges = (first + [[-1.0], [crop + 1.0]]) * inverse
  begin = tf.maximum(tf.cast(tf.floor(edges[0]), tf.int32) - 3, 0)
  return tf.concat([begin, tf.minimum(tf.cast(tf.math.ceil(edges[1]), tf.int32) + 3, hw) - begin], 0)


def _resample(pixels: tf.Tensor, scale: tf.Tensor, translation: tf.Tensor,
              size: int) -> tf.Tensor:
  """The size×size ScaleAndTranslate (triangle kernel, antialiased: what tf.image.resize runs)
  of [H, W, 3] uint8 `pixels`, rounded to uint8."""
  resized = tf.raw_ops.ScaleAndTranslate(
      images=pixels[None], size=[size, size], scale=scale, translation=translation,
      kernel_type='triangle', antialias=True)[0]
  return tf.cast(tf.round(resized), tf.uint8)  # a weighted mean of uint8s: no clipping needed


def _resample_by_rows(pixels: tf.Tensor, scale: tf.Tensor, translation: tf.Tensor,
                      size: int) -> tf.Tensor:
  """`_resample` in about half the time on pixels under 2·size a side: both passes are
  ScaleAndTranslate's vectorised row pass (whole rows as the channels of a 1-pixel-wide image),
  not its column pass, which loops over each pixel's 3 channels. The same sums in the same order,
  so the same result. Its float temporaries are three times as large, though, which made it the
  slower one on larger pixels (page faults)."""
  scale, translation = tf.stack([scale, [1.0, 1.0]], 1), tf.stack([translation, [0.0, 0.0]], 1)
  rows = tf.reshape(pixels, tf.concat([[1], tf.shape(pixels)[:1], [1, -1]], 0))
  rows = tf.raw_ops.ScaleAndTranslate(images=rows, size=[size, 1], scale=scale[0],
                                      translation=translation[0], kernel_type='triangle',
                                      antialias=True)
  # [y, (x, channel)] → [x, (channel, y)]; 2-D transposes are the fast ones.
  by_column = tf.reshape(tf.transpose(tf.reshape(rows, [size, -1])), [1, -1, 1, 3 * size])
  square = tf.raw_ops.ScaleAndTranslate(images=by_column, size=[size, 1], scale=scale[1],
                                        translation=translation[1], kernel_type='triangle',
                                        antialias=True)
  square = tf.cast(tf.round(tf.reshape(square, [size * 3, size])), tf.uint8)
  return tf.reshape(tf.transpose(square), [size, size, 3])


STORED_FORMS = ('jpeg', 'raw')  # how a prepared set holds its R×R squares


def square_image(image: tf.Tensor, size: int, stored: str | None) -> tf.Tensor:
  """The stored R×R square (R = `size`), uint8: decoded from a prepared JPEG, as is from a
  prepared raw set, or made from a full-size encoded image (`stored=None`)."""
  if stored == 'raw':
    return image
  if stored == 'jpeg':
    square = tf.io.decode_jpeg(image, channels=3)
    square.set_shape([size, size, 3])
    return square
  return decode_resize_center_crop(image, size)


def augmentation_draws(first: tf.Tensor, count: tf.Tensor, seed: int,
                       p: Preprocess) -> dict[str, tf.Tensor]:
  """The random choices for the examples with run-wide indices first, first+1, ..., first+count-1.

  Example i's choices are Philox's output at counter i under a key made from `seed` (one stream
  for the crop and flip, one for the lighting), so they are a pure function of (seed, i), however
  the examples are grouped; drawing them for a whole batch in a few ops, not per example, is
  what keeps the host's per-image cost near the decode's. Returns, each with `count` rows:
  'index' int64; 'top', 'left' (int32) of a random S×S window of the R×R square; 'flip' (bool);
  'window_seed' (int64 [2], the seed of an inception window); 'shift' (float32 [3]), the RGB
  lighting shift eigvec @ (alpha * eigval), alpha ~ N(0, lighting_std²) per image (§4.1), added
  to the pixels in [0, 1] on the device (zeros with lighting off).
  """
  index = first + tf.range(tf.cast(count, tf.int64))
  shape = tf.stack([tf.cast(count, tf.int32), 4])
  counter = tf.stack([tf.cast(first, tf.uint64), tf.constant(0, tf.uint64)])
  bits = tf.raw_ops.StatelessRandomUniformFullIntV2(shape=shape, key=_philox_key(seed, 0),
                                                    counter=counter, alg=_PHILOX, dtype=tf.uint32)
  span = tf.constant(p.resize_size - p.image_size + 1, tf.uint32)
  draws = {'index': index, 'top': tf.cast(bits[:, 0] % span, tf.int32),
           'left': tf.cast(bits[:, 1] % span, tf.int32), 'flip': bits[:, 2] >= 2**31,
           # The inception window replaces the paper crop, so it reuses the crop's bits, not
           # the flip's.
           'window_seed': tf.cast(bits[:, :2], tf.int64)}
  if p.lighting_std > 0:
    alpha = tf.raw_ops.StatelessRandomNormalV2(shape=shape, key=_philox_key(seed, 1),
                                               counter=counter, alg=_PHILOX, dtype=tf.float32)
    alpha = alpha * p.lighting_std
    basis = np.asarray(p.eigvec, np.float32) * np.asarray(p.eigval, np.float32)  # V diag(λ)
    # V diag(λ) alpha as elementwise sums: a matmul's result would depend on the batch's shape.
    draws['shift'] = sum(alpha[:, j:j + 1] * basis[:, j] for j in range(3))
  else:
    draws['shift'] = tf.zeros([count, 3], tf.float32)
  return draws


_PHILOX = 1  # tf.random.Algorithm.PHILOX


def _philox_key(seed: int, stream: int) -> tf.Tensor:
  return tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.constant([seed, stream], tf.int64))[0]


def inception_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """A random window of 8-100% of the area and aspect 3/4-4/3 (Szegedy et al. 2015), resized to
  size×size and rounded to uint8; JPEGs decode only the window. After 10 failed draws (tiny or
  extreme images) the whole image is the window."""

  def window(shape):
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], extent[0], extent[1]

  def from_jpeg():
    top, left, h, w = window(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, h, w]), channels=3)

  def from_other():
    image = decode(encoded)
    top, left, h, w = window(tf.shape(image))
    return image[top:top + h, left:left + w, :]

  image = tf.cond(tf.io.is_jpeg(encoded), from_jpeg, from_other)
  image.set_shape([None, None, 3])
  resized = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
  return tf.saturate_cast(tf.round(resized), tf.uint8)


def train_image(image: tf.Tensor, draws: dict[str, tf.Tensor], p: Preprocess,
                stored: str | None = None) -> tf.Tensor:
  """One training example's uint8 [S, S, 3] pixels, cropped and flipped as one row of
  `augmentation_draws` says. A prepared JPEG decodes only the crop window."""
  size, crop = p.resize_size, p.image_size
  if p.train_crop == 'inception':
    image = inception_crop(image, draws['window_seed'], crop)
  else:
    top, left = draws['top'], draws['left']
    if stored == 'jpeg':
      image = tf.image.decode_and_crop_jpeg(image, tf.stack([top, left, crop, crop]), channels=3)
    elif stored is None:  # resample only the crop window
      image = decode_resize_center_crop(image, size, top, left, crop)
    else:
      image = image[top:top + crop, left:left + crop, :]
  if p.flip:
    image = tf.cond(draws['flip'], lambda: tf.reverse(image, [1]), lambda: image)
  image.set_shape([crop, crop, 3])
  return image


def eval_crop_names(crops: int, p: Preprocess) -> tuple[str, ...]:
  """The crops that `crops` (EVAL_CROPS) evaluates, in `eval_image`'s order: 1, the center; 10,
  the paper's ten (§4.1: four corners and center, then the same five mirrored) for a run trained
  with flips, and only the five unmirrored ones for a run trained without (`p.flip` False): a
  network that never saw a mirrored image is not scored on one."""
  if crops not in EVAL_CROPS:
    raise ConfigError(f'crops={crops} is not supported; use one of {EVAL_CROPS}.')
  if crops > 1 and p.eval_resize == 'torchvision':
    raise ConfigError("dataset.eval_resize='torchvision' defines only its center crop; use "
                      "--crops=1, or --config.dataset.eval_resize=paper for the paper's crops.")
  if crops == 1:
    return ('center',)
  return FIVE_CROPS + (tuple(f'{name} mirrored' for name in FIVE_CROPS) if p.flip else ())


def eval_image(image: tf.Tensor, p: Preprocess, crops: int = 1,
               stored: str | None = None) -> tf.Tensor:
  """The center S×S crop [S, S, 3], or with `crops=10` the crops `eval_crop_names` lists
  [10 or 5, S, S, 3]; uint8. `p.eval_resize='torchvision'`: torchvision's center crop of the
  full-size image (`decode_resize_center_crop`)."""
  mirror = len(eval_crop_names(crops, p)) == 10
  if p.eval_resize == 'torchvision':
    if stored is not None:
      raise ConfigError(_TORCHVISION_PREPARED)
    return decode_resize_center_crop(image, p.resize_size, crop=p.image_size,
                                     resize='torchvision')
  square = square_image(image, p.resize_size, stored)
  return (ten_crops(square, p.image_size, mirror) if crops == 10 else
          center_crop(square, p.image_size))


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  top = (tf.shape(image)[0] - size) // 2
  left = (tf.shape(image)[1] - size) // 2
  return image[top:top + size, left:left + size, :]


def ten_crops(image: tf.Tensor, size: int, mirror: bool = True) -> tf.Tensor:
  """Top-left, top-right, bottom-left, bottom-right and center size×size crops of `image`, then,
  with `mirror`, the same five mirrored (§4.1): [10 (5 without `mirror`), size, size, C]."""
  bottom, right = tf.shape(image)[0] - size, tf.shape(image)[1] - size
  five = tf.stack([image[t:t + size, l:l + size, :] for t, l in
                   ((0, 0), (0, right), (bottom, 0), (bottom, right))] +
                  [center_crop(image, size)])
  return tf.concat([five, five[:, :, ::-1, :]], axis=0) if mirror else five


_TORCHVISION_PREPARED = (
    "dataset.eval_resize='torchvision' resizes the full image (its longer side truncated), and a "
    "prepared set holds only the paper's central square; set --config.dataset.prepared=False.")
OFFLINE_BUILDERS = ('digits', 'folder')  # ours: prepared from files on this machine


def get_builder(config: ml_collections.ConfigDict,
                **prepare_options: int) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `config.dataset`; with `dataset.prepared`, the set of its R×R
  squares (alexnet_jax/datasets/prepared.py, whose `prepare` takes `prepare_options`), made on
  first use and reused after.

  Our own builders are prepared on first use; a set that needs files you download yourself
  (imagenet2012) is prepared from `dataset.manual_dir`; anything else must already be prepared
  in `dataset.data_dir` — this never downloads. Processes that need the same set at once (a
  sweep's trials, every host of a job) prepare it once: `prepare_once`.
  """
  from alexnet_jax.datasets import folder, prepared  # importing registers our builders
  name = config.name

  def make_source() -> tfds.core.DatasetBuilder:
    if name == 'folder':
      return folder.make_builder(config.get('path'), config.data_dir,
                                 config.get('on_bad_image', 'fail'))
    return tfds.builder(name, data_dir=config.data_dir)

  try:
    source = make_source()
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f'dataset.name={name!r} is not a TFDS data set nor one of ours '
                      f'{OFFLINE_BUILDERS}; check the spelling (e.g. imagenet2012, cifar10).'
                      ) from None
  if not config.get('prepared', False):
    return _ready(source, make_source, config)
  if config.train_crop == 'inception':
    raise ConfigError("dataset.train_crop='inception' needs the full image, and a prepared set "
                      "holds only its central square; set --config.dataset.prepared=False.")
  if config.eval_resize == 'torchvision':
    raise ConfigError(_TORCHVISION_PREPARED)

  def squares_of(source: tfds.core.DatasetBuilder) -> prepared.Prepared:
    return prepared.Prepared(source=source, size=round(config.image_size * 256 / 224),
                             stored=config.prepared_format, quality=config.prepared_quality)

  squares = squares_of(source)
  if squares.is_prepared():  # the source's own files are not needed any more
    return squares
  # The source as prepared (by this process or one it waited for), with its splits.
  return prepared.prepare(squares_of(_ready(source, make_source, config)), **prepare_options)


def _ready(builder: tfds.core.DatasetBuilder, remake: Callable[[], tfds.core.DatasetBuilder],
           config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """`builder`, prepared if it is ours or has its manual files; else a one-line error."""
  if builder.is_prepared():
    return builder
  name = config.name
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
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  return prepare_once(builder, remake,
                      lambda b: b.download_and_prepare(download_config=download_config))


Builder = TypeVar('Builder', bound=tfds.core.DatasetBuilder)
WAIT_NOTE_AFTER_S = 1.0  # a wait for another process's preparation longer than this is said


def prepare_once(builder: Builder, remake: Callable[[], Builder],
                 prepare: Callable[[Builder], None]) -> Builder:
  """`builder`'s set, prepared by one process at a time: `prepare(builder)` runs under an
  exclusive flock on `<set dir>.lock` (e.g. DATA_DIR/digits/1.0.0.lock). A process that finds
  it held waits (saying so after a second) and then returns `remake()`, a builder that sees the
  set the other one finished. TFDS writes a set into an `incomplete.*` directory and renames it
  when complete; the ones a killed process left are removed under the lock before preparing.
  The kernel drops the lock of a process that dies, even by SIGKILL."""
  if builder.is_prepared():  # no lock: the set's directory may be read-only
    return builder
  data_dir = builder.data_dir
  os.makedirs(os.path.dirname(data_dir), exist_ok=True)
  with open(data_dir + '.lock', 'w') as lock:
    _lock(lock, f'{builder.name} in {data_dir}')
    if (again := remake()).is_prepared():
      return again
    # TFDS names them incomplete.<random>_<version>; this version's are ours to remove.
    for stale in glob.glob(os.path.join(os.path.dirname(data_dir),
                                        f'incomplete.*_{os.path.basename(data_dir)}')):
      shutil.rmtree(stale, ignore_errors=True)
    prepare(builder)
  return builder


def _lock(lock_file: IO[str], what: str) -> None:
  """An exclusive flock on `lock_file`, taken by polling so that a signal handler's exception
  (Ctrl-C) ends the wait at once."""
  start = time.monotonic()
  said = False
  while True:
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return
    except BlockingIOError:
      pass
    if not said and time.monotonic() - start > WAIT_NOTE_AFTER_S:
      print(f'Waiting for another process preparing {what} ...', flush=True)
      said = True
    time.sleep(0.1)


@dataclasses.dataclass
class Split:
  """This process's part of a split, read once; iterate with `train_batches` / `eval_batches`:
  its shard, or (`read_all`) the whole split, of which it keeps its rows of every batch."""

  records: tf.data.Dataset  # {'image': encoded bytes (or a raw uint8 square), 'label': int64}
  num_examples: int  # in this shard (the whole split with `read_all`)
  num_classes: int
  shard: int = 0  # this process's index among `num_shards` (one shard per process)
  num_shards: int = 1
  largest_shard: int = 0  # examples in the largest shard: every process runs as many eval steps
  class_names: tuple[str, ...] = ()
  stored: str | None = None  # a prepared set's form of its R×R squares (STORED_FORMS); None: full size
  read_all: bool = False  # every process reads the whole split (dataset.process_reads='all')


def load_split(builder: tfds.core.DatasetBuilder, split: str, cache: bool, *, shard: int = 0,
               num_shards: int = 1, drop_remainder: bool = False, read_all: bool = False) -> Split:
  """Shard `shard` of `num_shards` equal parts of `split` (TFDS split slicing, one per process),
  or with `read_all` the whole split for process `shard` to take its rows of every batch from."""
  if split not in builder.info.splits:
    raise ConfigError(f'split {split!r} is not in {builder.name} (it has '
                      f'{sorted(builder.info.splits)}); set dataset.train_split/eval_split.')
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  features = builder.info.features
  stored = getattr(builder, 'stored', None)  # set by our prepared builder
  if not (isinstance(image_key, str) and image_key in features and label_key in features
          and (isinstance(features[image_key], tfds.features.Image) or stored == 'raw')
          and isinstance(features[label_key], tfds.features.ClassLabel)):
    raise ConfigError(f'{builder.name} is not an image-classification set (its supervised keys '
                      f'are {builder.info.supervised_keys}); choose another dataset.name.')
  parts = (tfds.even_splits(split, n=num_shards, drop_remainder=drop_remainder)
           if num_shards > 1 and not read_all else [split])
  sizes = [builder.info.splits[part].num_examples for part in parts]
  mine = 0 if read_all else shard
  ds = builder.as_dataset(split=parts[mine], shuffle_files=False,  # raw squares need no decoding
                          decoders=None if stored == 'raw' else {image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {'image': ex[image_key], 'label': ex[label_key]})
  if cache:
    ds = ds.cache()
  return Split(ds, sizes[mine], features[label_key].num_classes, shard, num_shards, max(sizes),
               tuple(features[label_key].names), stored, read_all)


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Full batches of this process's `batch_size` rows in the split (the remainder is dropped)."""
  rows = batch_size * (split.num_shards if split.read_all else 1)  # read per step
  if split.num_examples < rows:
    raise ConfigError(f'the training split has {split.num_examples} examples'
                      f'{" in this process" if split.num_shards > 1 and not split.read_all else ""}'
                      f', fewer than one batch of {rows}; lower --config.train.batch_size.')
  return split.num_examples // rows


def train_batches(split: Split, p: Preprocess, batch_size: int, *, seed: int,
                  start_step: int = 0, shuffle_buffer: int = 10_000) -> Iterator[dict[str, Any]]:
  """Endless numpy batches {'image': uint8, 'shift': lighting [B, 3], 'label', 'index'}, epoch
  after epoch, from `start_step` on.

  Epoch e is the shard shuffled with seed (seed, e), cut into full batches (the remainder is
  dropped); resuming skips the records already consumed before decoding them. `index` is unique
  over the whole run and all processes; it keys the example's augmentation and dropout. With
  `split.read_all` the whole split is shuffled and cut into global batches (`batch_size` rows
  per process), and this process keeps its rows of each: the batches of one process, whatever
  the number of processes.
  """
  steps = steps_per_epoch(split, batch_size)
  first_epoch, offset = divmod(start_step, steps)
  sharing = split.num_shards if split.read_all else 1  # processes taking rows of each batch
  global_batch = batch_size * sharing

  def mine(i: tf.Tensor) -> tf.Tensor:
    return (i % global_batch) // batch_size == split.shard

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    # Full batches only, so that no batch spans two epochs; resuming skips records undecoded.
    skip = tf.where(e == first_epoch, tf.constant(offset * global_batch, tf.int64), 0)
    records = split.records.shuffle(min(shuffle_buffer, split.num_examples),
                                    seed=(seed * 1_000_003 + e) % 2**31,
                                    reshuffle_each_iteration=False)
    records = records.take(steps * global_batch).skip(skip)
    positions = tf.data.Dataset.range(skip, steps * global_batch)  # in the epoch
    if sharing > 1:  # the other processes' rows are dropped undecoded
      records = tf.data.Dataset.zip(records, positions).filter(lambda _, i: mine(i)).map(
          lambda record, _: record)
      positions = positions.filter(mine)
    # The epoch's index 0 (its positions are global with read_all).
    first = (e if split.read_all else e * split.num_shards + split.shard) * split.num_examples
    draws = positions.batch(batch_size).map(
        lambda i: augmentation_draws(first + i[0], tf.size(i), seed, p)).unbatch()
    return tf.data.Dataset.zip(records, draws)

  def example(ex: dict[str, tf.Tensor], draws: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {'image': train_image(ex['image'], draws, p, split.stored), 'shift': draws['shift'],
            'label': ex['label'], 'index': tf.cast(draws['index'], tf.int32)}

  # One pipeline for all epochs: traced once, and the parallel map runs on across epoch ends.
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from tfds.as_numpy(ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def eval_batches(split: Split, p: Preprocess, batch_size: int,
                 crops: int = 1) -> Iterator[dict[str, Any]]:
  """One pass in order; batches are padded to `batch_size` (`mask` = 1 marks real examples), and
  a shard smaller than the largest one ends with empty batches, so all processes step together.

  Images are uint8; `crops=10`: every image is [C, S, S, 3], the C crops `eval_crop_names` lists.
  """
  num_crops = len(eval_crop_names(crops, p))  # checks `crops` before any work
  ds = split.records.map(
      lambda ex: {'image': eval_image(ex['image'], p, crops, split.stored), 'label': ex['label']},
      num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  count = 0
  for batch in tfds.as_numpy(ds):
    count += 1
    yield pad_batch(batch, batch_size)
  crop_axis = (num_crops,) if crops > 1 else ()
  empty = {'image': np.zeros((0, *crop_axis, p.image_size, p.image_size, 3), np.uint8),
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

