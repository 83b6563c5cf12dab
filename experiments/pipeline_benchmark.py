"""Host input pipeline throughput on ImageNet-shaped photographs, images/s on one core and on all.

    python experiments/pipeline_benchmark.py --path=/tmp/photos --make_photos=600 \
        --baseline_rev=e76cae4 --markdown=experiments/results/pipeline_benchmark.md

DIR holds JPEGs (searched recursively; the first --num_files are read into memory, so disk speed
is not measured); `--make_photos=N` first writes N of them: random views of the two photographs
scikit-learn ships, 500x375 (ImageNet's typical shape), quality 85-95, as
experiments/make_photo_folder.py does. Every measurement runs in a child process pinned to CPU
cores with sched_setaffinity (TF sizes its thread pools from the affinity mask), on one core and
on all of them, with configs/imagenet.py's train preprocessing (224 crops of the 256 square,
flips, PCA lighting; uint8 batches of 128):

  full-size          input_pipeline.train_batches on the JPEGs as they are (decode, resize, crop)
  before (REV)       the same, with alexnet_jax/input_pipeline.py as it was at git revision REV
  prepared JPEG      train_batches on the same images stored as 256x256 quality-95 JPEGs
                     (datasets/prepared.py's `store`): decode of the crop window, flip, lighting
  prepared raw       train_batches on the same squares stored as raw uint8: crop, flip, lighting
  decode ceiling     tf.io.decode_jpeg of the prepared JPEGs and nothing else, batched

and prints one table (img/s, ratios, and the cores it takes to feed --feed img/s).
`--kinds` picks some of them; `--onednn_ab` measures each kind twice, with TensorFlow's oneDNN
custom operations off (TF_ENABLE_ONEDNN_OPTS=0, what alexnet_jax/quiet_tf.py sets) and on (=1,
TensorFlow's default on CPUs with AVX-512 VNNI or AMX), and says whether both give the same bytes
in their first batches.

The kinds are measured side by side, time-sliced: each runs in --replicas processes pinned to the
same cores, and the parent lets one process run at a time (SIGCONT/SIGSTOP) for --slice_seconds,
every process once per round in a random order, for --rounds rounds. A shared host's speed drifts
by 10-20% over minutes; sliced this finely, every kind sees the same drift. Identical processes
still differ by up to ~15% here (the same code, a different process), hence the replicas: a
kind's figure is the median of its processes, their range in brackets. One core: images per
second of the process's CPU time; all cores: images per second of the time it was let run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments.report_out import emit  # noqa: E402  (after the path)

_PATH = flags.DEFINE_string('path', None, 'Folder of JPEG files.')
_MAKE = flags.DEFINE_integer('make_photos', 0, 'First write this many photo JPEGs into --path.')
_NUM_FILES = flags.DEFINE_integer('num_files', 600, 'JPEGs read into memory (and cycled).')
_ROUNDS = flags.DEFINE_integer('rounds', 16, 'Rounds of time slices; each process runs once a '
                               'round.')
_SLICE = flags.DEFINE_float('slice_seconds', 0.5, 'How long each process runs in a round.')
_REPLICAS = flags.DEFINE_integer('replicas', 3, 'Processes per kind; a kind\'s figure is their '
                                 'median (identical processes differ by up to ~15% here).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
_BASELINE = flags.DEFINE_string('baseline_rev', None, 'Also measure the train pipeline of this '
                                'git revision (e.g. the one before a change), same run.')
_FEED = flags.DEFINE_integer('feed', 45_000, 'Target img/s for the "cores to feed" column (one '
                             'H200 step, experiments/results/gpu_benchmark.md).')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Also write the table here.')
_KINDS = flags.DEFINE_list('kinds', None, 'Measure only these (full, before, jpeg, raw, ceiling).')
_ONEDNN_AB = flags.DEFINE_boolean('onednn_ab', False, 'Measure every kind with '
                                  'TF_ENABLE_ONEDNN_OPTS=0 and =1, side by side.')
_MEASURE = flags.DEFINE_string('measure', None, 'Internal: run this kind, reporting progress.')
_REPORT = flags.DEFINE_integer('report_fd', None, 'Internal: where to report progress.')
_CORES = flags.DEFINE_list('cores', None, 'Internal: CPU ids to pin to.')
_STORE = flags.DEFINE_string('store', None, 'Internal: where the prepared forms are.')
flags.mark_flag_as_required('path')

KINDS = ('full', 'before', 'jpeg', 'raw', 'ceiling')
NAMES = {'full': 'full-size JPEGs (train pipeline)', 'jpeg': 'prepared JPEG (train pipeline)',
         'raw': 'prepared raw (train pipeline)', 'ceiling': 'decode ceiling (prepared JPEGs)'}


def make_photos(path: str, n: int) -> None:
  from PIL import Image
  from sklearn.datasets import load_sample_images
  from experiments.make_photo_folder import random_view
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  photos = [Image.fromarray(p) for p in load_sample_images().images]
  for i in range(n):
    random_view(photos[i % len(photos)], rng).save(os.path.join(path, f'{i:05d}.jpg'),
                                                   quality=int(rng.integers(85, 96)))


def read_jpegs(path: str, limit: int) -> list[bytes]:
  files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                 if n.lower().endswith(('.jpg', '.jpeg')))[:limit]
  if not files:
    raise app.UsageError(f'--path={path} holds no .jpg/.jpeg files; point it at a JPEG folder or '
                         f'add --make_photos=600.')
  data = []
  for f in files:
    with open(f, 'rb') as fh:
      data.append(fh.read())
  return data


def write_prepared(data: list[bytes], store_dir: str) -> None:
  """The 256x256 squares of `data` as JPEG bytes and raw uint8 (datasets/prepared.py's store)."""
  from alexnet_jax.quiet_tf import tf
  from alexnet_jax.datasets import prepared
  jpegs = [prepared.store(tf.constant(d), 256, 'jpeg', 95).numpy() for d in data]
  raw = np.stack([prepared.store(tf.constant(d), 256, 'raw', 0).numpy() for d in data])
  np.save(os.path.join(store_dir, 'raw.npy'), raw)
  np.savez(os.path.join(store_dir, 'jpeg.npz'), lengths=[len(j) for j in jpegs],
           data=np.frombuffer(b''.join(jpegs), np.uint8))


def read_prepared_jpegs(store_dir: str) -> list[bytes]:
  with np.load(os.path.join(store_dir, 'jpeg.npz')) as f:
    ends, data = np.cumsum(f['lengths']), f['data'].tobytes()
    return [data[e - n:e] for e, n in zip(ends, f['lengths'])]


def load_module(rev: str):
  """alexnet_jax/input_pipeline.py as it was at git revision `rev`."""
  source = subprocess.run(['git', 'show', f'{rev}:alexnet_jax/input_pipeline.py'], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'input_pipeline_before.py')
  with open(path, 'w') as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location('input_pipeline_before', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def batches(kind: str, data: list[bytes], store_dir: str, batch_size: int):
  from alexnet_jax.quiet_tf import tf
  from alexnet_jax import input_pipeline as ip
  from configs import imagenet
  if kind == 'ceiling':
    ds = tf.data.Dataset.from_tensor_slices(read_prepared_jpegs(store_dir)).cache().repeat()
    ds = ds.map(lambda x: tf.io.decode_jpeg(x, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
  module = load_module(_BASELINE.value) if kind == 'before' else ip
  images = {'full': data, 'before': data, 'jpeg': read_prepared_jpegs(store_dir),
            'raw': np.load(os.path.join(store_dir, 'raw.npy'))}[kind]
  records = tf.data.Dataset.from_tensor_slices(
      {'image': images, 'label': tf.zeros([len(images)], tf.int64)}).cache()
  stored = {'jpeg': 'jpeg', 'raw': 'raw'}.get(kind)
  split = (module.Split(records, len(images), 1) if kind == 'before' else
           ip.Split(records, len(images), 1, stored=stored))
  pre = module.Preprocess.from_config(imagenet.get_config().dataset)
  return module.train_batches(split, pre, batch_size, seed=0)


def measure() -> None:
  """Child: after warm-up prints 'ready', then after every batch (images so far, CPU time)."""
  os.sched_setaffinity(0, {int(c) for c in _CORES.value})
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  data = read_jpegs(_PATH.value, _NUM_FILES.value)
  iterator = batches(_MEASURE.value, data, _STORE.value, _BATCH.value)
  report = os.fdopen(_REPORT.value, 'w', buffering=1)
  digest = hashlib.sha256()
  for _ in range(3):
    for key, value in sorted(next(iterator).items()):
      digest.update(key.encode() + np.ascontiguousarray(value).tobytes())
  report.write(f'{digest.hexdigest()}\nready\n')
  count = 0
  while True:
    next(iterator)
    count += _BATCH.value
    report.write(f'{count} {time.process_time()}\n')


class Child:
  """One kind's measuring process, stopped except while its slice runs."""

  def __init__(self, kind: str, cores: list[int], store_dir: str):
    """`kind`: one of KINDS, or KIND@V to run it with TF_ENABLE_ONEDNN_OPTS=V."""
    self.kind = kind
    kind, _, onednn = kind.partition('@')
    env = {**os.environ, **({'TF_ENABLE_ONEDNN_OPTS': onednn} if onednn else {})}
    read, write = os.pipe()
    args = [sys.executable, os.path.abspath(__file__), f'--measure={kind}',
            f'--cores={",".join(map(str, cores))}', f'--store={store_dir}',
            f'--report_fd={write}'] + [a for a in sys.argv[1:]
                                       if not a.startswith(('--make_photos', '--markdown'))]
    self.log = tempfile.TemporaryFile()  # a pipe could fill and block the child
    self.process = subprocess.Popen(args, pass_fds=(write,), stdout=self.log, stderr=self.log,
                                    env=env)
    os.close(write)
    self.pipe, self.buffer = read, b''
    self.samples: list[tuple[int, float, float]] = []  # (images, CPU s, s let run) per slice
    self.ran = 0.0

  def wait_ready(self) -> None:
    while b'ready\n' not in self.buffer:
      chunk = os.read(self.pipe, 1 << 16)
      if not chunk:
        self.log.seek(0)
        raise RuntimeError(f'{self.kind} failed:\n' + self.log.read().decode()[-3000:])
      self.buffer += chunk
    self.digest, self.buffer = self.buffer.split(b'ready\n', 1)
    self.process.send_signal(signal.SIGSTOP)

  def run_slice(self, seconds: float) -> None:
    self.process.send_signal(signal.SIGCONT)
    start = time.perf_counter()
    time.sleep(seconds)
    self.process.send_signal(signal.SIGSTOP)
    self.ran += time.perf_counter() - start
    while select.select([self.pipe], [], [], 0.05)[0]:  # what it wrote before it stopped
      self.buffer += os.read(self.pipe, 1 << 16)
    lines = self.buffer.split(b'\n')
    self.buffer = lines[-1]
    if len(lines) > 1:
      count, cpu = lines[-2].split()
      self.samples.append((int(count), float(cpu), self.ran))

  def rates(self, first: int, last: int) -> dict[str, float]:
    """img/s between the ends of slices `first` and `last`, per CPU second and per second run."""
    (n0, c0, r0), (n1, c1, r1) = self.samples[first], self.samples[last]
    return {'cpu': (n1 - n0) / (c1 - c0), 'wall': (n1 - n0) / (r1 - r0)}

  def close(self) -> None:
    self.process.kill()
    self.process.wait()
    os.close(self.pipe)
    self.log.close()


def time_sliced(kinds: list[str], cores: list[int], store_dir: str) -> dict[str, dict]:
  """Each kind's img/s ('cpu', 'wall'): the median of its --replicas processes, and their range;
  and the digests of its processes' first batches ('digests')."""
  children = [(k, Child(k, cores, store_dir)) for k in kinds for _ in range(_REPLICAS.value)]
  try:
    for _, child in children:
      child.wait_ready()
    for _ in range(_ROUNDS.value + 1):  # the first round only sets the starting point
      for _, child in random.sample(children, len(children)):
        child.run_slice(_SLICE.value)
    results = {}
    for kind in kinds:
      rates = []
      for k, child in children:
        if k == kind:
          if len(child.samples) < 3:
            raise RuntimeError(f'{kind}: only {len(child.samples)} slices finished a batch; raise '
                               f'--rounds or --slice_seconds.')
          rates.append(child.rates(0, len(child.samples) - 1))
      results[kind] = {m: {'median': float(np.median([r[m] for r in rates])),
                           'low': min(r[m] for r in rates), 'high': max(r[m] for r in rates)}
                       for m in ('cpu', 'wall')}
      results[kind]['digests'] = {child.digest for k, child in children if k == kind}
    return results
  finally:
    for _, child in children:
      child.close()


def main(argv) -> None:
  del argv
  if _MEASURE.value:
    return measure()
  if _MAKE.value:
    make_photos(_PATH.value, _MAKE.value)
  data = read_jpegs(_PATH.value, _NUM_FILES.value)
  cores = sorted(os.sched_getaffinity(0))
  kinds = [k for k in _KINDS.value or KINDS if k != 'before' or _BASELINE.value]
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    raise app.UsageError(f'--kinds: {unknown} unknown; use some of {KINDS}.')
  if _ONEDNN_AB.value:
    kinds = [f'{k}@{v}' for k in kinds for v in '01']
  with tempfile.TemporaryDirectory() as store_dir:
    subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {REPO!r}); '
                    f'from experiments.pipeline_benchmark import read_jpegs, write_prepared; '
                    f'write_prepared(read_jpegs({_PATH.value!r}, {_NUM_FILES.value}), '
                    f'{store_dir!r})'], check=True, capture_output=True)
    results = {n: time_sliced(kinds, cores[:n], store_dir) for n in (1, len(cores))}
  one, every = results[1], results[len(cores)]
  spread = lambda r, m: f'{r[m]["low"]:,.0f}-{r[m]["high"]:,.0f}'
  sizes = [len(d) for d in data]
  names = {**NAMES, 'before': f'full-size JPEGs, pipeline at {_BASELINE.value}'}
  names.update({f'{k}@{v}': f'{names[k]}, oneDNN {("off", "on")[int(v)]}'
                for k in KINDS if k in names for v in '01'})
  lines = [f'{len(data)} JPEGs from {_PATH.value} (mean {np.mean(sizes) / 1e3:.0f} KB), batch '
           f'{_BATCH.value}; {len(cores)} cores; time-sliced: {_REPLICAS.value} processes a kind, '
           f'{_ROUNDS.value} rounds of {_SLICE.value:g} s a process; each figure is the median of '
           f'a kind\'s processes (lowest-highest in brackets). One core: images per second of the '
           f'process\'s CPU time (the next column: per second it was let run). All cores: images '
           f'per second it was let run.', '',
           f'| pipeline | img/s, 1 core (CPU time) | 1 core, wall-clock | img/s, {len(cores)} cores '
           f'| per core | cores to feed {_FEED.value:,} img/s |', '|---|---|---|---|---|---|']
  for k in kinds:
    per_core = every[k]['wall']['median'] / len(cores)
    lines.append(f'| {names[k]} | {one[k]["cpu"]["median"]:,.0f} ({spread(one[k], "cpu")}) | '
                 f'{one[k]["wall"]["median"]:,.0f} | {every[k]["wall"]["median"]:,.0f} '
                 f'({spread(every[k], "wall")}) | {per_core:,.0f} | '
                 f'{_FEED.value / one[k]["cpu"]["median"]:,.0f} |')
  lines.append('')
  lines += ratios({k: v['cpu']['median'] for k, v in one.items()})
  if _ONEDNN_AB.value:
    for k in sorted({k.split('@')[0] for k in kinds}, key=KINDS.index):
      off, on = one[f'{k}@0'], one[f'{k}@1']
      same = len(off['digests'] | on['digests']) == 1
      lines.append(f'{names[k]}: oneDNN off / on {off["cpu"]["median"] / on["cpu"]["median"]:.2f}x '
                   f'on 1 core; first 3 batches {"identical" if same else "DIFFER"} in all '
                   f'{2 * _REPLICAS.value} processes')
  emit('\n'.join(lines), _MARKDOWN.value)


def ratios(one: dict[str, float]) -> list[str]:
  """The ratios of issue 13's goals, among the kinds measured (1 core, CPU time)."""
  wanted = [('jpeg', 'full', 'prepared JPEG / full-size: {:.1f}x on 1 core'),
            ('jpeg', 'before', 'prepared JPEG / before: {:.1f}x on 1 core (goal >= 10x)'),
            ('full', 'before', 'full-size / before: {:.1f}x on 1 core (goal >= 3x)'),
            ('jpeg', 'ceiling', 'prepared JPEG / decode ceiling: {:.0%} on 1 core (goal >= 70%)')]
  lines = [text.format(one[a] / one[b]) for a, b, text in wanted if a in one and b in one]
  if 'raw' in one:
    lines.append(f'prepared raw: {one["raw"]:,.0f} img/s on 1 core (goal >= 8,000)')
  return lines


if __name__ == '__main__':
  app.run(main)
