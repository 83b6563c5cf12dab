"""Shared fixtures: a prepared copy of the digits data set and a tiny, fast config."""

import os
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One JAX compilation cache for the whole session, the workers' and every subprocess run's: tests
# that train the same tiny config compile it once (compiling is half of a short run's CPU time).
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='alexnet_jax_test_jit_')

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every subprocess a test starts imports the repository and tests/ modules, and its TensorFlow
# prints at import what it prints on AVX-512 VNNI/AMX CPUs (tests/chatty_tensorflow), whatever
# CPU runs the suite: a command that lets that chatter through fails its test everywhere.
os.environ['PYTHONPATH'] = os.pathsep.join(
    [os.path.join(REPO, 'tests', 'chatty_tensorflow'), REPO, os.path.join(REPO, 'tests')] +
    [p for p in [os.environ.get('PYTHONPATH')] if p])


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the digits set and its 73x73 JPEG squares for image_size 63
  (`dataset.prepared=True`), built once per test session."""
  from alexnet_jax import input_pipeline
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = tiny_config(data_dir)
  input_pipeline.get_builder(config.dataset)
  config.dataset.prepared = True
  input_pipeline.get_builder(config.dataset)
  return data_dir


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def tiny_config(data_dir: str):
  """configs/default.py at the smallest input side, a quarter of the channels (a 9 MB checkpoint,
  not 142 MB) and small batches."""
  from configs import default
  config = default.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.image_size = 63  # the smallest side that keeps a 1x1 map after pool5
  config.model.width = 0.25
  config.train.batch_size = 16
  config.train.eval_batch_size = 64
  config.train.log_every_steps = 2
  return config


@pytest.fixture
def config(digits_dir):
  return tiny_config(digits_dir)


def pytest_collection_modifyitems(items):
  """Tests sharing a module-scoped fixture (a reference run, a converted net) run on one worker
  (pytest.ini: --dist loadgroup), so it is built once; every other test goes to whichever
  worker is free."""
  for item in items:
    fixtures = item._fixtureinfo.name2fixturedefs.values()
    if any(defs[-1].scope == 'module' for defs in fixtures):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
