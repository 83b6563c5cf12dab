"""Evaluation from checkpoints the CLI wrote, 10-crop scoring, and CLI training on real layouts."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fake_data
from alexnet_jax import experiment
from alexnet_jax.preprocess import normalize
from conftest import REPO, tiny_config

SMALL = ['--config.dataset.image_size=63', '--config.model.width=0.25',
         '--config.train.log_every_steps=1',
         '--config.train.eval_batch_size=20']


def cli(module, *args):
  """Runs `python -m alexnet_jax.<module>` (compiled steps are reused: conftest's JAX cache)."""
  out = subprocess.run([sys.executable, '-m', f'alexnet_jax.{module}', *args], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_ten_crop_prediction_is_the_mean_of_ten_softmaxes(config):
  config.parallelism = 'jit'
  exp = experiment.build(config, 10, jax.devices()[:1])
  params, model = exp.init_state().params, exp.model
  images = np.random.default_rng(0).integers(0, 256, (3, 10, 63, 63, 3), dtype=np.uint8)
  mean, std = config.dataset.mean, config.dataset.std
  probs = np.stack([jax.nn.softmax(model.apply({'params': params},
                                               normalize(images[:, c], mean, std), train=False))
                    for c in range(10)]).mean(axis=0)
  labels = np.array([0, 4, 9])
  batch = {'image': images, 'label': labels, 'mask': np.array([1.0, 1.0, 0.0])}
  sums = exp.parallel.get(exp.eval_step(exp.parallel.put_state(params), batch))
  top1 = np.argmax(probs, -1) != labels
  top5 = ~np.any(np.argsort(-probs, -1)[:, :5] == labels[:, None], -1)
  assert sums['count'] == 2 and sums['top1_errors'] == top1[:2].sum()
  assert sums['top5_errors'] == top5[:2].sum()
  np.testing.assert_allclose(sums['loss'], -np.log(probs[[0, 1], labels[:2]]).sum(), rtol=1e-5)


def test_folder_set_trains_and_evaluates_from_the_cli(tmp_path):
  data, workdir = tmp_path / 'images', tmp_path / 'run'
  fake_data.write_image_folder(str(data))
  folder = ['--config=configs/default.py', '--config.dataset.name=folder',
            f'--config.dataset.path={data}']
  cli('main', *folder, f'--workdir={workdir}', *SMALL, '--config.train.batch_size=8',
      '--config.train.num_train_steps=2', '--config.dataset.train_crop=inception')
  logged = [l for l in map(json.loads, open(workdir / 'metrics.jsonl')) if 'val_loss' in l][-1]
  assert logged['step'] == 2 and os.listdir(workdir / 'checkpoints') == ['2']

  out = cli('evaluate', *folder, f'--workdir={workdir}', *SMALL, '--crops=1')
  assert 'step 2 validation (9 images, 1 crop): top-1 error' in out
  one = json.load(open(workdir / 'eval_1crop.json'))
  assert (one['step'], one['crops'], one['num_examples']) == (2, 1, 9)
  for key in ('val_top1_error', 'val_top5_error'):
    assert one[key] == logged[key]
  np.testing.assert_allclose(one['val_loss'], logged['val_loss'], rtol=1e-5)

  # The CLI's function, in this process (one start-up less).
  from alexnet_jax import evaluate
  config = tiny_config(None)
  config.dataset.name, config.dataset.path = 'folder', str(data)
  config.train.eval_batch_size = 20
  # The run trained without flips: ten crops are its five unmirrored ones, and say so.
  five = evaluate.evaluate_checkpoint(config, str(workdir), crops=10, step=2)
  assert json.load(open(workdir / 'eval_5crop.json')) == five
  assert not os.path.exists(workdir / 'eval_10crop.json')
  assert (five['crops'], five['crops_requested'], five['num_examples']) == (5, 10, 9)
  assert five['crop_names'] == ['top-left', 'top-right', 'bottom-left', 'bottom-right', 'center']
  assert 0.0 <= five['val_top1_error'] <= 1.0 and five['val_loss'] != one['val_loss']
  assert '(9 images, 5 crops, not mirrored: the run trained without flips)' in evaluate.summary(
      five)
  assert (one['crops_requested'], one['crop_names'], one['eval_resize']) == (1, ['center'], 'paper')
  # Mirrors follow the run's training, not a --config's flip.
  config.dataset.flip = True
  with pytest.raises(ValueError, match=r'^--config has dataset.flip=True but .* trained with '
                                       r'False; drop the override'):
    evaluate.evaluate_checkpoint(config, str(workdir), crops=10)
  config.dataset.flip = False

  # No config: the run's own config.json (where the folder is, the model it trained).
  assert evaluate.evaluate_checkpoint(None, str(workdir)) == one
  # A config that would score another model is refused, and the scores on disk stay.
  config.model.lrn = False
  with pytest.raises(ValueError, match=r"^--config changes what .* was trained as "
                                       r"\(model\.lrn: True -> False\); drop --config"):
    evaluate.evaluate_checkpoint(config, str(workdir))
  assert json.load(open(workdir / 'eval_1crop.json')) == one


def test_fake_imagenet_trains_from_the_cli(tmp_path):
  fake_data.write_fake_imagenet(str(tmp_path / 'manual'))
  cli('main', '--config=configs/imagenet.py', f'--workdir={tmp_path / "run"}', *SMALL,
      f'--config.dataset.manual_dir={tmp_path / "manual"}',
      f'--config.dataset.data_dir={tmp_path / "tfds"}', '--config.train.batch_size=2',
      '--config.train.num_train_steps=1')
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [1, 1] and np.isfinite(lines[0]['train_loss'])
  assert lines[1]['val_top1_error'] >= 0.5  # 4 images, 1000 classes, one step


def test_evaluate_without_checkpoints_is_a_clear_error(tmp_path, config):
  from alexnet_jax import evaluate
  with pytest.raises(ValueError, match='has no checkpoints; train there first'):
    evaluate.evaluate_checkpoint(config, str(tmp_path))
