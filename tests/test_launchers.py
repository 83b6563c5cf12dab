"""The launchers' interface on tiny commands: tasks submitted at any time, their states, the
files they leave, and (SLURM) a second launcher on the same directory re-attaching, squeue's
pending reasons, jobs that can never start, tries while slurmctld is down, and the signals sent
to a controller's process group not reaching its SLURM commands."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from alexnet_jax import launchers
from alexnet_jax.errors import ConfigError
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


def queued(launcher, names, timeout=30):
  """The launcher's statuses once SLURM has said why each of `names` waits."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    statuses = launcher.poll()
    if all(n in statuses and statuses[n].reason for n in names):
      return statuses
    time.sleep(0.1)
  raise AssertionError(f'no pending reason within {timeout} s: {launcher.poll()}')


def test_slurm_cancels_jobs_that_can_never_start(slurm, tmp_path, monkeypatch):
  """More CPUs than the node has: sbatch takes the array, squeue says PartitionConfig; the
  launcher cancels its jobs and names the flag. A reason that waiting clears is only shown."""
  monkeypatch.setenv('SLURM_CONF', slurm.conf)
  later = launchers.Slurm(str(tmp_path / 'later'), 1, launchers.SlurmResources(
      mem_gb=0.5, time_min=5, options=('--begin=now+3600',)))
  later.submit([launchers.Task('later', OK, str(tmp_path / 'later'))])
  big = launchers.Slurm(str(tmp_path / 'big'), 2, launchers.SlurmResources(
      cpus=16, mem_gb=0.5, time_min=5))
  big.submit([launchers.Task(name, OK, str(tmp_path / name)) for name in ('a', 'b', 'c')])
  with pytest.raises(ConfigError) as error:
    queued(big, ['a', 'b', 'c'])
  assert str(error.value) == (
      "the trials' jobs cannot start: --slurm_cpus=16 but the nodes of partition debug have at "
      "most 8 CPUs (squeue: PartitionConfig); pass --slurm_cpus=8 or less. Their pending jobs "
      "were cancelled.")
  assert {s.state for s in big.poll().values()} == {'stopped'}  # gone: a rerun submits them
  [job] = later.poll().values()
  assert (job.state, job.reason) == ('queued', 'BeginTime')  # and it stays
  slurm.run('scancel', os.path.basename(job.log).split('_')[0])


def test_slurm_retries_while_slurmctld_is_down(slurm, tmp_path, monkeypatch):
  """squeue failing (slurmctld stopped): with no tries left, ClusterError (squeue, sbatch
  alike); a stopping controller gets what is known at once; else one line a try, and the
  statuses once slurmctld is back."""
  monkeypatch.setenv('SLURM_CONF', slurm.conf)
  directory, said = str(tmp_path / 'slurm'), []
  launcher = launchers.Slurm(directory, 1, launchers.SlurmResources(
      mem_gb=0.5, time_min=5, options=('--begin=now+3600',), retry_minutes=1), say=said.append)
  launcher.submit([launchers.Task('later', OK, str(tmp_path / 'later'))])
  statuses = queued(launcher, ['later'])
  assert statuses['later'].reason == 'BeginTime'
  stopping = launchers.Slurm(directory, 1, launchers.SlurmResources())
  assert stopping.poll() == statuses
  once = launchers.Slurm(directory, 1, launchers.SlurmResources(retry_minutes=0))
  monkeypatch.setenv('SLURM_CONF', slurm.quick_conf)  # a command gives up in 1 s, not 9
  slurm.stop_controller()
  try:
    down = 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)'
    with pytest.raises(launchers.ClusterError) as error:
      once.poll()
    assert str(error.value) == (
        f'squeue failed (--slurm_retry_minutes=0): {down}. The jobs already submitted go on; '
        f'the same command re-attaches to them (and submits the rest) once SLURM answers.')
    with pytest.raises(launchers.ClusterError, match='^sbatch failed .* Unable to contact'):
      once.submit([launchers.Task('other', OK, str(tmp_path / 'other'))])
    threading.Timer(0.5, setattr, (stopping, 'stopping', True)).start()  # the relay's part
    assert stopping.poll() == statuses  # what it knew, at once
    restart = threading.Timer(2, slurm.start_controller)
    restart.start()
    assert launcher.poll() == statuses
    restart.join()
    assert said and said[0] == (f'SLURM: squeue failed ({down}); trying again in 1 s, for at '
                                f'most --slurm_retry_minutes=1.')
  finally:
    if len(slurm.pids) < 3:
      slurm.start_controller()
  slurm.run('scancel', os.path.basename(statuses['later'].log).split('_')[0])


SLURM_CONTROLLER = f'''
import signal, sys
from alexnet_jax import launchers
launcher = launchers.Slurm(sys.argv[1], 1, launchers.SlurmResources(
    mem_gb=0.5, time_min=5, options=('--begin=now+3600',)))
signal.signal(signal.SIGTERM, lambda *_: setattr(launcher, 'stopping', True))  # the relay's part
print('submitting', flush=True)
launcher.submit([launchers.Task('later', {OK!r}, sys.argv[2])])
print(launcher.poll()['later'].state)
'''


def test_slurm_commands_do_not_get_the_controllers_signals(slurm, tmp_path):
  """SIGTERM to the controller's process group (`timeout`, a closing terminal) while its sbatch
  waits on slurmctld: sbatch, in a session of its own, goes on; the job array is recorded."""
  slurmctld = slurm.pids[1]
  os.kill(slurmctld, signal.SIGSTOP)  # sbatch waits for its answer
  try:
    controller = subprocess.Popen(
        [sys.executable, '-c', SLURM_CONTROLLER, str(tmp_path / 'slurm'), str(tmp_path / 'later')],
        env=slurm.env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert controller.stdout.readline() == 'submitting\n'
    time.sleep(1.5)  # sbatch has started by then (its own Python and submitit import first)
    os.killpg(controller.pid, signal.SIGTERM)
    time.sleep(0.2)
  finally:
    os.kill(slurmctld, signal.SIGCONT)
  out, _ = controller.communicate(timeout=60)
  assert (controller.returncode, out) == (0, 'queued\n')
  [_, submitted] = [json.loads(line) for line in open(tmp_path / 'slurm' / 'jobs.jsonl')]
  [job] = submitted['jobs']
  assert slurm.run('squeue', '-h', '-j', job, '-o', '%r') == 'BeginTime\n'
  slurm.run('scancel', job)
