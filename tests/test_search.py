"""Searches: spaces, seeded draws, ASHA's rungs and promotions, and a search that survives its
controller being killed, whose promoted trial ends bit-identical to an uninterrupted run."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from alexnet_jax import asha, search
from alexnet_jax.search import choice, integer, log_uniform, uniform
from conftest import REPO, tiny_config
from test_resume import assert_same_tree, checkpoint, metrics
from test_sweep import slurm_records

CONFIG = os.path.join(REPO, 'configs', 'default.py')
# 22 steps an epoch (batch 64 of the 1,437 training digits) at the tests' size.
TINY = ['--config.dataset.image_size=63', '--config.model.width=0.25',
        '--config.train.batch_size=64', '--config.train.log_every_steps=2']
LR_WD = {'optimizer.learning_rate': log_uniform(1e-3, 1e-1),
         'optimizer.weight_decay': log_uniform(1e-5, 1e-2), 'model.lrn': False}


def test_rungs():
  assert asha.rungs(1, 3, 9) == [1, 3, 9]
  assert asha.rungs(1, 3, 10) == [1, 3, 9, 10]
  assert asha.rungs(2, 3, 9) == [2, 6, 9]
  assert asha.rungs(1, 2, 2) == [1, 2]
  assert asha.rungs(4, 3, 4) == [4]
  with pytest.raises(ValueError, match='--reduction_factor=1'):
    asha.rungs(1, 1, 9)
  with pytest.raises(ValueError, match='--min_epochs=10'):
    asha.rungs(10, 3, 9)


def test_promotion_takes_the_best_third_of_the_highest_rung_once():
  paused = lambda error, target=1: asha.Progress(target, {1: error}, True)
  rungs = [1, 3, 9]
  assert asha.promotion({0: paused(0.5), 1: paused(0.3)}, rungs, 3) is None  # 2 // 3 = 0
  trials = {0: paused(0.5), 1: paused(0.3), 2: paused(0.4)}
  assert asha.promotion(trials, rungs, 3) == (1, 3)
  trials[1] = asha.Progress(3, {1: 0.3}, False)  # promoted, training towards epoch 3
  assert asha.promotion(trials, rungs, 3) is None  # the best third of 3 is trial 1, once
  trials.update({3: paused(0.1), 4: paused(0.9), 5: paused(0.8)})
  assert asha.promotion(trials, rungs, 3) == (3, 3)  # 6 results: the best 2 go on
  running = {n: asha.Progress(1, {1: e}, n != 2) for n, e in enumerate([0.5, 0.6, 0.1])}
  assert asha.promotion(running, rungs, 3) is None  # trial 2 is still saving at its rung
  # A higher rung goes first; a failed trial's result counts, but it never goes on.
  top = {n: asha.Progress(3, {1: 0.1 * n, 3: 0.1 * n}, True) for n in range(3)}
  top.update({n: paused(0.5 + 0.01 * n) for n in range(3, 9)})
  assert asha.promotion(top, rungs, 3) == (0, 9)
  top[0] = asha.Progress(3, {1: 0.0, 3: 0.0}, False)  # failed in its second stretch
  assert asha.promotion(top, rungs, 3) is None


def space_search(tmp_path, kind='random', seed=0, storage=None, trials=4, parallel=1):
  space = search.make_space(LR_WD, kind, 'space.py')
  settings = search.Settings(kind, trials, seed, 'asha', 1, 3, parallel)
  return search.Search(space, settings, [1, 3, 9], CONFIG, str(tmp_path), {}, storage)


def draws(s, n):
  return [s.ask(s.records()).overrides for _ in range(n)]


def test_the_same_seed_draws_the_same_configs_across_restarts(tmp_path):
  import optuna
  journal = lambda: optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(tmp_path / search.JOURNAL)))
  four = draws(space_search(tmp_path), 4)
  assert len({t['optimizer.learning_rate'] for t in four}) == 4
  for t in four:
    assert 1e-3 <= t['optimizer.learning_rate'] <= 1e-1 and 1e-5 <= t['optimizer.weight_decay'] <= 1e-2
    assert t['model.lrn'] is False  # a fixed value
  # Two draws, the controller "restarts" (a new Search on the journal file), two more.
  assert draws(space_search(tmp_path, storage=journal()), 2) == four[:2]
  assert draws(space_search(tmp_path, storage=journal()), 2) == four[2:]
  assert draws(space_search(tmp_path, seed=1), 4) != four
  assert draws(space_search(tmp_path, 'tpe'), 2) == draws(space_search(tmp_path, 'tpe'), 2)
  with pytest.raises(ValueError, match=r'other settings \(search_seed: 0\)'):
    space_search(tmp_path, seed=1, storage=journal())


def test_tpe_sees_paused_and_finished_trials(tmp_path):
  """TPE's view of the search: a trial at the last epoch finished, a paused one pruned there."""
  tpe = space_search(tmp_path, 'tpe')
  draws(tpe, 3)
  for name, errors in (('trial_000', [0.5]), ('trial_001', [0.4, 0.3, 0.2]), ('trial_002', [])):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.jsonl').write_text(''.join(
        json.dumps({'step': 10 * e, 'epoch': float(e), 'val_top1_error': x, 'val_top5_error': x})
        + '\n' for e, x in zip([1, 3, 9], errors)) + '{"step": 1')  # a line being written
  records = tpe.records()
  assert [r.reached for r in records] == [1, 9, 0]
  view = [tpe._as_finished(r) for r in records[:2]]
  assert [(t.state.name, t.value, t.intermediate_values) for t in view] == [
      ('PRUNED', None, {1: 0.5}), ('COMPLETE', 0.2, {1: 0.4, 3: 0.3, 9: 0.2})]
  assert set(tpe.draw(records)) == {'optimizer.learning_rate', 'optimizer.weight_decay'}
  # The next poll reads what changed since: a line finished, a log rewound by a resumed run.
  from alexnet_jax import workdir
  with open(tmp_path / 'trial_002' / 'metrics.jsonl', 'a') as f:
    f.write('0, "epoch": 1.0, "val_top1_error": 0.6, "val_top5_error": 0.3}\n')
  first = (tmp_path / 'trial_001' / 'metrics.jsonl').read_text().splitlines(keepends=True)[0]
  workdir.write_atomic(str(tmp_path / 'trial_001' / 'metrics.jsonl'), first)
  assert [(r.errors, r.top5, r.step) for r in tpe.records()] == [
      ({1: 0.5}, {1: 0.5}, 10), ({1: 0.4}, {1: 0.4}, 10), ({1: 0.6}, {1: 0.3}, 10)]


