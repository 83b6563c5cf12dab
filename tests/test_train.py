import json
import os
import subprocess
import sys

import numpy as np

from alexnet_jax import train
from alexnet_jax.parallel import Parallel
from conftest import REPO

EIGHT_DEVICES = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                 'PYTHONPATH': os.pathsep.join([REPO, os.path.join(REPO, 'tests')])}


def test_one_device_pmap8_jit8_train_identically():
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'parallel_check.py'), '4'],
                       env=EIGHT_DEVICES, cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  one = results['one']['losses']
  no_dropout = results['one_no_dropout']['losses']
  assert no_dropout[-1] < no_dropout[0] - 0.1, no_dropout  # the same batch 4 times: it must fall
  for name in ('pmap8', 'jit8'):
    np.testing.assert_allclose(results[name]['losses'], one, rtol=1e-5)
    assert results[name]['max_rel_param_diff'] <= 1e-5, (name, results[name])


def test_cli_refuses_indivisible_batch(tmp_path, digits_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', '--config=configs/default.py',
       f'--workdir={tmp_path}', f'--config.dataset.data_dir={digits_dir}',
       '--config.train.batch_size=12'], env=EIGHT_DEVICES, cwd=REPO, capture_output=True,
      text=True)
  assert out.returncode != 0
  assert 'train.batch_size=12 does not divide evenly over 8 devices' in out.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def run_cli(workdir, data_dir, *overrides, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
       '--config.dataset.image_size=63', '--config.train.batch_size=16',
       '--config.train.log_every_steps=2', *overrides],
      cwd=REPO, capture_output=True, text=True, env=env)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_cli_trains_checkpoints_and_resumes(tmp_path, digits_dir):
  out = run_cli(tmp_path, digits_dir, '--config.train.num_train_steps=3')
  assert out.returncode == 0, out.stderr[-3000:]
  lines = read_metrics(tmp_path)
  train_lines = [l for l in lines if 'train_loss' in l]
  evals = [l for l in lines if 'val_top1_error' in l]
  assert [l['step'] for l in train_lines] == [2, 3]
  assert all({'step', 'train_loss', 'learning_rate'} <= set(l) for l in train_lines)
  assert len(evals) == 1 and evals[0]['step'] == 3
  assert {'step', 'epoch', 'val_top1_error', 'val_top5_error', 'learning_rate'} <= set(evals[0])
  assert 0.0 <= evals[0]['val_top1_error'] <= 1.0
  assert os.listdir(tmp_path / 'checkpoints') == ['3']
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))

  again = run_cli(tmp_path, digits_dir, '--config.train.num_train_steps=5')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resuming from step 3' in again.stdout + again.stderr
  steps = [l['step'] for l in read_metrics(tmp_path) if 'train_loss' in l]
  assert steps == [2, 3, 4, 5]  # continued, not restarted
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '5']


def test_cli_jit_on_eight_devices(tmp_path, digits_dir):
  out = run_cli(tmp_path, digits_dir, '--config.train.num_train_steps=2',
                '--config.parallelism=jit', env=EIGHT_DEVICES)
  assert out.returncode == 0, out.stderr[-3000:]
  assert [l['step'] for l in read_metrics(tmp_path)] == [2, 2]


def test_evaluate_counts_every_example_once(config, digits_dir):
  import functools
  import jax
  from alexnet_jax import input_pipeline, optim
  builder = input_pipeline.get_builder(config.dataset)
  val = input_pipeline.load_split(builder, 'validation', cache=False)
  model = train.make_model(config, 10)
  state = train.create_train_state(model, optim.make_optimizer(config.optimizer),
                                   optim.make_plateau(config.optimizer), 63, 0)
  parallel = Parallel('jit', jax.devices()[:1])
  step = parallel.wrap(functools.partial(train.eval_step, model=model))
  pre = input_pipeline.Preprocess.from_config(config.dataset)
  result = train.evaluate(step, parallel.put_state(state), val, pre, 64, parallel)
  # The untrained model predicts one class for everything: top-1 error = 1 - that class's share.
  assert 0.85 <= result['val_top1_error'] <= 0.95
  assert result['val_top5_error'] < result['val_top1_error']
