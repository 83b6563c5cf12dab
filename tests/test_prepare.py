"""Prepared sets: the paper's stored R×R squares, made once, killed and restarted, read fast."""

import fcntl
import glob
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from alexnet_jax import input_pipeline as ip
from alexnet_jax.preprocess import Preprocess
from alexnet_jax.datasets import prepared
from alexnet_jax.quiet_tf import tf, tfds
from conftest import REPO, tiny_config


def records(builder, split):
  """[(label, stored image)] in the set's order."""
  data = ip.load_split(builder, split, cache=False)
  return [(int(ex['label']), ex['image'].tobytes() if data.stored == 'raw' else ex['image'])
          for ex in tfds.as_numpy(data.records)]


@pytest.mark.parametrize('stored', ['jpeg', 'raw'])
def test_prepared_set_has_the_sources_labels_classes_splits_and_r_squares(digits_dir, stored):
  config = tiny_config(digits_dir)  # image_size 63: R = 72
  source = ip.get_builder(config.dataset)
  config.dataset.prepared, config.dataset.prepared_format = True, stored
  builder = ip.get_builder(config.dataset)
  assert isinstance(builder, prepared.Prepared) and builder.stored == stored
  assert builder.info.features['label'].names == source.info.features['label'].names
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      k: v.num_examples for k, v in source.info.splits.items()}
  for split in ('train', 'validation'):
    source_labels = [int(ex['label']) for ex in tfds.as_numpy(
        ip.load_split(source, split, cache=False).records)]
    got = records(builder, split)
    assert [label for label, _ in got] == source_labels  # the source's order
  pre = Preprocess.from_config(config.dataset)
  assert pre.resize_size == 72
  for _, image in got[:20]:
    square = ip.square_image(tf.constant(image) if stored == 'jpeg' else
                             tf.reshape(tf.io.decode_raw(image, tf.uint8), [72, 72, 3]), 72, stored)
    assert square.shape == (72, 72, 3) and square.dtype == tf.uint8


def test_raw_squares_give_the_batches_of_the_full_size_path(digits_dir):
  """Same examples, crops, flips, lighting and order; pixels may differ by one level where the
  full-size path's crop window rounds differently (none do on digits), and 10-crop eval reads
  the same squares."""
  config = tiny_config(digits_dir)
  pre = Preprocess.from_config(config.dataset)
  full = ip.load_split(ip.get_builder(config.dataset), 'train', cache=False)
  config.dataset.prepared, config.dataset.prepared_format = True, 'raw'
  raw = ip.load_split(ip.get_builder(config.dataset), 'train', cache=False)
  for a, b in zip(ip.train_batches(full, pre, 16, seed=1, start_step=88),
                  ip.train_batches(raw, pre, 16, seed=1, start_step=88)):  # crosses an epoch
    assert a.keys() == b.keys()
    for key in a.keys() - {'image'}:
      np.testing.assert_array_equal(a[key], b[key])
    assert np.abs(a['image'].astype(np.int32) - b['image']).max() <= 1
    if a['index'][0] > 1437:
      break
  for a, b in zip(ip.eval_batches(full, pre, 64, crops=10), ip.eval_batches(raw, pre, 64, crops=10)):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_a_jpeg_crop_window_decodes_like_the_whole_square(digits_dir):
  """Prepared JPEGs decode only the crop window; the pixels are the full decode's."""
  config = tiny_config(digits_dir)
  config.dataset.prepared = True
  config.dataset.flip = True
  data = ip.load_split(ip.get_builder(config.dataset), 'train', cache=False)
  pre = Preprocess.from_config(config.dataset)
  for i, ex in enumerate(data.records.take(8)):
    d = {k: v[0] for k, v in ip.augmentation_draws(tf.constant(i, tf.int64), 1, 4, pre).items()}
    image = ip.train_image(ex['image'], d, pre, 'jpeg')
    top, left = int(d['top']), int(d['left'])
    expected = ip.square_image(ex['image'], 72, 'jpeg')[top:top + 63, left:left + 63]
    np.testing.assert_array_equal(image, expected[:, ::-1] if d['flip'] else expected)


def test_inception_crop_on_a_prepared_set_is_one_line(digits_dir):
  config = tiny_config(digits_dir)
  config.dataset.prepared, config.dataset.train_crop = True, 'inception'
  with pytest.raises(ValueError, match="train_crop='inception' needs the full image"):
    ip.get_builder(config.dataset)
  config.dataset.train_crop, config.dataset.prepared_format = 'paper', 'png'
  with pytest.raises(ValueError, match="prepared_format='png' is unknown"):
    ip.get_builder(config.dataset)


