"""The launchers' interface on tiny commands: tasks submitted at any time, their states, the
files they leave, and (SLURM) a second launcher on the same directory re-attaching."""

import os
import signal
import subprocess
import sys
import time

import pytest

from alexnet_jax import launchers
from conftest import REPO

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


# A task that counts the stop signals it gets: it writes one line per signal and exits 0 after
# the first, as a run that saves at its next log step does.
COUNTING = ['python', '-c', '''
import signal, sys, time
got = []
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
  signal.signal(s, lambda signum, frame: got.append(signal.Signals(signum).name))
print('ready', flush=True)
deadline = time.time() + 60
while not got and time.time() < deadline:
  time.sleep(0.01)
time.sleep(0.5)  # a relayed copy would arrive now
print('got', *got, flush=True)
print('Stopped by', got[0], 'at step 4', flush=True)
''']
CONTROLLER = '''
import sys, time
from alexnet_jax import launchers
local = launchers.Local(2)
tasks = [launchers.Task(n, %r, %r + '/' + n) for n in ('a', 'b')]
with launchers.Relay(local) as signals:
  local.submit(tasks)
  while True:
    signals.pass_on()
    statuses = local.poll()
    if all(s.state not in launchers.LIVE for s in statuses.values()):
      break
    time.sleep(0.05)
print(sorted((n, s.state) for n, s in statuses.items()), flush=True)
'''


def ready(directory):
  log = os.path.join(directory, 'log.txt')
  return os.path.exists(log) and '\nready\n' in open(log).read()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_process_group_reaches_each_task_once(tmp_path, signum):
  """What Ctrl-C (SIGINT) or a closed terminal (SIGHUP) does: the signal goes to every process
  of the foreground group. Tasks run in their own sessions, so each gets it once, relayed."""
  controller = subprocess.Popen([sys.executable, '-c', CONTROLLER % (COUNTING, str(tmp_path))],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
  deadline = time.time() + 60
  while not all(ready(tmp_path / n) for n in 'ab') and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(controller.pid, signum)
  out, _ = controller.communicate(timeout=60)
  assert out.strip().splitlines()[-1] == "[('a', 'stopped'), ('b', 'stopped')]", out
  for name in 'ab':
    log = (tmp_path / name / 'log.txt').read_text()
    assert f'got {signal.Signals(signum).name}\n' in log, log  # once, not twice
    assert not (tmp_path / name / 'done').exists()
    assert not (tmp_path / name / 'launched.json').exists()


def test_verdicts(tmp_path):
  """Exit 0: done, unless the run says it was stopped; 75 (errors.Interrupted): interrupted,
  failed when the same line comes twice in a row; killed by a signal: interrupted; else
  failed."""
  def run(code):
    return launchers.run_task(launchers.Task('t', ['python', '-c', code], str(tmp_path)),
                              lambda: False)
  assert run('print("Stopped by SIGTERM at step 4")') == launchers.Status('stopped')
  full = 'import sys; sys.exit(75) if print("error: could not write checkpoint %d") else 0'
  first = run(full % 4 + '; sys.exit(75)')
  assert first == launchers.Status('interrupted', 'exit code 75: error: could not write '
                                   'checkpoint 4')
  assert (tmp_path / 'interrupted.txt').read_text() == first.error + '\n'
  assert run(full % 8 + '; sys.exit(75)').state == 'interrupted'  # progress: another line
  assert run(full % 8 + '; sys.exit(75)') == launchers.Status(
      'failed', 'exit code 75: error: could not write checkpoint 8 (the same interruption twice '
      'in a row)')
  assert (tmp_path / 'error.txt').exists() and not (tmp_path / 'interrupted.txt').exists()
  os.remove(tmp_path / 'error.txt')
  killed = run('import os, signal; os.kill(os.getpid(), signal.SIGKILL)')
  assert killed == launchers.Status('interrupted', 'killed by SIGKILL (exit code -9)')
  assert launchers.finished(str(tmp_path)) == killed
  assert run('print("fine")') == launchers.Status('done')
  assert launchers.finished(str(tmp_path)) == launchers.Status('done')


def test_a_task_that_cannot_start_ends_and_the_launcher_goes_on(tmp_path):
  (tmp_path / 'file').write_text('')  # its directory cannot be made: a file is in the way
  local = launchers.Local(parallel=1)
  local.submit([launchers.Task('bad', OK, str(tmp_path / 'file' / 'bad')),
                launchers.Task('good', OK, str(tmp_path / 'good'))])
  statuses = wait(local, ['bad', 'good'], timeout=60)
  assert statuses['bad'].state == 'interrupted'
  assert statuses['bad'].error.startswith('the launcher could not run it: NotADirectoryError')
  assert statuses['good'].state == 'done'


def test_a_new_controller_adopts_what_a_killed_one_left_running(tmp_path):
  """The first controller is killed (-9); its task goes on in its own session. A new launcher
  adopts it: running while it lives, sent this controller's signals, then what it left."""
  first = subprocess.Popen([sys.executable, '-c', CONTROLLER % (COUNTING, str(tmp_path))],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while not all(ready(tmp_path / n) for n in 'ab') and time.time() < deadline:
    time.sleep(0.05)
  first.kill()
  first.wait()
  tasks = [launchers.Task(n, COUNTING, str(tmp_path / n)) for n in 'ab']
  local = launchers.Local(parallel=1)
  assert local.adopt(tasks) == {'a', 'b'}
  assert local.poll() == {'a': launchers.Status('running'), 'b': launchers.Status('running')}
  local.stop(signal.SIGTERM)
  statuses = wait(local, ['a', 'b'], timeout=60)
  assert statuses == {'a': launchers.Status('stopped'), 'b': launchers.Status('stopped')}
  for name in 'ab':
    assert 'got SIGTERM\n' in (tmp_path / name / 'log.txt').read_text()
  assert launchers.Local(parallel=1).adopt(tasks) == set()  # ended: nothing to adopt
