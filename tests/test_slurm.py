"""Training on a real one-node SLURM cluster (conftest.slurm): `srun -n 2 ... --distributed`,
SIGTERM to one task, `scontrol requeue` of experiments/slurm/train.sbatch, and a batch script that
forgot srun. Each run: 2 tasks x 4 CPU devices of the tiny model."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, free_port
from test_resume import SHORT, logged_step, metrics, steps

STEPS = 10
TINY = [*SHORT, '--config.train.batch_size=16', '--config.train.checkpoint_every_steps=0',
        '--config.dataset.process_reads=all']  # the batches of one process


def task_env(slurm, devices=4):
  return {**slurm.env, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'JAX_COORDINATOR_PORT': str(free_port())}  # not the job id's: other clusters run here


def srun_main(slurm, workdir, data_dir, *overrides):
  """`srun -n 2 python -m alexnet_jax.main ... --distributed`, started (output: the pipe)."""
  return subprocess.Popen(
      ['srun', '-n', '2', '--kill-on-bad-exit=1', sys.executable, '-m', 'alexnet_jax.main',
       '--config=configs/default.py', f'--workdir={workdir}', '--distributed',
       f'--config.dataset.data_dir={data_dir}', *TINY, *overrides],
      cwd=REPO, env=task_env(slurm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_same_params(a, b, step):
  """Checkpoint `step` of workdirs `a` and `b` hold the same parameters, bit for bit."""
  import jax
  from alexnet_jax import checkpoints
  la, lb = (jax.tree_util.tree_flatten_with_path(checkpoints.restore_params(str(w), step)[1])[0]
            for w in (a, b))
  assert [k for k, _ in la] == [k for k, _ in lb]
  for (k, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(k))


@pytest.fixture(scope='module')
def uninterrupted(slurm, digits_dir, tmp_path_factory):
  """STEPS steps on 2 tasks x 4 devices under srun."""
  workdir = tmp_path_factory.mktemp('srun')
  out, _ = srun_main(slurm, workdir, digits_dir, f'--config.train.num_train_steps={STEPS}'
                     ).communicate(timeout=600)
  assert steps(workdir) == [STEPS], out[-3000:]
  return workdir


def test_two_tasks_train_like_one_process_with_eight_devices(uninterrupted, digits_dir,
                                                             tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.main', '--config=configs/default.py',
       f'--workdir={tmp_path}', f'--config.dataset.data_dir={digits_dir}', *TINY,
       f'--config.train.num_train_steps={STEPS}'], cwd=REPO, capture_output=True, text=True,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  two, one = metrics(uninterrupted), metrics(tmp_path)
  assert [l['step'] for l in two] == [l['step'] for l in one] == [2, 4, 6, 8, 10, 10]
  for a, b in zip(two, one):
    for key in ('train_loss', 'val_loss'):
      if key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), (a, b)


def task_pid(workdir, task):
  """The pid of srun task `task` training in `workdir` (its command line names the workdir)."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmdline = f.read().split(b'\0')
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except OSError:
      continue
    if (f'--workdir={workdir}'.encode() in cmdline and b'alexnet_jax.main' in cmdline and
        f'SLURM_PROCID={task}'.encode() in environ):
      return int(pid)
  return None


