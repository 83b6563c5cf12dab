"""Training on a real one-node SLURM cluster (conftest.slurm): `srun -n 2 ... --distributed`,
SIGTERM to one task, `scontrol requeue` of experiments/slurm/train.sbatch, and a batch script that
forgot srun. Each run: 2 tasks x 4 CPU devices of the tiny model, reading the batches of one
process (dataset.process_reads='all'). The sweeps' SLURM tests are in tests/test_sweep.py."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, free_port
from test_resume import SHORT, logged_step, metrics, steps

STEPS = 16
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
      cwd=REPO, env=task_env(slurm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      errors='replace')  # two tasks' progress bars, interleaved


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
  assert [l['step'] for l in two] == [l['step'] for l in one] == [
      *range(2, STEPS + 1, 2), STEPS]
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


def test_sigterm_to_one_task_then_requeue_resume_bit_identically(slurm, uninterrupted,
                                                                   digits_dir, tmp_path):
  """SIGTERM to task 1 of `srun -n 2`: both stop at one step with a checkpoint and exit 0. Then
  experiments/slurm/train.sbatch, as users submit it (the cluster's layout overridden: 2 tasks,
  no GPUs), resumes there, is requeued mid-run (`scontrol requeue`: SIGTERM to every task, the
  job queued again), resumes again and ends bit-identical to the uninterrupted run."""
  workdir = tmp_path / 'run'
  srun = srun_main(slurm, workdir, digits_dir, '--config.train.num_train_steps=500')
  deadline = time.time() + 300
  while logged_step(workdir) < 2 and time.time() < deadline and srun.poll() is None:
    time.sleep(0.05)
  pid = task_pid(workdir, 1)
  assert pid is not None and task_pid(workdir, 0) is not None
  os.kill(pid, signal.SIGTERM)  # task 1 only
  signalled = time.time()
  out, _ = srun.communicate(timeout=120)
  took = time.time() - signalled
  assert srun.returncode == 0, out[-3000:]  # srun's status: every task exited 0
  assert took < 60, took
  # (Lines of srun's output may begin after a progress bar's carriage return.)
  stopped = re.findall(r'Stopped by SIGTERM at step (\d+) ', out)
  assert len(stopped) == 1, out[-3000:]  # process 0 says it, for both
  first = int(stopped[0])
  assert first < STEPS - 6 and steps(workdir) == [first]

  log = tmp_path / 'job.out'
  job = slurm.run(
      'sbatch', '--parsable', '--nodes=1', '--ntasks-per-node=2', '--gpus-per-node=0',
      '--cpus-per-task=1', '--time=30', f'--output={log}',
      os.path.join(REPO, 'experiments', 'slurm', 'train.sbatch'), str(workdir),
      f'--config.dataset.data_dir={digits_dir}', *TINY, f'--config.train.num_train_steps={STEPS}',
      env={**task_env(slurm), 'CONFIG': 'configs/default.py'}, cwd=REPO).strip()
  while logged_step(workdir) < first + 2 and time.time() < deadline:
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
  out = log.read_text(errors='replace')  # two tasks' progress bars, interleaved
  assert out.count(f'job {job} (restart ') == 2, out[-3000:]  # appended, not overwritten
  resumed = [int(step) for step in re.findall(r'Resuming from step (\d+) ', out)]
  assert len(resumed) == 2 and first == resumed[0] < resumed[1] < STEPS, out[-3000:]
  assert steps(workdir)[-1] == STEPS
  assert_same_params(workdir, uninterrupted, STEPS)


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
