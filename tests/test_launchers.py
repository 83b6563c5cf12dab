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


CONTROLLER = f'''
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
        [sys.executable, '-c', CONTROLLER, str(tmp_path / 'slurm'), str(tmp_path / 'later')],
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
