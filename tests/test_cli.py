"""Every `python -m alexnet_jax.X` answers a user's mistake in one line (alexnet_jax/cli.py):
an unknown field or flag, a missing file, a wrong positional argument. The mistakes are found
before any long computation, so each case takes about as long as its module's imports."""

import subprocess
import sys

import pytest

from conftest import REPO

W = '--workdir={tmp}/run'
CASES = {  # id: (module, arguments, what the error line says); {tmp} is the test's tmp_path
    'main-field': ('main', ['--config=configs/default.py', W, '--config.train.nope=1'],
                   "'nope' is not a config field"),
    'main-config': ('main', ['--config=missing.py', W], '--config=missing.py is not a file'),
    'main-extra': ('main', ['--config=configs/default.py', W, 'extra'],
                   'unexpected argument extra; usage: python -m alexnet_jax.main'),
    'main-required': ('main', ['--config=configs/default.py'], '--workdir is required; usage:'),
    'main-tuple': ('main', ['--config=configs/default.py', W,
                            '--config.optimizer.frozen_layers=conv1,conv2'],
                   """write the tuple as --config.optimizer.frozen_layers="('conv1','conv2')"."""),
    'evaluate-field': ('evaluate', ['--config=configs/default.py', '--config.nope=1', W],
                       "'nope' is not a config field"),
    # No --config: evaluate reads the run's own.
    'evaluate-workdir': ('evaluate', ['--workdir={tmp}/missing'], '{tmp}/missing does not exist'),
    'evaluate-extra': ('evaluate', [W, 'extra'], 'unexpected argument extra; usage:'),
    'predict-flag': ('predict', ['--nope=1', '--checkpoint={tmp}', 'a.jpg'],
                     "Unknown command line flag 'nope'; usage: python -m alexnet_jax.predict"),
    'predict-checkpoint': ('predict', ['--checkpoint={tmp}/missing', 'a.jpg'],
                           '{tmp}/missing does not exist'),
    'predict-no-image': ('predict', ['--checkpoint={tmp}'],
                         'no arguments given, at least 1 needed; usage:'),
    'pca_stats-field': ('pca_stats', ['--config=configs/default.py', '--config.nope=1',
                                      '--output={tmp}/s.json'], "'nope' is not a config field"),
    'pca_stats-config': ('pca_stats', ['--config=missing.py', '--output={tmp}/s.json'],
                         '--config=missing.py is not a file'),
    'pca_stats-output': ('pca_stats', ['--config=configs/default.py', '--output={tmp}/no/s.json'],
                         'there is no directory {tmp}/no'),
    'pca_stats-extra': ('pca_stats', ['--config=configs/default.py', '--output={tmp}/s.json', 'x'],
                        'unexpected argument x; usage:'),
    # The default --config file: ml_collections applies the override while defining the flag.
    'convert_torchvision-field': ('convert_torchvision', ['{tmp}/w.pth', '{tmp}/out',
                                                          '--config.nope=1'],
                                  "'nope' is not a config field"),
    'convert_torchvision-weights': ('convert_torchvision', ['{tmp}/w.pth', '{tmp}/out'],
                                    '{tmp}/w.pth does not exist; pass a torchvision AlexNet'),
    'convert_torchvision-missing': ('convert_torchvision', ['{tmp}/w.pth'],
                                    '1 argument given, 2 needed; usage:'),
    'sweep-field': ('sweep', ['--config=configs/default.py', '--config.nope=1', W,
                              '--sweep=configs/sweeps/learning_rate.py'],
                    "'nope' is not a config field"),
    'sweep-sweep': ('sweep', ['--config=configs/default.py', W, '--sweep=missing.py'],
                    '--sweep=missing.py is not a file'),
    'sweep-broken': ('sweep', ['--config=configs/default.py', W, '--sweep={tmp}/broken.py'],
                     '--sweep={tmp}/broken.py cannot be loaded (SyntaxError: line 1: '),
    'sweep-extra': ('sweep', ['--config=configs/default.py', W, '--sweep=missing.py', 'x'],
                    'unexpected argument x; usage:'),
    'plot-flag': ('plot', ['--nope=1', '{tmp}'], "Unknown command line flag 'nope'; usage:"),
    'plot-run': ('plot', ['{tmp}/missing'], '{tmp}/missing/metrics.jsonl does not exist'),
    'plot-none': ('plot', [], 'give the run directories to plot; usage:'),
    'benchmark-field': ('benchmark', ['--config=configs/benchmark.py', '--config.nope=1'],
                        "'nope' is not a config field"),
    'benchmark-config': ('benchmark', ['--config=missing.py'], '--config=missing.py is not a file'),
    'benchmark-extra': ('benchmark', ['--config=configs/benchmark.py', 'x'],
                        'unexpected argument x; usage:'),
    'prepare-field': ('prepare', ['--config=configs/default.py', '--config.nope=1'],
                      "'nope' is not a config field"),
    'prepare-config': ('prepare', ['--config=missing.py'], '--config=missing.py is not a file'),
    'prepare-extra': ('prepare', ['--config=configs/default.py', 'x'],
                      'unexpected argument x; usage:'),
    'models-flag': ('models', ['--nope=1'], "Unknown command line flag 'nope'; usage:"),
    'models-classes': ('models', ['--num_classes=0'],
                       'flag --num_classes=0: 0 is not a positive integer'),
    'models-groups': ('models', ['--variant=torchvision', '--groups=2'],
                      '--groups=2 applies to --variant=paper only'),
    'models-extra': ('models', ['x'], 'unexpected argument x; usage:'),
}


def run(module, *args):
  return subprocess.run([sys.executable, '-m', f'alexnet_jax.{module}', *args], cwd=REPO,
                        capture_output=True, text=True)


@pytest.mark.parametrize('case', CASES)
def test_a_mistake_is_one_error_line(case, tmp_path):
  module, args, message = CASES[case]
  (tmp_path / 'broken.py').write_text('def get_sweep(:\n')
  out = run(module, *[arg.format(tmp=tmp_path) for arg in args])
  assert out.returncode == 1, out.stderr[-2000:]
  last = (out.stderr.strip().splitlines() or [''])[-1]
  assert last.startswith('error: ') and message.format(tmp=tmp_path) in last, out.stderr[-2000:]
  assert 'Traceback' not in out.stdout + out.stderr
  assert '\n' not in out.stderr.strip(), out.stderr[-2000:]  # no help dump, no chatter


def test_every_cli_is_covered():
  modules = {'main', 'evaluate', 'predict', 'pca_stats', 'convert_torchvision', 'sweep', 'plot',
             'benchmark', 'prepare', 'models'}
  assert {module for module, _, _ in CASES.values()} == modules


def test_preparing_a_folder_shows_no_tensorflow_or_tfds_chatter(tmp_path):
  import fake_data
  fake_data.write_image_folder(str(tmp_path / 'images'))
  out = run('prepare', '--config=configs/folder.py', f'--config.dataset.path={tmp_path}/images',
            f'--config.dataset.data_dir={tmp_path}/tfds', '--config.dataset.image_size=63')
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines()[-1].startswith('Ready: ')
  said = out.stdout + out.stderr
  for chatter in ('Downloading and preparing dataset', 'downloaded and prepared to',
                  'cpu_feature_guard', 'oneDNN', 'Using custom data configuration',
                  'has no dataset_info.json'):
    assert chatter not in said, said[-3000:]
