"""Stops every process agrees on, with two local processes (`--coordinator_address`), a process
that dies, and the multi-process start-up's one-line errors. The same on a real SLURM cluster:
tests/test_slurm.py."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from alexnet_jax import checkpoints, cluster
from alexnet_jax.errors import EXIT_INTERRUPTED
from conftest import REPO, free_port
from test_resume import SHORT, logged_step, steps

FOUR_DEVICES = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}


def start_two(workdir, data_dir, *overrides, logs=None, env=FOUR_DEVICES):
  """The two processes of one run on localhost, 4 CPU devices each; each writes to its file of
  `logs` if given."""
  port = free_port()
  files = [open(log, 'w') for log in logs] if logs else [subprocess.PIPE] * 2
  return [subprocess.Popen(
      [sys.executable, '-m', 'alexnet_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', f'--coordinator_address=localhost:{port}', '--num_processes=2',
       f'--process_id={i}', f'--config.dataset.data_dir={data_dir}', *SHORT,
       '--config.train.batch_size=16', *overrides],
      cwd=REPO, env=env, stdout=files[i], stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def wait_for_step(workdir, step, procs):
  deadline = time.time() + 300
  while logged_step(workdir) < step and time.time() < deadline:
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
    time.sleep(0.05)


def finish(procs, timeout):
  """Both processes' (exit status, output), each within `timeout` seconds from now."""
  deadline = time.time() + timeout
  return [(p.wait(timeout=max(1, deadline - time.time())), p.communicate()[0] or '')
          for p in procs]


def test_signal_to_one_of_two_processes_stops_both_at_one_step(tmp_path, digits_dir):
  """A signal to process 1 only stops both at the next log step with a checkpoint. The resumed
  run then gets two signals at process 1: the first sets the next log step (50), the second
  stops both at the first step they can both reach."""
  procs = start_two(tmp_path, digits_dir, '--config.train.num_train_steps=500')
  wait_for_step(tmp_path, 2, procs)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only, as a kill on one host
  (code0, out0), (code1, out1) = finish(procs, 60)
  assert code0 == code1 == 0, (out0[-2000:], out1[-2000:])
  stopped = [l for l in out0.splitlines() if l.startswith('Stopped by ')]
  assert len(stopped) == 1 and stopped[0].startswith('Stopped by SIGTERM at step '), out0[-2000:]
  step = int(stopped[0].split('at step ')[1].split()[0])
  assert step % 2 == 0  # a log step: the resumed run logs what an uninterrupted one does
  assert steps(tmp_path)[-1] == step

  logs = [tmp_path / 'process0.txt', tmp_path / 'process1.txt']
  procs = start_two(tmp_path, digits_dir, '--config.train.num_train_steps=500',
                    '--config.train.log_every_steps=50', '--config.train.checkpoint_every_steps=0',
                    '--verbosity=0', logs=logs)  # INFO: each process says when its loop starts
  deadline = time.time() + 300
  while not all(f'Process {i} trains steps {step + 1}-500' in l.read_text()
                for i, l in enumerate(logs)) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), [l.read_text()[-2000:] for l in logs]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  announced = ('SIGTERM received by process 1: stopping at step 50 (the next log step) with a '
               'checkpoint; signal again to stop at once.')
  while announced not in logs[0].read_text() and time.time() < deadline:
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGINT)
  (code0, _), (code1, _) = finish(procs, 60)
  out0, out1 = (l.read_text() for l in logs)
  assert code0 == code1 == 0, (out0[-2000:], out1[-2000:])
  assert f'Resuming from step {step}' in out0 and announced in out0
  stopped = [l for l in out0.splitlines() if l.startswith('Stopped by ')]
  assert len(stopped) == 1 and stopped[0].startswith('Stopped by SIGINT at step '), out0[-2000:]
  again = int(stopped[0].split('at step ')[1].split()[0])
  assert step < again < 50 and steps(tmp_path)[-2:] == [step, again]


def test_a_killed_process_ends_the_others_in_one_line(tmp_path, digits_dir):
  """SIGKILL to process 1 (the OOM killer, a lost host) once the loop runs: process 0 exits 75
  within the heartbeat timeout with one line naming it (not JAX's C++ fatal error and a core
  dump), and every checkpoint it leaves is complete. (Process 0's own death still ends the others
  with JAX's fatal error: alexnet_jax/cluster.py.) JAX's warnings shown, as users see them."""
  procs = start_two(tmp_path, digits_dir, '--config.train.num_train_steps=500',
                    '--heartbeat_timeout=5', env={**FOUR_DEVICES, 'TF_CPP_MIN_LOG_LEVEL': '1'})
  wait_for_step(tmp_path, 2, procs)
  procs[1].kill()
  killed = time.time()
  (code, out), _ = finish(procs, 60)
  took = time.time() - killed
  lines = [l.split('\r')[-1] for l in out.splitlines()]
  assert code == EXIT_INTERRUPTED and took < 5 + 15, (code, took, out[-3000:])
  assert [l for l in lines if re.search('error|fatal|traceback', l, re.I)] == [
      'error: process 1 of 2 is gone (exited, crashed or killed, or no heartbeat for 5 s); run '
      'the same command on every process to resume from the newest checkpoint.'], out[-3000:]
  assert cluster.RECOVERABLE_NOTE not in out  # JAX's note on what cluster.Watch takes care of
  complete = checkpoints.all_steps(str(tmp_path))
  left = os.listdir(tmp_path / 'checkpoints')
  assert all(name in map(str, complete) or '.orbax-checkpoint-tmp' in name for name in left), left


@pytest.mark.parametrize('env,flags,message', [
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2'}, ['--distributed'],
     'error: --distributed: SLURM job 7 has SLURM_NTASKS=2 but this start makes 1 process (the '
     'batch script itself, not one of srun tasks); start training with srun (srun python -m '
     'alexnet_jax.main ... --distributed) and no --num_processes.'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_STEP_ID': '0'},
     ['--distributed', '--num_processes=4'],
     'error: --distributed: SLURM job 7 has SLURM_NTASKS=2 but this start makes 4 processes; '
     'start training with srun (srun python -m alexnet_jax.main ... --distributed) and no '
     '--num_processes.'),
    ({}, ['--num_processes=2'], 'error: --num_processes and --process_id need '
     '--coordinator_address=HOST:PORT (or --distributed on a cluster).'),
    ({}, ['--coordinator_address=localhost:1234'], 'error: --coordinator_address=localhost:1234 '
     'needs --num_processes and --process_id too (or --distributed to read them from the '
     'cluster).'),
    ({}, ['--distributed', '--heartbeat_timeout=0'],
     'error: --heartbeat_timeout=0 must be a positive number of seconds.'),
])
def test_multi_process_start_mistakes_are_one_line(monkeypatch, env, flags, message):
  """Refused before any wait for other processes (the SLURM variables as a batch script without
  srun sees them; on a real cluster: tests/test_slurm.py)."""
  from alexnet_jax.errors import ConfigError
  for name in [k for k in os.environ if k.startswith('SLURM_')]:
    monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  args = dict(coordinator_address=None, num_processes=None, process_id=None, distributed=False)
  for flag in flags:
    name, _, value = flag[2:].partition('=')
    args[name] = True if not value else value if name == 'coordinator_address' else int(value)
  with pytest.raises(ConfigError) as refused:
    cluster.start(**args)
  assert f'error: {refused.value}' == message
