"""Train input pipeline throughput: our tf.data pipeline against a PIL+numpy loop, images/s.

    python experiments/pipeline_benchmark.py --path=DIR
    python experiments/pipeline_benchmark.py --path=/tmp/jpegs --write_synthetic=2000  # makes DIR

DIR is any folder of JPEGs (searched recursively; the first --num_files are read into memory, so
disk speed is not measured). Three measurements, each in a child process pinned to CPU cores with
sched_setaffinity (TF sizes its thread pools from the affinity mask):
  tf.data, 1 core    input_pipeline.train_batches with the paper's crop, flips and PCA lighting
  tf.data, all cores the same, on every core this process may use
  PIL+numpy, 1 core  the same decode / shorter side 256 / center 256 / random 224 / flip /
                     lighting / normalise, one image at a time, stacked into batches
and the ratio of the two one-core figures (the goal is >= 1.5).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_PATH = flags.DEFINE_string('path', None, 'Folder of JPEG files.')
_NUM_FILES = flags.DEFINE_integer('num_files', 1000, 'JPEGs read into memory (and cycled).')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Timed duration of each measurement.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
_TRAIN_CROP = flags.DEFINE_enum('train_crop', 'paper', ['paper', 'inception'], 'Crop policy.')
_WRITE = flags.DEFINE_integer('write_synthetic', 0,
                              'First write this many synthetic 256x256 JPEGs into --path.')
_MEASURE = flags.DEFINE_enum('measure', None, ['tf', 'pil'], 'Internal: one measurement.')
_CORES = flags.DEFINE_list('cores', None, 'Internal: CPU ids to pin to.')
flags.mark_flag_as_required('path')


def write_synthetic(path: str, n: int) -> None:
  """Smooth random colour fields with texture: JPEG-compressible like photos, not like noise."""
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  for i in range(n):
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((256, 256), Image.BICUBIC), np.float32)
    texture = rng.normal(0, 12, (256, 256, 1))
    pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(path, f'{i:05d}.jpg'), quality=90)


def read_jpegs(path: str, limit: int) -> list[bytes]:
  files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                 if n.lower().endswith(('.jpg', '.jpeg')))[:limit]
  if not files:
    raise ValueError(f'--path={path} holds no .jpg/.jpeg files; point it at a JPEG folder or add '
                     f'--write_synthetic=2000.')
  data = []
  for f in files:
    with open(f, 'rb') as fh:
      data.append(fh.read())
  return data


def timed(batches, batch_size: int, seconds: float) -> float:
  """Images/s over `seconds`, after two warm-up batches."""
  next(batches), next(batches)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(batches)
    count += batch_size
  return count / (time.perf_counter() - start)


def tf_batches(data: list[bytes], batch_size: int, train_crop: str):
  import tensorflow as tf
  from alexnet_jax import input_pipeline as ip
  from configs import imagenet
  config = imagenet.get_config().dataset
  config.train_crop = train_crop
  records = tf.data.Dataset.from_tensor_slices(
      {'image': tf.constant(data), 'label': tf.zeros([len(data)], tf.int64)}).cache()
  split = ip.Split(records, len(data), 1)
  return ip.train_batches(split, ip.Preprocess.from_config(config), batch_size, seed=0)


def pil_batches(data: list[bytes], batch_size: int):
  """The paper's train augmentation with PIL and numpy, one image at a time."""
  from PIL import Image
  from alexnet_jax import color_stats as cs
  rng = np.random.default_rng(0)
  eigval, eigvec = np.array(cs.IMAGENET_EIGVAL), np.array(cs.IMAGENET_EIGVEC)
  mean, std = np.array(cs.IMAGENET_MEAN, np.float32), np.array(cs.IMAGENET_STD, np.float32)
  i = 0
  while True:
    images = []
    for _ in range(batch_size):
      image = Image.open(io.BytesIO(data[i % len(data)])).convert('RGB')
      i += 1
      scale = 256 / min(image.size)
      w, h = max(256, round(image.width * scale)), max(256, round(image.height * scale))
      image = image.resize((w, h), Image.BILINEAR)
      left, top = (w - 256) // 2, (h - 256) // 2
      x = np.asarray(image.crop((left, top, left + 256, top + 256)), np.float32) / 255.0
      t, l = rng.integers(0, 33, size=2)
      x = x[t:t + 224, l:l + 224]
      if rng.random() < 0.5:
        x = x[:, ::-1]
      x = x + (eigvec @ (rng.normal(0, 0.1, 3) * eigval)).astype(np.float32)
      images.append((x - mean) / std)
    yield np.stack(images)


def measure() -> None:
  os.sched_setaffinity(0, {int(c) for c in _CORES.value})
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  data = read_jpegs(_PATH.value, _NUM_FILES.value)
  batches = (tf_batches(data, _BATCH.value, _TRAIN_CROP.value) if _MEASURE.value == 'tf' else
             pil_batches(data, _BATCH.value))
  print(json.dumps({'images_per_second': timed(batches, _BATCH.value, _SECONDS.value)}))


def run_child(kind: str, cores: list[int]) -> float:
  args = [sys.executable, os.path.abspath(__file__), f'--measure={kind}',
          f'--cores={",".join(map(str, cores))}'] + [a for a in sys.argv[1:]
                                                      if not a.startswith('--write_synthetic')]
  out = subprocess.run(args, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])['images_per_second']


def main(argv) -> None:
  del argv
  if _MEASURE.value:
    return measure()
  if _WRITE.value:
    write_synthetic(_PATH.value, _WRITE.value)
  read_jpegs(_PATH.value, 1)  # fail early on an empty folder
  cores = sorted(os.sched_getaffinity(0))
  tf_one = run_child('tf', cores[:1])
  tf_all = run_child('tf', cores)
  pil_one = run_child('pil', cores[:1])
  print(f'tf.data train pipeline ({_TRAIN_CROP.value} crop): {tf_one:.0f} images/s on 1 core, '
        f'{tf_all:.0f} images/s on {len(cores)} cores ({tf_all / len(cores):.0f} per core)')
  print(f'PIL+numpy loop: {pil_one:.0f} images/s on 1 core')
  print(f'ratio tf.data / PIL+numpy on 1 core: {tf_one / pil_one:.2f}')


if __name__ == '__main__':
  app.run(main)