def test_a_killed_preparation_restarts_where_it_stopped(tmp_path, digits_dir):
  data_dir = tmp_path / 'tfds'
  command = [sys.executable, '-m', 'alexnet_jax.prepare', '--config=configs/default.py',
             f'--config.dataset.data_dir={data_dir}', '--config.dataset.image_size=63',
             '--chunk_size=300']
  killed = subprocess.run(command + ['--debug_kill_after_chunks=3'], cwd=REPO,
                          capture_output=True, text=True)
  assert killed.returncode == -9, killed.stderr[-3000:]
  config = tiny_config(str(data_dir))
  config.dataset.prepared = True
  source = ip.get_builder(tiny_config(str(data_dir)).dataset)
  squares = prepared.Prepared(source=source, size=72, stored='jpeg', quality=95)
  assert not squares.is_prepared()  # nothing that looks finished
  train_chunks = sorted(os.listdir(os.path.join(squares.work_dir, 'train')))
  assert train_chunks == ['0000000000.npz', '0000000300.npz', '0000000600.npz']

  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resuming: 900 of 1797 images already prepared' in again.stdout + again.stderr
  assert f'Ready: {squares.builder_config.name}' in again.stdout
  assert not os.path.exists(squares.work_dir)
  finished = ip.get_builder(config.dataset)
  assert finished.is_prepared() and finished.data_dir == squares.data_dir
  # The same set as one uninterrupted preparation (the session's, in digits_dir).
  config_ref = tiny_config(digits_dir)
  config_ref.dataset.prepared = True
  reference = ip.get_builder(config_ref.dataset)
  for split in ('train', 'validation'):
    assert records(finished, split) == records(reference, split)



# Once it reads a line, prepares digits in the data_dir argv[1] and prints its train size; says
# 'preparing' if this process prepares it; with argv[2] == 'die', is SIGKILLed (as by the OOM
# killer) halfway.
PREPARE_DIGITS = """
import os, signal, sys
from alexnet_jax import input_pipeline as ip
from alexnet_jax.datasets import digits
from alexnet_jax.quiet_tf import tfds
from conftest import tiny_config
prepare = tfds.core.DatasetBuilder.download_and_prepare
def spy(self, **kwargs):
  print('preparing', flush=True)
  prepare(self, **kwargs)
tfds.core.DatasetBuilder.download_and_prepare = spy
generate = digits.Digits._generate_examples
def dying(self, *args):
  for i, example in enumerate(generate(self, *args)):
    if i == 700:
      os.kill(os.getpid(), signal.SIGKILL)
    yield example
if sys.argv[2:] == ['die']:
  digits.Digits._generate_examples = dying
sys.stdin.readline()
print(ip.get_builder(tiny_config(sys.argv[1]).dataset).info.splits['train'].num_examples)
"""


class CtrlC(BaseException):
  """What a run's SIGINT handler raises (a clean stop, not a KeyboardInterrupt traceback)."""


def ctrl_c(signum, frame):
  raise CtrlC


def test_processes_that_need_a_set_at_once_prepare_it_once(tmp_path, capsys, monkeypatch):
  """A sweep's trials, or every host of a job, in one data_dir: one prepares the set, the others
  wait for it and read it. A preparation killed midway leaves nothing the next one trips on, and
  a Ctrl-C ends a wait. Three processes: the two started here and this one (in a thread)."""
  runs = [subprocess.Popen([sys.executable, '-c', PREPARE_DIGITS, str(tmp_path), *args],
                           cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for args in (['die'], [], [])]  # all import at once
  out, err = runs[0].communicate('go\n')
  assert runs[0].returncode == -9 and out == 'preparing\n', err[-3000:]
  set_dir = os.path.join(tmp_path, 'digits', '1.0.0')
  assert glob.glob(os.path.join(tmp_path, 'digits', 'incomplete.*'))  # the killed one's
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      lambda self, **kwargs: (print('preparing'), prepare(self, **kwargs)))
  config = tiny_config(str(tmp_path))
  with open(set_dir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is preparing it
    for run in runs[1:]:
      run.stdin.write('go\n')
      run.stdin.flush()
    got = []
    here = threading.Thread(target=lambda: got.append(ip.get_builder(config.dataset)))
    here.start()
    previous = signal.signal(signal.SIGINT, ctrl_c)
    sigint = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
      sigint.start()
      with pytest.raises(CtrlC):  # a second call here, waiting too
        ip.get_builder(config.dataset)
    finally:
      sigint.cancel()
      sigint.join()
      signal.signal(signal.SIGINT, previous)
    waiting = f'Waiting for another process preparing digits in {set_dir} ...\n'
    assert [run.stdout.readline() for run in runs[1:]] == [waiting] * 2
  here.join()
  results = [run.communicate() for run in runs[1:]]
  assert [run.returncode for run in runs[1:]] == [0, 0], [err[-3000:] for _, err in results]
  assert [out.splitlines()[-1] for out, _ in results] == ['1437', '1437']
  assert got[0].info.splits['train'].num_examples == 1437
  out_here = capsys.readouterr().out
  assert out_here.count(waiting) == 2  # the thread's and the interrupted call's
  outs = [out_here] + [out for out, _ in results]
  assert sum(out.splitlines().count('preparing') for out in outs) == 1  # prepared once
  assert not glob.glob(os.path.join(tmp_path, 'digits', 'incomplete.*'))