def test_pause_at_epoch_is_checked_and_may_change_on_resume(tmp_path):
  from alexnet_jax import train, workdir
  config = tiny_config(str(tmp_path))
  config.train.pause_at_epoch = -1
  with pytest.raises(ValueError, match='train.pause_at_epoch=-1 must be 0'):
    train.check_config(config)
  assert 'train.pause_at_epoch' in workdir.RESUMABLE


def test_spaces():
  grid = search.make_space({'a': choice(1, 2), 'b': 'x', 'c': choice(True, False)}, 'grid', 'f')
  assert grid.points == [{'a': 1, 'b': 'x', 'c': True}, {'a': 1, 'b': 'x', 'c': False},
                         {'a': 2, 'b': 'x', 'c': True}, {'a': 2, 'b': 'x', 'c': False}]
  assert grid.overrides({search.GRID_POINT: 2}) == {'a': 2, 'b': 'x', 'c': True}
  drawn = search.make_space({'a': uniform(0, 1), 'b': integer(1, 8, log=True)}, 'tpe', 'f')
  assert drawn.overrides({'a': 0.5, 'b': 4}) == {'a': 0.5, 'b': 4}
  with pytest.raises(ValueError, match='--search=grid needs choice'):
    search.make_space({'a': log_uniform(1, 2)}, 'grid', 'f')
  with pytest.raises(ValueError, match=r'gives a a list; write choice\(...\)'):
    search.make_space({'a': [1, 2]}, 'random', 'f')
  with pytest.raises(ValueError, match='a list holding log_uniform'):
    search.make_space([{'a': log_uniform(1, 2)}], 'random', 'f')


def sweep_cli(tmp_path, data_dir, sweep_text, *args, env=None, start_new_session=False):
  sweep_file = tmp_path / 'search_sweep.py'
  sweep_file.write_text(sweep_text)
  return subprocess.Popen(
      [sys.executable, '-m', 'alexnet_jax.sweep', '--config=configs/default.py',
       f'--sweep={sweep_file}', f'--workdir={tmp_path / "search"}',
       f'--config.dataset.data_dir={data_dir}', *TINY, *args],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
      start_new_session=start_new_session)


SPACE_FILE = '''
from alexnet_jax.search import log_uniform


def get_sweep():
  return {'optimizer.learning_rate': log_uniform(1e-3, 1e-1), %r: log_uniform(1e-5, 1e-2)}
'''


