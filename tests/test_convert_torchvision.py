"""torchvision weights in our model: conversion parity, the import/predict/fine-tune round trip."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import fake_data
from alexnet_jax import checkpoints, convert_torchvision, experiment, models, train, workdir
from alexnet_jax.preprocess import Preprocess, normalize
from conftest import REPO, tiny_config

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import torch_reference  # noqa: E402

CLASSES = ('apple', 'moth', 'zebra')  # fake_data.write_image_folder's, sorted


def torchvision_config():
  from configs import torchvision
  return torchvision.get_config()


def torch_logits(net, images):
  with torch.no_grad():
    return net.eval()(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A random torchvision-layout net with 3 classes, its state_dict file and its workdir."""
  torch.manual_seed(0)
  net = torch_reference.TorchvisionAlexNet(num_classes=3)
  root = tmp_path_factory.mktemp('converted')
  path = str(root / 'alexnet.pth')
  torch.save(net.state_dict(), path)
  fake_data.write_image_folder(str(root / 'images'))
  return net, path, str(root / 'images')


def test_converted_logits_match_torchvision(converted):
  net, path, _ = converted
  params = convert_torchvision.convert_state_dict(
      convert_torchvision.load_state_dict(path))
  images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  expected = torch_logits(net, images)
  # The plain layers, and configs/torchvision.py's (space-to-depth conv1, sliced pooling).
  for model in (models.AlexNet(num_classes=3, variant='torchvision', lrn=False, groups=1),
                experiment.build(torchvision_config(), 3).model):
    logits = np.asarray(model.apply({'params': params}, images, train=False))
    assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))
  # fc6's (C, H, W) -> (H, W, C) row permutation is what makes them agree.
  naive = dict(params, fc6=dict(params['fc6'], kernel=np.asarray(
      net.state_dict()['classifier.1.weight']).T))
  assert not np.allclose(model.apply({'params': naive}, images, train=False), expected,
                         rtol=1e-3, atol=1e-6)


def test_bad_state_dicts_are_one_line_errors_naming_the_key(converted, tmp_path):
  state = converted[0].state_dict()
  missing = {k: v for k, v in state.items() if k != 'features.3.bias'}
  with pytest.raises(ValueError, match=r"lacks 'features.3.bias' \(conv2's bias\)"):
    convert_torchvision.convert_state_dict(missing)
  with pytest.raises(ValueError, match=r"unexpected key 'features.1.weight'"):
    convert_torchvision.convert_state_dict({**state, 'features.1.weight': torch.zeros(3)})
  wrong = {**state, 'features.6.weight': torch.zeros(384, 192, 5, 5)}
  with pytest.raises(ValueError, match=r"'features.6.weight' has shape \(384, 192, 5, 5\), but "
                                       r"torchvision's AlexNet conv3 kernel is \(384, 192, 3, 3\)"):
    convert_torchvision.convert_state_dict(wrong)
  torch.save(converted[0], tmp_path / 'model.pth')  # the module, not its state_dict
  with pytest.raises(ValueError, match='cannot read .* as a state_dict'):
    convert_torchvision.load_state_dict(str(tmp_path / 'model.pth'))
  from safetensors.torch import save_file
  save_file(dict(state), str(tmp_path / 'w.safetensors'))
  np.testing.assert_array_equal(
      convert_torchvision.load_state_dict(str(tmp_path / 'w.safetensors'))['features.0.weight'],
      state['features.0.weight'].numpy())


def cli(module, *args):
  out = subprocess.run([sys.executable, '-m', f'alexnet_jax.{module}', *args], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope='module')
def imported(converted, tmp_path_factory):
  """The workdir `convert_torchvision` writes from the converted fixture's file."""
  root = tmp_path_factory.mktemp('imported')
  names = root / 'names.txt'
  names.write_text('\n'.join(CLASSES) + '\n')
  out = cli('convert_torchvision', converted[1], str(root / 'run'), f'--class_names={names}')
  assert f'3 classes, 57,016,131 parameters -> {root / "run"} (step 0)' in out
  return str(root / 'run')


