import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from alexnet_jax import trials
from configs import default
from conftest import REPO

TINY = ['--config.dataset.image_size=63', '--config.model.width=0.25', '--config.train.batch_size=16',
        '--config.train.log_every_steps=1']
SWEEP_FILE = '''
from alexnet_jax.trials import product


def get_sweep():
  return product({'optimizer.learning_rate': [0.01, 0.02]}) + [
      {'model.lrn': False}, {'optimizer.momentum': 'fast'}]  # the last is broken: not a float
'''
GOOD = ['optimizer.learning_rate=0.01', 'optimizer.learning_rate=0.02', 'model.lrn=False']
BROKEN = 'optimizer.momentum=fast'


def test_product_and_zip():
  assert trials.product({'a': [1, 2], 'b': [3, 4]}) == [
      {'a': 1, 'b': 3}, {'a': 1, 'b': 4}, {'a': 2, 'b': 3}, {'a': 2, 'b': 4}]
  assert trials.zip({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  assert trials.product(trials.zip({'a': [1, 2], 'b': [3, 4]}), {'c': [5, 6]}) == [
      {'a': 1, 'b': 3, 'c': 5}, {'a': 1, 'b': 3, 'c': 6},
      {'a': 2, 'b': 4, 'c': 5}, {'a': 2, 'b': 4, 'c': 6}]
  with pytest.raises(ValueError, match='equal length'):
    trials.zip({'a': [1, 2], 'b': [3]})


def test_expand_names_seeds_and_checks():
  expanded = trials.expand([{}, {'model.lrn': False}], seeds=2, first_seed=5)
  assert [t.name for t in expanded] == ['seed=5', 'seed=6', 'model.lrn=False,seed=5',
                                        'model.lrn=False,seed=6']
  assert [t.group for t in expanded] == ['base', 'base', 'model.lrn=False', 'model.lrn=False']
  assert [t.name for t in trials.expand([{}, {'dataset.data_dir': '/a b'}])] == [
      'base', 'dataset.data_dir=_a_b']
  with pytest.raises(ValueError, match='more than once: model.lrn=False'):
    trials.expand([{'model.lrn': False}, {'model.lrn': False}])
  with pytest.raises(ValueError, match='sets seed itself'):
    trials.expand([{'seed': 1}], seeds=3)
  with pytest.raises(ValueError, match="no field 'model.lrm'"):
    trials.check_keys(default.get_config(), trials.expand([{'model.lrm': False}]))


def test_error_line_and_spread():
  log = ('I0000 port.cc] floating-point round-off errors\n  File "x.py", line 3\n'
         'ValueError: dataset.image_size=8 is too small\n\r 50%|###  | 1/2\n')
  assert trials.error_line(log, 1) == 'exit code 1: ValueError: dataset.image_size=8 is too small'
  assert trials.error_line('FATAL Flags parsing error: bad\nPass --helpshort', 1) == (
      'exit code 1: FATAL Flags parsing error: bad')
  assert trials.error_line('Killed\n', -9) == 'exit code -9: Killed'
  assert trials.error_line('error: model.dtype=1 is not supported\n', 1) == (
      'exit code 1: error: model.dtype=1 is not supported')
  mean, std = trials.mean_std([0.1, 0.2, 0.6])
  assert mean == pytest.approx(0.3) and std == pytest.approx(0.26457513)  # sample std, ddof 1
  assert trials.mean_std([0.4]) == (0.4, 0.0)


def sweep_cli(tmp_path, data_dir, *args):
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  return subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.sweep', '--config=configs/default.py',
       f'--sweep={sweep_file}', f'--workdir={tmp_path / "sweep"}',
       f'--config.dataset.data_dir={data_dir}', *TINY, *args],
      cwd=REPO, capture_output=True, text=True)


def eval_steps(trial_dir):
  with open(trial_dir / 'metrics.jsonl') as f:
    return [l['step'] for l in map(json.loads, f) if 'val_top1_error' in l]


def test_dry_run_lists_the_commands(tmp_path, digits_dir):
  out = sweep_cli(tmp_path, digits_dir, '--seeds=2', '--dry_run')
  assert out.returncode == 0, out.stderr[-3000:]
  workdir = tmp_path / 'sweep'
  base = (f'python -m alexnet_jax.main --config=configs/default.py --workdir={workdir}/{{name}} '
          f'--config.dataset.data_dir={digits_dir} ' + ' '.join(TINY))
  expected = []
  for name, overrides in [
      (GOOD[0], '--config.optimizer.learning_rate=0.01'),
      (GOOD[1], '--config.optimizer.learning_rate=0.02'),
      (GOOD[2], '--config.model.lrn=False'),
      (BROKEN, '--config.optimizer.momentum=fast')]:
    for seed in (0, 1):
      expected.append(f'{base.format(name=f"{name},seed={seed}")} {overrides} --config.seed={seed}')
  assert out.stdout.strip().splitlines() == expected
  assert not workdir.exists()