def test_sigterm_to_one_task_stops_both_at_one_step_and_resumes_bit_identically(
    slurm, uninterrupted, digits_dir, tmp_path):
  srun = srun_main(slurm, tmp_path, digits_dir, '--config.train.num_train_steps=500')
  deadline = time.time() + 300
  while logged_step(tmp_path) < 2 and time.time() < deadline and srun.poll() is None:
    time.sleep(0.05)
  pid = task_pid(tmp_path, 1)
  assert pid is not None and task_pid(tmp_path, 0) is not None
  os.kill(pid, signal.SIGTERM)  # task 1 only
  signalled = time.time()
  out, _ = srun.communicate(timeout=120)
  took = time.time() - signalled
  assert srun.returncode == 0, out[-3000:]  # srun's status: every task exited 0
  assert took < 60, took
  stopped = [l for l in out.splitlines() if l.startswith('Stopped by SIGTERM at step ')]
  assert len(stopped) == 1, out[-3000:]  # process 0 says it, for both
  step = int(stopped[0].split('at step ')[1].split()[0])
  assert step < STEPS and steps(tmp_path) == [step]
  assert f'SIGTERM received by process 1: stopping at step {step}' in out or step % 2 == 0
  again, _ = srun_main(slurm, tmp_path, digits_dir, f'--config.train.num_train_steps={STEPS}'
                       ).communicate(timeout=600)
  assert f'Resuming from step {step}' in again, again[-3000:]
  assert steps(tmp_path)[-1] == STEPS
  assert_same_params(tmp_path, uninterrupted, STEPS)


def test_requeued_batch_job_resumes_bit_identically(slurm, uninterrupted, digits_dir, tmp_path):
  """experiments/slurm/train.sbatch as users submit it, with the cluster's layout overridden
  (2 tasks, no GPUs) and the tiny run's flags."""
  log = tmp_path / 'job.out'
  job = slurm.run(
      'sbatch', '--parsable', '--nodes=1', '--ntasks-per-node=2', '--gpus-per-node=0',
      '--cpus-per-task=1', '--time=30', f'--output={log}',
      os.path.join(REPO, 'experiments', 'slurm', 'train.sbatch'), str(tmp_path / 'run'),
      f'--config.dataset.data_dir={digits_dir}', *TINY, f'--config.train.num_train_steps={STEPS}',
      env={**task_env(slurm), 'CONFIG': 'configs/default.py'}, cwd=REPO).strip()
  deadline = time.time() + 300
  while logged_step(tmp_path / 'run') < 2 and time.time() < deadline:
    time.sleep(0.05)
  slurm.run('scontrol', 'requeue', job)
  # A requeued job waits 2 minutes (SLURM's BeginTime); the test lets it start at once.
  while 'BeginTime' not in slurm.run('squeue', '-h', '-j', job, '-o', '%r') and (
      time.time() < deadline):
    time.sleep(0.2)
  slurm.run('scontrol', 'update', f'jobid={job}', 'StartTime=now')
  while slurm.run('squeue', '-h', '-j', job, '-o', '%T').strip() and time.time() < deadline:
    time.sleep(0.5)
  record = next(j for j in slurm.jobs() if j['JobId'] == job)
  assert (record['JobState'], record['Restarts'], record['ExitCode']) == ('COMPLETED', '1', '0:0')
  out = log.read_text()
  assert out.count(f'job {job} (restart ') == 2, out[-3000:]  # appended, not overwritten
  resumed = [l for l in out.splitlines() if l.startswith('Resuming from step ')]
  assert resumed, out[-3000:]
  assert steps(tmp_path / 'run')[-1] == STEPS
  assert_same_params(tmp_path / 'run', uninterrupted, STEPS)


def test_distributed_without_srun_is_one_line(slurm, tmp_path):
  log = tmp_path / 'job.out'
  slurm.run('sbatch', '--wait', '-n', '2', f'--output={log}', '--wrap',
            f'{sys.executable} -m alexnet_jax.main --config=configs/default.py '
            f'--workdir={tmp_path / "run"} --distributed', cwd=REPO, check=False)
  job = next(j for j in slurm.jobs() if j.get('StdOut') == str(log))
  assert log.read_text().strip().splitlines()[-1] == (
      f'error: --distributed: SLURM job {job["JobId"]} has SLURM_NTASKS=2 but this start makes 1 '
      f'process (the batch script itself, not one of srun tasks); start training with srun (srun '
      f'python -m alexnet_jax.main ... --distributed) and no --num_processes.')
  assert not (tmp_path / 'run').exists()