def test_dry_run_prints_the_first_wave_and_a_bad_key_is_one_line(tmp_path, digits_dir):
  dry = sweep_cli(tmp_path, digits_dir, SPACE_FILE % 'optimizer.weight_decay', '--search=random',
                  '--trials=9', '--search_seed=4', '--parallel=2', '--early_stop=asha',
                  '--dry_run')
  out, err = dry.communicate(timeout=120)
  assert dry.returncode == 0, err[-3000:]
  settings = search.Settings('random', 9, 4, 'asha', 1, 3, 2)
  space = search.make_space({'optimizer.learning_rate': log_uniform(1e-3, 1e-1),
                             'optimizer.weight_decay': log_uniform(1e-5, 1e-2)}, 'random', '')
  base = {'dataset.data_dir': digits_dir, 'dataset.image_size': 63, 'model.width': 0.25,
          'train.batch_size': 64, 'train.log_every_steps': 2}
  wave = search.Search(space, settings, asha.rungs(1, 3, 30), 'configs/default.py',
                       str(tmp_path / 'search'), base).first_wave()
  assert out.strip().splitlines() == [' '.join(args) for args in wave]
  assert len(wave) == 2 and all(a[-1] == '--config.train.pause_at_epoch=1' for a in wave)
  assert not (tmp_path / 'search').exists()

  # The checks of every run, dry or not (the CLI prints the error as one line, as for a grid
  # sweep: test_sweep.test_dry_run_lists_the_commands).
  path = tmp_path / 'bad_sweep.py'

  def refusal(sweep_text):
    path.write_text(sweep_text)
    with pytest.raises(ValueError) as refused:
      search.open_search(tiny_config(digits_dir), CONFIG, {}, str(path), str(tmp_path / 'search'),
                         settings)
    return str(refused.value)

  assert refusal(SPACE_FILE % 'optimizer.wd') == (
      f"the search space of {path} names 'optimizer.wd', which the config does not have; fix the "
      f"sweep file (fields are dotted paths such as model.lrn).")
  assert refusal(SPACE_FILE % 'train.batch_size') == (  # an int field, a float range
      f'the search space of {path}, key train.batch_size: --config.train.batch_size=1e-05 is not '
      f'a value train.batch_size takes (int); fix the sweep file.')
  assert refusal(  # an int is a float field's value (fixed, or drawn), 'big' not an int field's
      "from alexnet_jax.search import choice, integer\n"
      "def get_sweep():\n"
      "  return {'optimizer.momentum': 1, 'optimizer.learning_rate': integer(1, 2),\n"
      "          'train.batch_size': choice(64, 'big')}\n") == (
      f'the search space of {path}, key train.batch_size: --config.train.batch_size=big is not a '
      f'value train.batch_size takes (int); fix the sweep file.')


# Two trials and a broken one, by grid: ASHA with η = 2 over 2 epochs pauses both good trials at
# epoch 1 and promotes the better one to epoch 2.
GRID_FILE = '''
def get_sweep():
  return [{'optimizer.learning_rate': 0.05}, {'optimizer.learning_rate': 0.02},
          {'dataset.image_size': 8}]  # fails when it runs: too small
'''
TWO_FILE = '''
def get_sweep():
  return [{'optimizer.learning_rate': 0.05}, {'optimizer.learning_rate': 0.02}]
'''


def launches(trial_dir):
  """The log of each start of the trial's process."""
  return (trial_dir / 'log.txt').read_text().split('$ python -m alexnet_jax.main')[1:]