def test_sweep_runs_reports_failures_and_resumes(tmp_path, digits_dir):
  out = sweep_cli(tmp_path, digits_dir, '--parallel=2', '--config.train.num_train_steps=2')
  assert out.returncode == 1, out.stderr[-3000:]  # a trial failed; the others finished
  workdir = tmp_path / 'sweep'
  with open(workdir / 'results.csv') as f:
    rows = {r['trial']: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(GOOD + [BROKEN])
  for name in GOOD:
    assert rows[name]['status'] == 'done', rows[name]
    assert 0 <= float(rows[name]['best_val_top1_error']) <= 1
    assert eval_steps(workdir / name) == [2]
    assert os.listdir(workdir / name / 'tensorboard' / 'hparams')  # TensorBoard hparams session
  assert rows[BROKEN]['status'] == 'failed'
  assert rows[BROKEN]['error'].startswith('exit code 1: ')
  assert rows[BROKEN]['error'].endswith("--config.optimizer.momentum=fast: could not convert "
                                        "string to float: 'fast'")
  assert f'{BROKEN}: FAILED' in out.stdout

  table = (workdir / 'results.md').read_text().splitlines()
  table_rows = [l.split(' | ')[0].lstrip('| ') for l in table if l.startswith(('| optimizer',
                                                                                '| model'))]
  best = sorted(GOOD, key=lambda n: float(rows[n]['best_val_top1_error']))
  assert table_rows == best + [BROKEN]  # sorted by best val top-1; the failed trial last
  assert "could not convert string to float: 'fast'" in table[-1]
  assert (workdir / 'sweep.png').stat().st_size > 0

  # Run again after killing one trial (no `done` file) and losing another entirely: the killed
  # trial resumes from its checkpoint, the lost one starts over, the finished one is skipped.
  # (A finished trial whose run length changes resumes: test_finished_trial_reopens_...)
  killed, lost, finished = workdir / GOOD[0], workdir / GOOD[1], workdir / GOOD[2]
  os.remove(killed / 'done')
  shutil.rmtree(lost)
  finished_log = (finished / 'log.txt').read_text()
  again = sweep_cli(tmp_path, digits_dir, '--parallel=2', '--config.train.num_train_steps=2')
  assert again.returncode == 1, again.stderr[-3000:]
  assert '1 of 4 trials already finished; running 3' in again.stdout
  assert 'Resuming from step 2' in (killed / 'log.txt').read_text()
  assert (finished / 'log.txt').read_text() == finished_log  # not run again
  assert eval_steps(killed) == eval_steps(finished) == eval_steps(lost) == [2]
  with open(workdir / 'results.csv') as f:
    statuses = {r['trial']: r['status'] for r in csv.DictReader(f)}
  assert statuses == {**{n: 'done' for n in GOOD}, BROKEN: 'failed'}

  # The same sweep with another momentum: every finished trial answered another question.
  report = (workdir / 'results.md').read_text()
  stale = sweep_cli(tmp_path, digits_dir, '--config.train.num_train_steps=2',
                    '--config.optimizer.momentum=0.5')
  assert stale.returncode == 1
  assert stale.stderr.strip().splitlines() == [
      f'error: 3 trials in {workdir} ran with another config than this sweep gives them: '
      f'{GOOD[0]} (optimizer.momentum: 0.9 -> 0.5) and 2 more; use a fresh --workdir, or move '
      f'those trial directories away to run them anew.']
  assert (workdir / 'results.md').read_text() == report  # nothing run, nothing rewritten
  assert all((workdir / name / 'done').exists() for name in GOOD)


def test_finished_trial_reopens_when_its_run_length_changes(tmp_path):
  """A resumable field (run length, logging) changed: a finished trial loses its `done` mark and
  resumes; any other field changed: the sweep refuses (the CLI's refusal: the test above)."""
  from alexnet_jax import workdir
  trial = trials.expand([{'model.lrn': False}])[0]
  config_path = os.path.join(REPO, 'configs', 'default.py')
  run_dir = tmp_path / trial.name
  workdir.write_config(str(run_dir),
                       trials.trial_config(trial, config_path, {'train.num_train_steps': 2}))
  (run_dir / 'done').write_text('')
  same = trials.check_stored_configs([trial], config_path, str(tmp_path),
                                     {'train.num_train_steps': 2})
  assert same == [] and (run_dir / 'done').exists()
  longer = trials.check_stored_configs([trial], config_path, str(tmp_path),
                                       {'train.num_train_steps': 3})
  assert longer == [trial] and not (run_dir / 'done').exists()
  with pytest.raises(ValueError, match=r'optimizer.momentum: 0.9 -> 0.5'):
    trials.check_stored_configs([trial], config_path, str(tmp_path),
                                {'train.num_train_steps': 3, 'optimizer.momentum': 0.5})
