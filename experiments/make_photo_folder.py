"""A small folder of real photographs, of ImageNet's shape, for configs/folder.py.

    python experiments/make_photo_folder.py --out=/tmp/photos --per_class=80 --seed=0

Two classes, `china` and `flower`, cut from the two photographs scikit-learn ships
(`sklearn.datasets.load_sample_images()`: china.jpg and flower.jpg, 427x640): each image is a
random crop of 55-100% of the photo's shorter side with a random aspect ratio between 4:3 and 3:2,
resized to 500x375 (ImageNet's typical size and shape), randomly mirrored and saved as a JPEG of
random quality 85-95. A fifth of each class (`--val_fraction`) goes to val/:

    OUT/train/china/000.jpg ... OUT/val/flower/079.jpg

The same flags give byte-identical files. Nothing is downloaded.
"""

from __future__ import annotations

import os

from absl import app, flags
import numpy as np

_OUT = flags.DEFINE_string('out', None, 'Output folder (created; must not hold a train/ or val/).')
_PER_CLASS = flags.DEFINE_integer('per_class', 80, 'Images per class, train and val together.')
_VAL_FRACTION = flags.DEFINE_float('val_fraction', 0.2, 'Share of each class written to val/.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the crops, mirrors and JPEG qualities.')
flags.mark_flag_as_required('out')

SIZE = (500, 375)  # width, height


def random_view(photo, rng: np.random.Generator):
  """A random crop of `photo` (a PIL image), resized to SIZE and maybe mirrored."""
  from PIL import Image
  width, height = photo.size
  aspect = rng.uniform(4 / 3, 3 / 2)
  crop_h = rng.uniform(0.55, 1.0) * min(height, width / aspect)
  crop_w = crop_h * aspect
  left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
  view = photo.resize(SIZE, Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
  return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def main(argv) -> None:
  del argv
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = load_sample_images()
  rng = np.random.default_rng(_SEED.value)
  num_val = round(_PER_CLASS.value * _VAL_FRACTION.value)
  if not 0 < num_val < _PER_CLASS.value:
    raise app.UsageError(f'--per_class={_PER_CLASS.value} with --val_fraction='
                         f'{_VAL_FRACTION.value} leaves an empty train/ or val/ split.')
  for split in ('train', 'val'):
    if os.path.exists(os.path.join(_OUT.value, split)):
      raise app.UsageError(f'{_OUT.value}/{split} exists; pick a new --out.')
  for name, pixels in zip(photos.filenames, photos.images):
    label = os.path.splitext(os.path.basename(name))[0]
    photo = Image.fromarray(pixels)
    for i in range(_PER_CLASS.value):
      split = 'val' if i >= _PER_CLASS.value - num_val else 'train'
      os.makedirs(os.path.join(_OUT.value, split, label), exist_ok=True)
      random_view(photo, rng).save(os.path.join(_OUT.value, split, label, f'{i:03d}.jpg'),
                                   quality=int(rng.integers(85, 96)))
  print(f'{_OUT.value}: {len(photos.images)} classes x {_PER_CLASS.value - num_val} train + '
        f'{num_val} val JPEGs of {SIZE[0]}x{SIZE[1]}')


if __name__ == '__main__':
  app.run(main)
