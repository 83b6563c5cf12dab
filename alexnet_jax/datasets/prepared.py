"""The paper's stored form of any data set we read (§2): every image once as the central R×R
square of the image scaled so that its shorter side is R, as a TFDS set of ours.

    python -m alexnet_jax.prepare --config=configs/imagenet.py --config.dataset.manual_dir=DIR

or `--config.dataset.prepared=True` on any run (it prepares on first use). R = round(S·256/224)
for S = `dataset.image_size` (256 for ImageNet's 224). Stored forms (`dataset.prepared_format`):
'jpeg' (quality `dataset.prepared_quality`, 95 by default; the pipeline decodes only the crop
window) or 'raw' uint8 (no decode at all; R·R·3 bytes an image, 196 KB at 256).

The set lives next to its source, in `DATA_DIR/prepared/NAME/`, NAME naming the source (TFDS name,
version and config; a folder's config holds its file fingerprint), R and the stored form: a change
to any of them prepares a fresh set, and a finished one is reused. One process prepares a set;
others that need it at once wait for it (`input_pipeline.prepare_once`). Labels, class names,
splits and the order of the examples are the source's, so a run draws the same batches from
either (the same crops, flips and lighting; from a full-size image training resamples only the
crop window, so ~1 pixel value in 10⁴ lands one grey level apart).

Killing a preparation loses at most one chunk: the squares are made in chunks of `CHUNK` images
(tf.data, on every core), each written once to `DATA_DIR/prepared.partial/NAME/` by an atomic
rename; a restart reads the finished chunks back instead of redoing them. TFDS writes the set
into an `incomplete.*` directory and renames it only when every split is complete, so a killed
run never leaves a set that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
from typing import Any, Iterator

import numpy as np
import tqdm

from alexnet_jax import input_pipeline as ip
from alexnet_jax.datasets.local import LocalBuilder
from alexnet_jax.errors import ConfigError
from alexnet_jax.quiet_tf import tf, tfds

CHUNK = 1024  # images per restart unit


class Prepared(LocalBuilder):
  """The R×R squares of `source`; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, source: tfds.core.DatasetBuilder, size: int, stored: str, quality: int,
               **kwargs):
    if stored not in ip.STORED_FORMS:
      raise ConfigError(f'dataset.prepared_format={stored!r} is unknown; use one of '
                        f'{ip.STORED_FORMS}.')
    if stored == 'jpeg' and not 1 <= quality <= 100:
      raise ConfigError(f'dataset.prepared_quality={quality} is not a JPEG quality; use 1-100 '
                        f'(95 by default).')
    self.source, self.size, self.stored, self.quality = source, size, stored, quality
    self.chunk_size, self.kill_after_chunks = CHUNK, 0
    self.bar: tqdm.tqdm | None = None
    form = f'jpeg{quality}' if stored == 'jpeg' else 'raw'
    digest = hashlib.sha1(source.info.full_name.encode()).hexdigest()[:10]
    name = f'{source.name}-{digest}-{size}px-{form}'
    super().__init__(config=tfds.core.BuilderConfig(name=name), data_dir=source.data_dir_root,
                     **kwargs)

  @property
  def work_dir(self) -> str:
    """Finished chunks of an unfinished preparation."""
    return os.path.join(self.data_dir_root, 'prepared.partial', self.builder_config.name)

  def _info(self) -> tfds.core.DatasetInfo:
    shape = (self.size, self.size, 3)
    _, label_key = self.source.info.supervised_keys or ('image', 'label')
    return self.dataset_info_from_configs(
        description=(f'{self.source.info.full_name} as the central {self.size}x{self.size} square '
                     f'of each image scaled to a shorter side of {self.size}, stored as '
                     f'{self.stored}.'),
        features=tfds.features.FeaturesDict({
            'image': (tfds.features.Image(shape=shape, encoding_format='jpeg')
                      if self.stored == 'jpeg' else
                      tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                           encoding=tfds.features.Encoding.BYTES)),
            'label': tfds.features.ClassLabel(
                names=self.source.info.features[label_key].names),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # the source's order: same epochs, same batches as unprepared
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # the source is local
    return {split: self._generate_examples(split) for split in self.source.info.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for start, images, labels in self._chunks(split):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield start + i, {'image': image, 'label': int(label)}


  def _chunks(self, split: str) -> Iterator[tuple[int, list[Any], np.ndarray]]:
    """(first index, images, labels) of every chunk of `split`: finished ones read back, the
    rest made and written. A chunk file is named by its first index, so a restart with another
    chunk size still continues exactly where the last one stopped."""
    work = os.path.join(self.work_dir, split)
    start = 0
    for first, path, count in _finished_chunks(work):
      images, labels = _read_chunk(path)
      self._advance(count)
      yield first, images, labels
      start = first + count
    if start == self.source.info.splits[split].num_examples:
      return
    os.makedirs(work, exist_ok=True)
    records = ip.load_split(self.source, split, cache=False).records.skip(start)
    ds = records.map(lambda ex: (store(ex['image'], self.size, self.stored, self.quality),
                                 ex['label']),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for made, (images, labels) in enumerate(
        tfds.as_numpy(ds.batch(self.chunk_size).prefetch(1)), 1):
      images = list(images)
      _write_chunk(os.path.join(work, f'{start:010d}.npz'), images, labels, self.stored)
      if made == self.kill_after_chunks:  # test hook (prepare --debug_kill_after_chunks)
        os.kill(os.getpid(), signal.SIGKILL)
      self._advance(len(labels))
      yield start, images, labels
      start += len(labels)

  def _advance(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)


def store(encoded: tf.Tensor, size: int, stored: str, quality: int) -> tf.Tensor:
  """An encoded full-size image → its stored R×R square (R = `size`): JPEG bytes or uint8."""
  square = ip.square_image(encoded, size, None)
  return tf.io.encode_jpeg(square, quality=quality) if stored == 'jpeg' else square


def _finished_chunks(work: str) -> Iterator[tuple[int, str, int]]:
  """(first index, path, images) of the consecutive finished chunks in `work` from index 0."""
  start = 0
  while os.path.exists(path := os.path.join(work, f'{start:010d}.npz')):
    with np.load(path) as f:  # reads the labels only
      count = len(f['labels'])
    yield start, path, count
    start += count


def finished_images(builder: Prepared) -> int:
  """Images an unfinished preparation of `builder` has already made (all splits)."""
  return sum(count for split in builder.source.info.splits
             for _, _, count in _finished_chunks(os.path.join(builder.work_dir, split)))


def _write_chunk(path: str, images: list[Any], labels: np.ndarray, stored: str) -> None:
  tmp = path + '.tmp.npz'  # np.savez appends .npz to other names
  if stored == 'jpeg':
    np.savez(tmp, labels=labels, lengths=np.array([len(b) for b in images], np.int64),
             data=np.frombuffer(b''.join(images), np.uint8))
  else:
    np.savez(tmp, labels=labels, squares=np.stack(images))
  os.replace(tmp, path)


def _read_chunk(path: str) -> tuple[list[Any], np.ndarray]:
  with np.load(path) as f:
    if 'squares' in f:
      return list(f['squares']), f['labels']
    ends = np.cumsum(f['lengths'])
    data = f['data'].tobytes()
    return [data[end - n:end] for end, n in zip(ends, f['lengths'])], f['labels']


def prepare(builder: Prepared, *, chunk_size: int = CHUNK,
            kill_after_chunks: int = 0) -> Prepared:
  """Writes `builder`'s set from its (prepared) source, one process at a time per set
  (`ip.prepare_once`), with a progress bar and an ETA; the process that prepares it prints where
  the set is and its size. Returns the finished builder."""

  def write(squares: Prepared) -> None:
    squares.chunk_size, squares.kill_after_chunks = chunk_size, kill_after_chunks
    splits = squares.source.info.splits
    total = sum(s.num_examples for s in splits.values())
    if done := finished_images(squares):
      print(f'Resuming: {done} of {total} images already prepared in {squares.work_dir}',
            flush=True)
    with tqdm.tqdm(total=total, unit='img', desc=f'Preparing {squares.builder_config.name}',
                   dynamic_ncols=True) as squares.bar, _without_tfds_bars():
      squares.download_and_prepare()
    squares.bar = None
    shutil.rmtree(squares.work_dir, ignore_errors=True)
    print(f'Prepared {squares.builder_config.name}: '
          f'{", ".join(f"{name} {s.num_examples}" for name, s in sorted(splits.items()))} '
          f'images as {squares.size}x{squares.size} {squares.stored}, '
          f'{disk_bytes(squares) / 2**20:.1f} MiB in {squares.data_dir}', flush=True)

  return ip.prepare_once(
      builder, lambda: Prepared(source=builder.source, size=builder.size, stored=builder.stored,
                                quality=builder.quality), write)


@contextlib.contextmanager
def _without_tfds_bars() -> Iterator[None]:
  """Ours counts every split with an ETA; TFDS's would print one more bar per split."""
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()


def disk_bytes(builder: tfds.core.DatasetBuilder) -> int:
  """Bytes the prepared set's files take."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(builder.data_dir) for name in names)
