"""Every config loads, shows its command, and overrides only fields the paper base defines."""

from __future__ import annotations

import importlib
import os

import ml_collections
import pytest

from conftest import REPO
from configs import imagenet

NAMES = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, 'configs'))
               if name.endswith('.py') and name != '__init__.py')
# Fields no `--config.X=VALUE` override could set if they lost their str type.
STR_PLACEHOLDERS = ('dataset.data_dir', 'dataset.manual_dir', 'dataset.path', 'dataset.pca_stats',
                    'init.checkpoint')


def _fields(config: ml_collections.ConfigDict, prefix: str = '') -> set[str]:
  names = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      names |= _fields(value, f'{prefix}{key}.')
    else:
      names.add(prefix + key)
  return names


def test_every_config_is_found():
  assert {'benchmark', 'default', 'finetune_folder', 'folder', 'imagenet',
          'torchvision'} <= set(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_config_loads_and_shows_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert 'python -m alexnet_jax.' in module.__doc__
  assert f'--config=configs/{name}.py' in module.__doc__


@pytest.mark.parametrize('name', NAMES)
def test_config_only_overrides_base_fields(name):
  """A misspelt override would add a field silently; only the benchmark adds its own section."""
  config = importlib.import_module(f'configs.{name}').get_config()
  added = _fields(config) - _fields(imagenet.get_config())
  assert {field for field in added if not field.startswith('benchmark.')} == set()
  for field in STR_PLACEHOLDERS:
    parent, key = field.split('.')
    assert config[parent].get_ref(key).get_type() is str, field


def test_paper_base_carries_the_papers_numbers():
  """docs/paper.md "Training (§5)" and §4.1."""
  c = imagenet.get_config()
  assert c.train.batch_size == 128
  assert c.optimizer.momentum == 0.9
  assert c.optimizer.weight_decay == 5e-4
  assert c.optimizer.learning_rate == 0.01
  assert c.optimizer.plateau.factor == 0.1
  assert c.model.init == 'paper'
  assert c.model.init_std == 0.01
  assert c.model.bias_init == 1.0
  assert c.dataset.image_size == 224
  assert c.train.num_epochs == 90
  assert c.dataset.flip and c.dataset.lighting and c.dataset.lighting_std == 0.1
  assert (c.model.lrn, c.model.overlapping_pool, c.model.groups, c.model.dropout_rate) == (
      True, True, 2, 0.5)
  assert c.model.lrn_scope == 'tower'  # §3.3: each tower normalises its own channels