def test_asha_survives_a_killed_controller_and_a_promoted_trial_equals_an_unpaused_run(
    tmp_path, digits_dir):
  args = ['--search=grid', '--early_stop=asha', '--reduction_factor=2', '--parallel=2',
          '--config.train.num_epochs=2']
  first = sweep_cli(tmp_path, digits_dir, GRID_FILE, *args)
  workdir = tmp_path / 'search'
  deadline = time.time() + 300
  while time.time() < deadline and first.poll() is None and not metrics_lines(
      workdir / 'trial_000'):
    time.sleep(0.1)
  first.send_signal(signal.SIGKILL)  # the controller only: its trials go on, orphaned
  first.communicate()
  # The next controller adopts the orphans; Ctrl-C in its terminal (SIGINT to its whole process
  # group) reaches them through it, once: each stops at a log step with a checkpoint.
  log = workdir / 'search_log.txt'
  earlier = len(log.read_text()) if log.exists() else 0
  second = sweep_cli(tmp_path, digits_dir, GRID_FILE, *args, start_new_session=True)
  while time.time() < deadline and second.poll() is None and not re.search(
      r'waiting for it|starts|resumes|promoted', log.read_text()[earlier:]):
    time.sleep(0.05)  # adopting an orphan, or (it ended meanwhile) starting a trial
  os.killpg(second.pid, signal.SIGINT)
  out, err = second.communicate(timeout=300)
  assert second.returncode == 1, err[-3000:]
  assert 'ended without releasing it; continuing its search' in out
  assert 'Stopped by a signal; run the same command to continue the search.' in out
  again = sweep_cli(tmp_path, digits_dir, GRID_FILE, *args)
  out, err = again.communicate(timeout=600)
  assert again.returncode == 1, err[-3000:]  # a trial failed; the search went on

  with open(workdir / 'results.csv') as f:
    rows = {r['trial']: r for r in csv.DictReader(f)}
  assert sorted(rows) == ['trial_000', 'trial_001', 'trial_002']  # drawn once each
  assert rows['trial_002']['status'] == 'failed'
  assert rows['trial_002']['error'] == ('exit code 1: error: dataset.image_size=8 is too small '
                                        'for this model; use at least 63.')
  good = ['trial_000', 'trial_001']
  assert sorted(rows[n]['status'] for n in good) == ['done', 'paused']
  best, other = sorted(good, key=lambda n: rows[n]['status'])
  assert (rows[best]['epochs'], rows[other]['epochs']) == ('2', '1')
  at_epoch_1 = lambda n: ([l['val_top1_error'] for l in metrics(workdir / n)
                           if l.get('epoch') == 1 and 'val_top1_error' in l], n)
  assert at_epoch_1(best) < at_epoch_1(other)  # the better one at the rung went on
  for name in good:
    starts = launches(workdir / name)
    assert sum('Resuming from step' not in s for s in starts) == 1, name  # started once
    for start in starts:  # each stop: once, at a log step, saved there
      stopped = re.findall(r'^Stopped by SIGINT at step (\d+)', start, re.M)
      assert len(stopped) <= 1 and all(int(n) % 2 == 0 for n in stopped), (name, start)
    steps = [l['step'] for l in metrics(workdir / name) if 'train_loss' in l]
    assert steps == sorted(set(steps)), name  # no step trained twice
  assert 'Paused at epoch 1' in launches(workdir / best)[0]
  assert 'Resuming from step 22 (epoch 1.00)' in launches(workdir / best)[1]
  report = (workdir / 'results.md').read_text()
  assert 'Epochs trained: 3 of the 6 that training all 3 trials to epoch 2 takes (50%)' in report
  assert (workdir / 'search.png').stat().st_size > 0

  # The promoted trial, paused at epoch 1 and resumed, against its command run straight through.
  command = report.split('```bash\n')[1].split('\n')[0].split()
  assert command[4] == f'--workdir={workdir / best}' and 'pause_at_epoch' not in ' '.join(command)
  command[4] = f'--workdir={tmp_path / "straight"}'
  straight = subprocess.run([sys.executable] + command[1:], cwd=REPO, capture_output=True,
                            text=True)
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert metrics(workdir / best) == metrics(tmp_path / 'straight')
  step, params = checkpoint(workdir / best)
  assert step == checkpoint(tmp_path / 'straight')[0] == 44
  assert_same_tree(params, checkpoint(tmp_path / 'straight')[1])


def metrics_lines(trial_dir):
  try:
    return (trial_dir / 'metrics.jsonl').read_text().splitlines()
  except FileNotFoundError:
    return []