def test_convert_predict_evaluate_and_finetune(converted, imported, tmp_path):
  from alexnet_jax import evaluate, input_pipeline
  net, _, images = converted
  assert workdir.read_class_names(imported) == list(CLASSES)

  # predict: the eval preprocessing of configs/torchvision.py, then torch's softmax.
  photos = [os.path.join(images, 'val', 'moth', '0.jpeg'), os.path.join(images, 'val', 'apple',
                                                                          '2.png')]
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not a jpeg')
  # One file that does not decode: every other image is still scored, then one line each.
  run = subprocess.run([sys.executable, '-m', 'alexnet_jax.predict', f'--checkpoint={imported}',
                        '--top_k=3', photos[0], str(broken), photos[1]], cwd=REPO,
                       capture_output=True, text=True)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f'error: cannot decode image {broken}; pass JPEG, PNG, GIF, BMP or WebP files.')
  assert 'Traceback' not in run.stderr
  out = run.stdout.splitlines()
  pre = Preprocess.from_config(torchvision_config().dataset)
  for i, photo in enumerate(photos):
    image = input_pipeline.eval_image(open(photo, 'rb').read(), pre).numpy()
    image = normalize(image[None], pre.mean, pre.std)
    probs = torch.softmax(torch.from_numpy(torch_logits(net, image)[0]), -1).numpy()
    assert out[4 * i] == photo
    for line, c in zip(out[4 * i + 1:4 * i + 4], np.argsort(-probs)):
      assert line.split() == [f'{probs[c]:.4f}', CLASSES[c]]

  # evaluate: the same top-1 error as torch on the same preprocessed validation images.
  config = torchvision_config()
  config.model.num_classes = -1
  config.dataset.name, config.dataset.path = 'folder', images
  config.dataset.data_dir = str(tmp_path / 'tfds')
  result = evaluate.evaluate_checkpoint(config, imported)
  split = input_pipeline.load_split(input_pipeline.get_builder(config.dataset), 'validation',
                                    cache=False)
  wrong = count = 0
  for batch in input_pipeline.eval_batches(split, pre, 16):
    real = batch['mask'] > 0
    normalised = normalize(batch['image'][real], pre.mean, pre.std)
    wrong += np.sum(torch_logits(net, normalised).argmax(-1) != batch['label'][real])
    count += real.sum()
  assert (result['step'], result['num_examples']) == (0, 9)
  assert result['val_top1_error'] == wrong / count

  # fine-tune (configs/finetune_folder.py) from the import: convs frozen, fc8 new, fc6/fc7 train.
  from configs import finetune_folder
  config = finetune_folder.get_config()
  config.init.checkpoint, config.dataset.path = imported, images
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.image_size = 63
  config.train.batch_size, config.train.num_train_steps = 8, 2
  tuned = str(tmp_path / 'tuned')
  train.train_and_evaluate(config, tuned)
  _, source = checkpoints.restore_params(imported)
  step, params = checkpoints.restore_params(tuned)
  assert step == 2 and workdir.read_class_names(tuned) == list(CLASSES)
  for layer in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5'):
    for name in ('kernel', 'bias'):
      np.testing.assert_array_equal(params[layer][name], source[layer][name])
  for layer in ('fc6', 'fc7'):
    assert not np.array_equal(params[layer]['kernel'], source[layer]['kernel'])
  assert params['fc8']['kernel'].shape == (4096, 3)


def test_init_from_checkpoint_replaces_only_the_reinit_layers(converted, imported):
  source = convert_torchvision.convert_state_dict(converted[0].state_dict())
  config = torchvision_config()
  model = experiment.build(config, 5).model  # five classes: fc8 must be replaced
  fresh = jax.tree.map(lambda p: np.full(p.shape, 7.0, p.dtype), models.abstract_params(model, 63))
  config.init.checkpoint = imported
  with pytest.raises(ValueError, match=r'fc8.bias is \(3,\) there but \(5,\) here; add that layer '
                                       r'to init.reinit'):
    train.init_from_checkpoint(config.init, fresh)
  config.init.reinit = ('fc8',)
  params, step = train.init_from_checkpoint(config.init, fresh)
  assert step == 0
  for layer in models.layer_names('torchvision'):
    for name in ('kernel', 'bias'):
      want = fresh if layer == 'fc8' else source
      np.testing.assert_array_equal(params[layer][name], want[layer][name])


def test_fine_tune_config_errors_are_checked_before_anything_runs(tmp_path):
  from configs import finetune_folder
  config = finetune_folder.get_config()
  config.optimizer.frozen_layers = ('conv6',)
  with pytest.raises(ValueError, match=r"optimizer.frozen_layers names \['conv6'\], not layers"):
    train.check_config(config)
  config = tiny_config(None)
  config.model.variant = 'torchvision'
  with pytest.raises(ValueError, match="has no LRN and no towers"):
    train.check_config(config)
