"""Never lose a run: kill -9 and resume bit-identically, SIGTERM, non-finite steps, bad inputs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO

# 22 steps an epoch at batch 64: the runs cross an epoch end (evaluation, plateau rule).
SHORT = ['--config.dataset.image_size=63', '--config.train.batch_size=64',
         '--config.train.log_every_steps=2', '--config.train.checkpoint_every_steps=4']


def command(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'alexnet_jax.main', '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *SHORT, *overrides]


def run(workdir, data_dir, *overrides, env=None, **kw):
  return subprocess.run(command(workdir, data_dir, *overrides), cwd=REPO, capture_output=True,
                        text=True, env=env, **kw)


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f]
  return [{k: v for k, v in l.items() if k != 'images_per_second'} for l in lines]


def logged_step(workdir):
  try:
    return max(l['step'] for l in metrics(workdir))
  except (FileNotFoundError, ValueError, json.JSONDecodeError):
    return 0


def checkpoint(workdir, step=None):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step() if step is None else step
  return step, manager.restore(step, args=ocp.args.StandardRestore())


def steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))


def assert_same_tree(a, b):
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_dir):
  """An uninterrupted 26-step run."""
  workdir = tmp_path_factory.mktemp('reference')
  out = run(workdir, digits_dir, '--config.train.num_train_steps=26')
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_kill_9_then_resume_is_bit_identical(tmp_path, digits_dir, reference):
  kill_after = random.Random().randint(5, 21)
  proc = subprocess.Popen(command(tmp_path, digits_dir, '--config.train.num_train_steps=26'),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while logged_step(tmp_path) < kill_after and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = logged_step(tmp_path)
  assert killed_at < 26, 'the run finished before it could be killed'
  out = run(tmp_path, digits_dir, '--config.train.num_train_steps=26')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resuming from step' in out.stdout + out.stderr, (killed_at, out.stderr[-2000:])
  assert metrics(tmp_path) == metrics(reference), f'killed after step {killed_at}'
  step, restored = checkpoint(tmp_path)
  ref_step, ref = checkpoint(reference)
  assert step == ref_step == 26
  assert_same_tree(restored, ref)


def test_keeps_latest_and_best(reference):
  # LatestN(3) keeps 18, 22, 24, 26 minus the oldest; the epoch-end checkpoint 22 is the best.
  assert steps(reference)[-3:] == [22, 24, 26] or steps(reference)[-3:] == [20, 24, 26]
  assert 22 in steps(reference)


def test_sigterm_checkpoints_and_exits_0(tmp_path, digits_dir):
  proc = subprocess.Popen(command(tmp_path, digits_dir, '--config.train.num_train_steps=500'),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while logged_step(tmp_path) < 3 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-3000:]
  stopped = [l for l in output.splitlines() if 'Stopped by SIGTERM at step' in l]
  assert stopped, output[-3000:]
  step = int(stopped[0].split('at step ')[1].split()[0])
  assert steps(tmp_path)[-1] == step
  out = run(tmp_path, digits_dir, f'--config.train.num_train_steps={step + 2}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'Resuming from step {step}' in out.stdout + out.stderr


def test_nonfinite_stop_names_step_and_checkpoint(tmp_path, digits_dir):
  out = run(tmp_path, digits_dir, '--config.train.num_train_steps=8',
            '--config.train.debug_nan_step=6')
  assert out.returncode != 0
  assert 'non-finite loss or gradient at step 6' in out.stderr, out.stderr[-2000:]
  assert 'Last good checkpoint: step 4' in out.stderr
  assert steps(tmp_path) == [4]


def test_nonfinite_skip_counts_and_keeps_params_finite(tmp_path, digits_dir):
  out = run(tmp_path, digits_dir, '--config.train.num_train_steps=8',
            '--config.train.debug_nan_step=6', '--config.train.on_nonfinite=skip')
  assert out.returncode == 0, out.stderr[-3000:]
  skipped = {l['step']: l['nonfinite_steps'] for l in metrics(tmp_path) if 'train_loss' in l}
  assert skipped == {2: 0, 4: 0, 6: 1, 8: 0}
  _, state = checkpoint(tmp_path)
  import jax
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


ALLOW = '--config.train.allow_config_change=True'
EIGHT = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


@pytest.mark.parametrize('overrides,message', [
    (['--config.train.batch_siz=8'],
     "'batch_siz' is not a config field (did you mean 'batch_size'?)"),
    (['--config.train.batch_size=eight'], 'flag --config.train.batch_size=eight: invalid literal'),
    (['--config.train.batch_size=60'], 'train.batch_size=60 does not divide evenly over 8 devices'),
    (['--config.dataset.name=no_such_set', ALLOW],
     "dataset.name='no_such_set' is not a TFDS data set"),
    (['--config.dataset.name=mnist', ALLOW], 'mnist is not prepared in'),
    (['--config.dataset.name=imagenet2012', ALLOW], 'pass --config.dataset.manual_dir=DIR'),
    (['--config.model.lrn=False'],
     'holds a run with a different config (model.lrn: True -> False)'),
    (['--config.train.on_nonfinite=ignore'], "train.on_nonfinite='ignore' is unknown"),
])
def test_bad_input_is_one_line_and_leaves_checkpoints(digits_dir, reference, overrides, message):
  before = steps(reference)
  out = run(reference, digits_dir, '--config.train.num_train_steps=30', *overrides, env=EIGHT)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith('error: '), out.stderr[-2000:]
  assert message in out.stderr.strip().splitlines()[-1]
  assert steps(reference) == before
  assert checkpoint(reference)[0] == 26


def test_disk_full_keeps_previous_checkpoint(tmp_path, digits_dir, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)  # a run stopped at step 26
  # Every write past 1 MiB fails (EFBIG), as writes do on a full disk.
  small_files = ['bash', '-c', 'trap "" XFSZ; ulimit -f 1024; exec "$@"', 'bash']
  out = subprocess.run(small_files + command(tmp_path, digits_dir,
                                             '--config.train.num_train_steps=30'),
                       cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0
  assert 'error: could not write checkpoint 28' in out.stderr, out.stderr[-2000:]
  assert 'the previous checkpoint (step 26) is intact' in out.stderr
  assert checkpoint(tmp_path)[0] == 26