def test_slurm_search_is_a_job_per_start_and_promotion_and_reattaches(slurm, tmp_path, digits_dir):
  """Two trials on the cluster: the controller is killed once both first
  jobs are submitted; the same command re-attaches to them (submits neither again), promotes the
  better one as a third job and finishes. SLURM's records: one job per start or promotion, a
  trial's jobs one after the other."""
  args = ['--search=grid', '--early_stop=asha', '--reduction_factor=2', '--parallel=2',
          '--config.train.num_epochs=2', '--launcher=slurm', '--slurm_cpus=1',
          '--slurm_mem_gb=0.5', '--slurm_time=30']
  workdir = tmp_path / 'search'
  first = sweep_cli(tmp_path, digits_dir, TWO_FILE, *args, env=slurm.env)
  deadline = time.time() + 300
  records = workdir / 'slurm' / 'jobs.jsonl'
  while time.time() < deadline and first.poll() is None and (
      not records.exists() or records.read_text().count('"jobs"') < 2):
    time.sleep(0.1)
  first.kill()
  first.communicate()
  again = sweep_cli(tmp_path, digits_dir, TWO_FILE, *args, env=slurm.env)
  out, err = again.communicate(timeout=600)
  assert again.returncode == 0, err[-3000:]
  assert 'trial_000 starts' not in out and 'trial_001 starts' not in out, out  # re-attached
  assert out.count('promoted to epoch 2') == 1, out

  submissions = list(slurm_records(workdir).values())
  names = [[t['name'] for t in s['tasks']] for s in submissions]
  assert sorted(names) == [['trial_000'], ['trial_000'], ['trial_001']] or sorted(names) == [
      ['trial_000'], ['trial_001'], ['trial_001']], names
  jobs = {(f'{j["ArrayJobId"]}_{j["ArrayTaskId"]}' if 'ArrayTaskId' in j else j['JobId']): j
          for j in slurm.jobs()}
  by_trial = {}
  for s in submissions:
    by_trial.setdefault(s['tasks'][0]['name'], []).append(jobs[s['jobs'][0]])
  for js in by_trial.values():
    assert all(j['JobState'] == 'COMPLETED' for j in js)
    for earlier, later in zip(js, js[1:]):
      assert earlier['EndTime'] <= later['SubmitTime'], (earlier, later)
  promoted = next(n for n, js in by_trial.items() if len(js) == 2)
  for name in by_trial:
    starts = launches(workdir / name)
    assert len(starts) == len(by_trial[name]), name
    assert sum('Resuming from step' not in s for s in starts) == 1, name  # started once
  assert 'Resuming from step 22 (epoch 1.00)' in launches(workdir / promoted)[1]
  with open(workdir / 'results.csv') as f:
    assert {r['trial']: (r['status'], r['epochs']) for r in csv.DictReader(f)} == {
        n: ('done', '2') if n == promoted else ('paused', '1') for n in by_trial}



def test_a_torn_journal_record_is_dropped_and_damage_elsewhere_is_one_line(tmp_path):
  """kill -9 or a full disk mid-append leaves the last record cut short: it is dropped with one
  line, and the search goes on drawing what it drew before (the lost record is written again).
  Damage anywhere else is a one-line error naming the line."""
  said = []
  four = draws(space_search(tmp_path, storage=search.journal(str(tmp_path), said.append)), 4)
  path = tmp_path / search.JOURNAL
  data = path.read_bytes()
  path.write_bytes(data[:-20])  # the last record (the fourth trial's) cut short
  again = space_search(tmp_path, storage=search.journal(str(tmp_path), said.append))
  [line] = said
  assert line.startswith(f'warning: the last record of {path} was cut short (a kill or a full '
                         f'disk while it was written) and is dropped: ')
  assert path.read_bytes().endswith(b'\n') and len(path.read_bytes()) < len(data) - 20
  assert [r.trial.overrides for r in again.records()][:3] == four[:3]
  assert draws(again, 5 - len(again.records())) == four[len(again.records()):] + draws(
      space_search(tmp_path / 'fresh'), 5)[4:]
  lines = path.read_bytes().split(b'\n')
  lines[2] = lines[2][:10]
  path.write_bytes(b'\n'.join(lines))
  with pytest.raises(ValueError, match=rf'^{path} line 3 is damaged \(.*; restore the file from '
                     r'a copy, or use a fresh --workdir\.$'):
    search.journal(str(tmp_path), said.append)


def test_a_failed_trial_can_be_retried_and_is_no_longer_failed(tmp_path):
  """A failure is an attribute of the trial, not Optuna's FAIL (final): --retry_failed undoes
  it, and the trial counts as live again (it resumes)."""
  s = space_search(tmp_path)
  draws(s, 2)
  first = s.records()[0]
  (tmp_path / first.trial.name).mkdir()
  (tmp_path / first.trial.name / 'error.txt').write_text('exit code 1: error: broken\n')
  s.fail(first, 'exit code 1: error: broken')
  failed = s.records()[0]
  assert failed.failed and not failed.live and s.records()[1].live
  assert search._result(s, failed).status == 'failed'
  s.retry(failed)
  again = s.records()[0]
  assert not again.failed and again.live
  assert not (tmp_path / first.trial.name / 'error.txt').exists()
  assert search._result(s, again).status == 'unfinished'
