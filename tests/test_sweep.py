import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from alexnet_jax import launchers, trials
from configs import default
from conftest import REPO
from test_resume import metrics

TINY = ['--config.dataset.image_size=63', '--config.model.width=0.25', '--config.train.batch_size=16',
        '--config.train.log_every_steps=4']
STEPS = 24  # each trial's run: long enough to be stopped between two log steps
SWEEP_FILE = '''
from alexnet_jax.trials import product


def get_sweep():
  return product({'optimizer.learning_rate': [0.01, 0.02]}) + [
      {'model.lrn': False}, {'dataset.image_size': 8}]  # the last fails when it runs: too small
'''
GOOD = ['optimizer.learning_rate=0.01', 'optimizer.learning_rate=0.02', 'model.lrn=False']
BROKEN = 'dataset.image_size=8'
TOO_SMALL = 'error: dataset.image_size=8 is too small for this model; use at least 63.'


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
  assert launchers.error_line(log, 1) == 'exit code 1: ValueError: dataset.image_size=8 is too small'
  assert launchers.error_line('FATAL Flags parsing error: bad\nPass --helpshort', 1) == (
      'exit code 1: FATAL Flags parsing error: bad')
  assert launchers.error_line('Killed\n', -9) == 'exit code -9: Killed'
  assert launchers.error_line('error: model.dtype=1 is not supported\n', 1) == (
      'exit code 1: error: model.dtype=1 is not supported')
  mean, std = trials.mean_std([0.1, 0.2, 0.6])
  assert mean == pytest.approx(0.3) and std == pytest.approx(0.26457513)  # sample std, ddof 1
  assert trials.mean_std([0.4]) == (0.4, 0.0)


def sweep_command(tmp_path, data_dir, *args, sweep_text=SWEEP_FILE):
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(sweep_text)
  return [sys.executable, '-m', 'alexnet_jax.sweep', '--config=configs/default.py',
          f'--sweep={sweep_file}', f'--workdir={tmp_path / "sweep"}',
          f'--config.dataset.data_dir={data_dir}', *TINY, *args]


def sweep_cli(tmp_path, data_dir, *args, env=os.environ, sweep_text=SWEEP_FILE):
  return subprocess.run(sweep_command(tmp_path, data_dir, *args, sweep_text=sweep_text), cwd=REPO,
                        capture_output=True, text=True, env=dict(env))


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
      (BROKEN, '--config.dataset.image_size=8')]:
    for seed in (0, 1):
      expected.append(f'{base.format(name=f"{name},seed={seed}")} {overrides} --config.seed={seed}')
  assert out.stdout.strip().splitlines() == expected
  assert not workdir.exists()
  # A value its field cannot take: one line before anything runs or is printed, not a failure
  # of each such trial later.
  bad = sweep_cli(tmp_path, digits_dir, '--dry_run', sweep_text=SWEEP_FILE.replace(
      "{'dataset.image_size': 8}", "{'train.batch_size': 64}, {'train.batch_size': 'big'}"))
  assert (bad.returncode, bad.stdout) == (1, '')
  assert bad.stderr.strip().splitlines() == [
      'error: trial train.batch_size=big: --config.train.batch_size=big is not a value '
      'train.batch_size takes (int); fix the sweep file.']
  config = default.get_config()
  values = [('trial a', 'optimizer.learning_rate', 1), ('trial b', 'model.lrn', False),
            ('trial c', 'optimizer.learning_rate', 1)]  # an int is a float field's value
  trials.check_values(config, values, os.path.join(REPO, 'configs', 'default.py'))
  with pytest.raises(ValueError, match=r'^trial d: --config.train.batch_size=0.5 is not a value '
                     r'train.batch_size takes \(int\); fix the sweep file.$'):
    trials.check_values(config, values + [('trial d', 'train.batch_size', 0.5)],
                        os.path.join(REPO, 'configs', 'default.py'))


@pytest.fixture(scope='module')
def local_sweep(tmp_path_factory, digits_dir):
  """The tiny sweep run locally, 2 trials at a time: (its output, its directory, its
  results.csv as first written)."""
  tmp_path = tmp_path_factory.mktemp('local_sweep')
  out = sweep_cli(tmp_path, digits_dir, '--parallel=2', f'--config.train.num_train_steps={STEPS}')
  return out, tmp_path, (tmp_path / 'sweep' / 'results.csv').read_text()


