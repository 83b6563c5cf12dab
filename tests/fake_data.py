"""Tiny data sets the tests write: a fake ILSVRC-2012 manual dir and an image folder."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

# Two of the files the real imagenet2012 builder repairs (a CMYK JPEG and a PNG named .JPEG).
IMAGENET_TRAIN = {'n01440764': ['n01440764_10026.JPEG', 'n01440764_10027.JPEG'],
                  'n01739381': ['n01739381_1309.JPEG', 'n01739381_77.JPEG'],
                  'n02105855': ['n02105855_2933.JPEG', 'n02105855_11.JPEG']}
NUM_IMAGENET_VAL = 4


def encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def random_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
  return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(manual_dir: str) -> None:
  """ILSVRC2012_img_train.tar (one tar per synset) and ILSVRC2012_img_val.tar, as TFDS reads them.

  The validation labels come from TFDS's own validation_labels.txt: the i-th file name in sorted
  order gets its i-th line.
  """
  rng = np.random.default_rng(0)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for synset, names in IMAGENET_TRAIN.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for name in names:
          image = random_image(rng, int(rng.integers(20, 90)), int(rng.integers(20, 90)))
          if name == 'n01739381_1309.JPEG':
            data = encode(image.convert('CMYK'), 'JPEG')
          elif name == 'n02105855_2933.JPEG':
            data = encode(image, 'PNG')
          else:
            data = encode(image, 'JPEG')
          add_to_tar(class_tar, name, data)
      add_to_tar(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(NUM_IMAGENET_VAL, 0, -1):  # any order: TFDS sorts the names
      add_to_tar(val, f'ILSVRC2012_val_{i:08d}.JPEG',
                 encode(random_image(rng, 40 + i, 70 - i).convert('L'), 'JPEG'))


def write_image_folder(root: str) -> dict[str, list[str]]:
  """DIR/train/<class>/ and DIR/val/<class>/ with every awkward size, mode and format.

  Returns {split folder: [relative paths]}.
  """
  rng = np.random.default_rng(1)
  variants = [  # (mode, format, height, width)
      ('RGB', 'JPEG', 300, 200), ('L', 'JPEG', 17, 90), ('CMYK', 'JPEG', 40, 40),
      ('RGBA', 'PNG', 9, 13), ('L', 'PNG', 120, 31), ('P', 'PNG', 64, 64), ('LA', 'PNG', 50, 80),
      ('I;16', 'PNG', 33, 47), ('RGB', 'PNG', 5, 400), ('RGB', 'BMP', 30, 30)]
  written: dict[str, list[str]] = {'train': [], 'val': []}
  for split, per_class in (('train', 10), ('val', 3)):
    for c, label in enumerate(('zebra', 'apple', 'moth')):  # sorted: apple, moth, zebra
      os.makedirs(os.path.join(root, split, label))
      for i in range(per_class):
        mode, fmt, h, w = variants[(i + c) % len(variants)]
        if mode == 'I;16':
          image = Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
        else:
          image = random_image(rng, h, w).convert(mode)
        rel = os.path.join(split, label, f'{i}.{fmt.lower()}')
        with open(os.path.join(root, rel), 'wb') as f:
          f.write(encode(image, fmt))
        written[split].append(rel)
  with open(os.path.join(root, 'train', 'notes.txt'), 'w') as f:  # not an image: ignored
    f.write('not an image')
  return written
