"""The launchers' interface on tiny commands: tasks submitted at any time, their states, the
files they leave, and (SLURM) a second launcher on the same directory re-attaching."""

import os
import time

from alexnet_jax import launchers

OK = ['python', '-c', 'import time; time.sleep(0.5); print("fine")']
BAD = ['python', '-c', 'import sys; sys.exit("error: this task is broken")']


def wait(launcher, names, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    statuses = launcher.poll()
    if all(statuses.get(n, launchers.Status('queued')).state not in launchers.LIVE
           for n in names):
      return statuses
    time.sleep(0.1)
  raise AssertionError(f'not ended within {timeout} s: {launcher.poll()}')


def test_local_runs_tasks_submitted_at_any_time(tmp_path):
  local = launchers.Local(parallel=1)
  first = launchers.Task('first', OK, str(tmp_path / 'first'))
  local.submit([first])
  assert local.poll()['first'].state in launchers.LIVE
  local.submit([launchers.Task('second', BAD, str(tmp_path / 'second'))])  # while one runs
  statuses = wait(local, ['first', 'second'])
  assert statuses['first'] == launchers.Status('done')
  assert statuses['second'] == launchers.Status(
      'failed', 'exit code 1: error: this task is broken')
  assert (tmp_path / 'first' / 'done').exists()
  assert (tmp_path / 'second' / 'error.txt').read_text() == statuses['second'].error + '\n'
  assert (tmp_path / 'first' / 'log.txt').read_text().endswith('fine\n')
  local.submit([first])  # again: the earlier verdict goes until it ends anew
  assert not (tmp_path / 'first' / 'done').exists()
  assert wait(local, ['first'])['first'].state == 'done'


def test_slurm_submits_polls_and_reattaches(slurm, tmp_path, monkeypatch):
  monkeypatch.setenv('SLURM_CONF', slurm.conf)
  directory = str(tmp_path / 'slurm')
  one = launchers.Slurm(directory, 2, launchers.SlurmResources(mem_gb=0.5, time_min=5))
  one.submit([launchers.Task('ok', OK, str(tmp_path / 'ok')),
              launchers.Task('bad', BAD, str(tmp_path / 'bad'))])
  again = launchers.Slurm(directory, 2, launchers.SlurmResources())  # a new controller
  assert set(again.poll()) == {'ok', 'bad'}
  statuses = wait(again, ['ok', 'bad'])
  assert statuses['ok'].state == 'done'
  assert (statuses['bad'].state, statuses['bad'].error) == (
      'failed', 'exit code 1: error: this task is broken')
  assert os.path.dirname(statuses['bad'].log) == directory
  assert 'error: this task is broken' in open(statuses['bad'].log).read()  # the job failed too
  one.submit([launchers.Task('later', OK, str(tmp_path / 'later'))])  # one more, at any time
  assert wait(again, ['later'])['later'].state == 'done'