def test_sweep_runs_reports_failures_and_resumes(local_sweep, digits_dir):
  out, tmp_path, _ = local_sweep
  assert out.returncode == 1, out.stderr[-3000:]  # a trial failed; the others finished
  workdir = tmp_path / 'sweep'
  with open(workdir / 'results.csv') as f:
    rows = {r['trial']: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(GOOD + [BROKEN])
  for name in GOOD:
    assert rows[name]['status'] == 'done', rows[name]
    assert 0 <= float(rows[name]['best_val_top1_error']) <= 1
    assert eval_steps(workdir / name) == [STEPS]
    assert os.listdir(workdir / name / 'tensorboard' / 'hparams')  # TensorBoard hparams session
  assert rows[BROKEN]['status'] == 'failed'
  assert rows[BROKEN]['error'] == f'exit code 1: {TOO_SMALL}'
  assert f'{BROKEN}: FAILED' in out.stdout

  table = (workdir / 'results.md').read_text().splitlines()
  table_rows = [l.split(' | ')[0].lstrip('| ') for l in table
                if l.startswith(('| optimizer', '| model', '| dataset'))]
  best = sorted(GOOD, key=lambda n: float(rows[n]['best_val_top1_error']))
  assert table_rows == best + [BROKEN]  # sorted by best val top-1; the failed trial last
  assert TOO_SMALL in table[-1]
  assert (workdir / 'sweep.png').stat().st_size > 0

  # Run again after killing one trial (no `done` file) and losing another entirely: the killed
  # trial resumes from its checkpoint, the lost one starts over, the finished one is skipped.
  # (A finished trial whose run length changes resumes: test_finished_trial_reopens_...)
  killed, lost, finished = workdir / GOOD[0], workdir / GOOD[1], workdir / GOOD[2]
  os.remove(killed / 'done')
  shutil.rmtree(lost)
  finished_log = (finished / 'log.txt').read_text()
  again = sweep_cli(tmp_path, digits_dir, '--parallel=2', f'--config.train.num_train_steps={STEPS}')
  assert again.returncode == 1, again.stderr[-3000:]
  assert ('1 of 4 trials already finished, 1 failed (--retry_failed runs them again); running 2'
          in again.stdout)  # a failed trial's config fails again: it runs only when asked
  assert f'Resuming from step {STEPS}' in (killed / 'log.txt').read_text()
  assert (finished / 'log.txt').read_text() == finished_log  # not run again
  assert eval_steps(killed) == eval_steps(finished) == eval_steps(lost) == [STEPS]
  with open(workdir / 'results.csv') as f:
    statuses = {r['trial']: r['status'] for r in csv.DictReader(f)}
  assert statuses == {**{n: 'done' for n in GOOD}, BROKEN: 'failed'}
  broken_log = (workdir / BROKEN / 'log.txt').read_text()
  assert broken_log.count('$ python -m alexnet_jax.main') == 1
  retried = sweep_cli(tmp_path, digits_dir, '--retry_failed',
                      f'--config.train.num_train_steps={STEPS}')
  assert retried.returncode == 1, retried.stderr[-3000:]
  assert '3 of 4 trials already finished; running 1' in retried.stdout
  assert (workdir / BROKEN / 'log.txt').read_text().count('$ python -m alexnet_jax.main') == 2

  # The same sweep with another momentum: every finished trial answered another question.
  report = (workdir / 'results.md').read_text()
  stale = sweep_cli(tmp_path, digits_dir, f'--config.train.num_train_steps={STEPS}',
                    '--config.optimizer.momentum=0.5')
  assert stale.returncode == 1
  assert stale.stderr.strip().splitlines() == [
      f'error: 3 trials in {workdir} ran with another config than this sweep gives them: '
      f'{GOOD[0]} (optimizer.momentum: 0.9 -> 0.5) and 2 more; use a fresh --workdir, or move '
      f'those trial directories away to run them anew.']
  assert (workdir / 'results.md').read_text() == report  # nothing run, nothing rewritten
  assert all((workdir / name / 'done').exists() for name in GOOD)


def stops(trial_dir):
  """The 'Stopped by SIG... at step N' lines of the trial's log: (signal, N)."""
  return re.findall(r'^Stopped by (SIG[A-Z]+) at step (\d+)', (trial_dir / 'log.txt').read_text(),
                    re.M)


def test_ctrl_c_and_hangup_to_the_process_group_stop_each_trial_once(tmp_path, digits_dir,
                                                                      local_sweep):
  """SIGINT to the sweep's whole process group (Ctrl-C in a terminal), then on the next run
  SIGHUP to it (the terminal closed): each running trial stops once, at a log step, with a
  checkpoint there; no queued trial starts; the third run finishes every trial, and their
  metrics equal the uninterrupted sweep's."""
  workdir = tmp_path / 'sweep'
  args = ('--parallel=2', f'--config.train.num_train_steps={STEPS}')
  for signum, logged in ((signal.SIGINT, 1), (signal.SIGHUP, 2)):
    before = {n: len(metrics_lines(workdir / n)) for n in GOOD[:2]}
    controller = subprocess.Popen(sweep_command(tmp_path, digits_dir, *args), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)  # its own group, as a shell's job
    deadline = time.time() + 300
    while time.time() < deadline and not any(  # a trial logged a step in this run: it trains
        len(metrics_lines(workdir / n)) > before[n] for n in GOOD[:2]):
      time.sleep(0.05)
    os.killpg(controller.pid, signum)
    out, _ = controller.communicate(timeout=120)
    assert controller.returncode == 1, out[-3000:]
    assert 'Stopped by a signal; run the same command to resume the unfinished trials.' in out
    name = signal.Signals(signum).name
    stopped = {n: stops(workdir / n) for n in GOOD if (workdir / n).exists()}
    assert any(stopped.values()), out[-3000:]
    for n, lines in stopped.items():
      this_run = [int(step) for sig, step in lines if sig == name]
      assert len(this_run) <= 1 and len(lines) <= logged, (n, lines)  # once per signal
      for step in this_run:
        assert step % 4 == 0 and step in checkpoint_steps(workdir / n), (n, step)
    assert not (workdir / GOOD[2]).exists() and not (workdir / BROKEN).exists()
  out = sweep_cli(tmp_path, digits_dir, *args)
  assert out.returncode == 1, out.stderr[-3000:]  # the broken trial failed; the rest finished
  assert '3 finished, 1 failed, 0 interrupted, 0 unfinished;' in out.stdout
  reference = local_sweep[1] / 'sweep'
  for n in GOOD:
    assert metrics(workdir / n) == metrics(reference / n), n


def metrics_lines(trial_dir):
  try:
    return (trial_dir / 'metrics.jsonl').read_text().splitlines()
  except FileNotFoundError:
    return []


def checkpoint_steps(trial_dir):
  return [int(d) for d in os.listdir(trial_dir / 'checkpoints') if d.isdigit()]


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


def slurm_records(workdir):
  """The launcher's records, merged per submission: {job name: {'tasks': [...], 'jobs': [...]}}."""
  merged = {}
  for line in (workdir / 'slurm' / 'jobs.jsonl').read_text().splitlines():
    entry = json.loads(line)
    merged.setdefault(entry['name'], {}).update(entry)
  return merged


def test_slurm_sweep_matches_local_and_reattaches_without_duplicates(slurm, local_sweep,
                                                                      digits_dir, tmp_path):
  """The local sweep's trials as one job array on the cluster, 2 at a time. The controller is
  killed mid-sweep and one running trial's job requeued; the same command re-attaches, submits
  nothing, and writes the local sweep's results.csv. SLURM's own records show one job per trial."""
  args = ('--launcher=slurm', '--parallel=2', f'--config.train.num_train_steps={STEPS}',
          '--slurm_cpus=1', '--slurm_mem_gb=0.5', '--slurm_time=30')
  env = slurm.env
  workdir = tmp_path / 'sweep'
  controller = subprocess.Popen(sweep_command(tmp_path, digits_dir, *args), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  started = []
  while not started and time.time() < deadline:
    started = [name for name in GOOD if (workdir / name / 'metrics.jsonl').exists() and
               (workdir / name / 'metrics.jsonl').stat().st_size]  # in its loop: step 1 logged
    time.sleep(0.05)
  controller.kill()  # Ctrl-C, logout, a lost connection: the jobs go on
  controller.wait()
  [submission] = slurm_records(workdir).values()
  job = submission['jobs'][[t['name'] for t in submission['tasks']].index(started[0])]
  slurm.run('scontrol', 'requeue', job)  # a preemption: SIGTERM, then the job queues again
  while 'BeginTime' not in slurm.run('squeue', '-h', '-j', job, '-o', '%r') and (
      time.time() < deadline):
    time.sleep(0.1)
  slurm.run('scontrol', 'update', f'jobid={job}', 'StartTime=now')  # not after SLURM's 2 min

  out = sweep_cli(tmp_path, digits_dir, *args, env=slurm.env)
  assert out.returncode == 1, out.stderr[-3000:]  # the broken trial failed, the rest finished
  assert (workdir / 'results.csv').read_text() == local_sweep[2]
  assert re.search(r'Resuming from step \d+', (workdir / started[0] / 'log.txt').read_text())
  said = next(l for l in out.stdout.splitlines() if 'trials already finished' in l)
  # Only the broken trial may run again: if it failed while no controller watched (a failed
  # trial runs again, as with --launcher=local).
  assert said.endswith(('running 0, 2 at a time, in {workdir}; re-attached to {n} still queued '
                        'or running').format(workdir=workdir, n=4 - int(said[0])) if
                       'running 0' in said else
                       (f'running 1, 2 at a time, in {workdir}; re-attached to '
                        f'{3 - int(said[0])} still queued or running')), said

  # SLURM's own records: one job per trial, the requeued one restarted, jobs of one trial
  # never queued or running at the same time.
  names = slurm_records(workdir)  # this sweep's job names (other tests share the cluster)
  jobs = {(f'{j["ArrayJobId"]}_{j["ArrayTaskId"]}' if 'ArrayTaskId' in j else j['JobId']): j
          for j in slurm.jobs() if j['JobName'] in names}
  submissions = list(names.values())
  trial_jobs = {}
  for submission in submissions:
    for t, job_id in zip(submission['tasks'], submission['jobs']):
      trial_jobs.setdefault(t['name'], []).append(jobs[job_id])
  assert len(jobs) == sum(map(len, trial_jobs.values()))
  assert {name: len(js) for name, js in trial_jobs.items() if name != BROKEN} == {
      name: 1 for name in GOOD}
  for js in trial_jobs.values():
    for earlier, later in zip(js, js[1:]):
      assert earlier['EndTime'] <= later['SubmitTime'], (earlier, later)
  assert len(trial_jobs[BROKEN]) == len(submissions) <= 2
  assert jobs[job]['Restarts'] == '1' and jobs[job]['JobState'] == 'COMPLETED'
  assert jobs[job]['ArrayTaskThrottle'] == '2'  # --parallel
  notes = (workdir / 'results.md').read_text().splitlines()[-1]
  log = notes.split('(SLURM log: ')[1].split(')')[0]
  assert f'{BROKEN} failed: exit code 1: {TOO_SMALL}' in notes
  assert os.path.dirname(log) == str(workdir / 'slurm') and os.path.exists(log)


@pytest.mark.parametrize('args,message', [
    (['--slurm_partition=nope'], "sbatch refused the trials' job array (sbatch: error: "
     'invalid partition specified: nope); fix --slurm_partition or the other --slurm_* flags.'),
    (['--slurm_mem_gb=100'], "sbatch refused the trials' job array (sbatch: error: "),
])
def test_slurm_refusals_are_one_line(slurm, tmp_path, digits_dir, args, message):
  out = sweep_cli(tmp_path, digits_dir, '--launcher=slurm', *args, env=slurm.env)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(f'error: {message}'), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


def test_slurm_launcher_without_slurm_is_one_line(tmp_path, digits_dir):
  out = sweep_cli(tmp_path, digits_dir, '--launcher=slurm',
                  env={**os.environ, 'PATH': os.path.dirname(sys.executable)})
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      'error: --launcher=slurm needs SLURM (sbatch, squeue, srun not found on PATH); run the '
      'sweep on a SLURM login node, or use --launcher=local.']
  assert not (tmp_path / 'sweep').exists()


def test_one_controller_per_sweep_directory(tmp_path):
  """A second controller on a directory whose sweep runs: the one line naming the holder
  (exit 75 from the CLI: errors.Interrupted), before anything is read or started."""
  from alexnet_jax import workdir
  from alexnet_jax.errors import Interrupted
  trial = trials.expand([{'model.lrn': False}])[0]
  with workdir.Lock(str(tmp_path)) as held:
    held.acquire()
    with pytest.raises(Interrupted, match=rf'^workdir {tmp_path} is in use by pid {os.getpid()}'):
      trials.run_sweep([trial], os.path.join(REPO, 'configs', 'default.py'), str(tmp_path),
                       log=lambda line: None)
  assert os.listdir(tmp_path) == ['lock']
