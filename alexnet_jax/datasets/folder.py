"""The user's own images as a TFDS data set: `DIR/<split>/<class>/<image>`.

    python -m alexnet_jax.main --config=configs/default.py --workdir=runs/mine \
        --config.dataset.name=folder --config.dataset.path=DIR

Every sub-folder of DIR is a split (`val` is served as `validation`, the name the configs evaluate
on); the classes are the sub-folders of `DIR/train`, sorted, and every split's class folders must be
among them. Images are any size and any mode PIL reads (JPEG, PNG, BMP, GIF, WebP, TIFF; grayscale,
palette, RGBA, CMYK, 16-bit): 8-bit RGB or grayscale JPEGs and PNGs are stored byte for byte,
anything else is converted to RGB by PIL (alpha dropped, 16 bits scaled to 8) and stored as PNG,
so the pipeline's decoder only ever sees plain JPEG/PNG.

Preparing copies the images into TFDS files under `dataset.data_dir` (default `DIR/.tfds`), once;
the copy is named after a fingerprint of the folder's file list (paths, sizes, times), so adding,
removing or changing files prepares a fresh copy instead of serving stale data.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from absl import logging

from alexnet_jax.datasets.local import LocalBuilder
from alexnet_jax.errors import ConfigError
from alexnet_jax.quiet_tf import tfds

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
BAD_IMAGE_POLICIES = ('fail', 'skip')
SPLIT_NAMES = {'val': 'validation'}  # folder name -> split name (configs evaluate 'validation')


def list_images(path: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(relative path, class name), ...] sorted} for every split folder of `path`."""
  if not os.path.isdir(os.path.join(path, 'train')):
    raise ConfigError(f'dataset.path={path!r} has no train/ folder; lay images out as '
                     f'DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.')
  splits = {}
  for split_dir in sorted(os.listdir(path)):
    if split_dir.startswith('.') or not os.path.isdir(os.path.join(path, split_dir)):
      continue
    files = []
    for label in sorted(os.listdir(os.path.join(path, split_dir))):
      class_dir = os.path.join(path, split_dir, label)
      if label.startswith('.') or not os.path.isdir(class_dir):
        continue
      in_class = [(os.path.relpath(os.path.join(root, n), path), label)
                  for root, _, names in os.walk(class_dir) for n in names
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
      if not in_class:
        raise ConfigError(f'class folder {class_dir} has no images ({", ".join(IMAGE_EXTENSIONS)})'
                          f'; add some or remove the folder.')
      files += in_class
    splits[SPLIT_NAMES.get(split_dir, split_dir)] = sorted(files)
  return splits


def fingerprint(path: str, splits: dict[str, list[tuple[str, str]]]) -> str:
  digest = hashlib.sha1(os.path.abspath(path).encode())
  for split, files in sorted(splits.items()):
    for rel, label in files:
      st = os.stat(os.path.join(path, rel))
      digest.update(f'{split}\0{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return digest.hexdigest()[:12]


def to_plain_image(data: bytes) -> bytes:
  """`data` unchanged if it is an 8-bit RGB/grayscale JPEG or PNG, else converted to an RGB PNG."""
  from PIL import Image
  image = Image.open(io.BytesIO(data))
  if image.format in ('JPEG', 'PNG') and image.mode in ('RGB', 'L'):
    return data
  if image.mode.startswith('I'):  # 16/32-bit integer grayscale: PIL's RGB conversion would clip
    array = np.asarray(image).astype(np.float64)
    image = Image.fromarray(np.round(array * (255.0 / max(array.max(), 1.0))).astype(np.uint8))
  buffer = io.BytesIO()
  image.convert('RGB').save(buffer, format='PNG')
  return buffer.getvalue()


class Folder(LocalBuilder):
  """Images in `DIR/<split>/<class>/`; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, path: str, on_bad_image: str = 'fail', **kwargs):
    if on_bad_image not in BAD_IMAGE_POLICIES:
      raise ConfigError(f'dataset.on_bad_image={on_bad_image!r} is unknown; use one of '
                        f'{BAD_IMAGE_POLICIES}.')
    self._path = os.path.abspath(path)
    self._on_bad_image = on_bad_image
    self._splits = list_images(self._path)
    self._classes = sorted({label for _, label in self._splits['train']})
    if len(self._classes) < 2:
      raise ConfigError(f'{self._path}/train has {len(self._classes)} class folder(s) with images; '
                        f'classification needs at least two (DIR/train/<class>/...).')
    for split, files in self._splits.items():
      unknown = sorted({label for _, label in files} - set(self._classes))
      if unknown:
        raise ConfigError(f'{self._path}: split {split!r} has classes {unknown} that train/ lacks; '
                         f'add them to train/ or remove them.')
    name = (f'{os.path.basename(self._path) or "root"}-{fingerprint(self._path, self._splits)}'
            f'{"-skipbad" if on_bad_image == "skip" else ""}')
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'Image folder {self._path}',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=self._classes),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # the files are local
    return {split: self._generate_examples(files) for split, files in self._splits.items()}

  def _generate_examples(self, files):
    skipped = 0
    for rel, label in files:
      with open(os.path.join(self._path, rel), 'rb') as f:
        data = f.read()
      try:
        image = to_plain_image(data)
      except Exception as e:  # PIL's errors name no file
        if self._on_bad_image == 'skip':
          skipped += 1
          continue
        raise ConfigError(f'cannot read image {os.path.join(self._path, rel)}: {e}; fix or '
                          f'remove it, or pass --config.dataset.on_bad_image=skip.') from e
      yield rel, {'image': image, 'label': label, 'file_name': rel}
    if skipped:
      logging.warning('Skipped %d unreadable image(s) of %d in %s (dataset.on_bad_image=skip).',
                      skipped, len(files), os.path.dirname(os.path.join(self._path, files[0][0])))


def make_builder(path: str, data_dir: str | None, on_bad_image: str = 'fail') -> Folder:
  if not path:
    raise ConfigError('dataset.name=folder needs dataset.path=DIR (DIR/train/<class>/...).')
  return Folder(path=path, on_bad_image=on_bad_image,
                data_dir=data_dir or os.path.join(path, '.tfds'))
