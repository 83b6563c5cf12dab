"""Never lose a run: kill -9 and resume bit-identically, SIGTERM, non-finite steps, bad inputs."""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from alexnet_jax.errors import EXIT_INTERRUPTED, STOPPED
from alexnet_jax.workdir import WALL_CLOCK_METRICS
from conftest import REPO, tiny_config

# 22 steps an epoch at batch 64: the runs cross an epoch end (evaluation, plateau rule). On
# prepared data: the stored 73x73 JPEGs of conftest.digits_dir.
SHORT = ['--config.dataset.image_size=63', '--config.dataset.prepared=True', '--config.model.width=0.25',
         '--config.train.batch_size=64', '--config.train.log_every_steps=2',
         '--config.train.checkpoint_every_steps=4']


def command(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'alexnet_jax.main', '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *SHORT, *overrides]


def run(workdir, data_dir, *overrides, env=None, **kw):
  return subprocess.run(command(workdir, data_dir, *overrides), cwd=REPO, capture_output=True,
                        text=True, env=env, **kw)


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f]
  return [{k: v for k, v in l.items() if k not in WALL_CLOCK_METRICS} for l in lines]


def logged_step(workdir):
  try:
    return max(l['step'] for l in metrics(workdir))
  except (FileNotFoundError, ValueError, json.JSONDecodeError):
    return 0


def checkpoint(workdir, step=None):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step() if step is None else step
  return step, manager.restore(step, args=ocp.args.StandardRestore())


def steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))


def jsonl_scalars(workdir):
  """{tag: [(step, value as float32)]} from metrics.jsonl, the first value of a tag at a step."""
  scalars = {}
  for line in metrics(workdir):
    for tag, value in line.items():
      if tag != 'step' and line['step'] not in [s for s, _ in scalars.get(tag, [])]:
        scalars.setdefault(tag, []).append((line['step'], float(np.float32(value))))
  return scalars


def tensorboard_scalars(workdir):
  """What TensorBoard shows: every event file of the run, purges applied."""
  from tensorboard.backend.event_processing import event_accumulator
  files = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert all(os.path.getsize(os.path.join(workdir, 'tensorboard', f)) > 100 for f in files)
  events = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'),
                                              purge_orphaned_data=True)
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()['scalars'] if tag not in WALL_CLOCK_METRICS}


def assert_same_tree(a, b):
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_dir):
  """An uninterrupted 26-step run."""
  workdir = tmp_path_factory.mktemp('reference')
  out = run(workdir, digits_dir, '--config.train.num_train_steps=26')
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def catches(pid, signum):
  """Whether the process has a handler for `signum` (main installs one for SIGHUP as it starts)."""
  with open(f'/proc/{pid}/status') as f:
    caught = next(int(l.split()[1], 16) for l in f if l.startswith('SigCgt:'))
  return bool(caught & (1 << (signum - 1)))


def test_ctrl_c_before_the_loop_then_kill_9_in_it_then_resume_is_bit_identical(
    tmp_path, digits_dir, reference):
  # Ctrl-C (SIGINT to the process group) as main starts, while it imports: stopped, exit 0.
  proc = subprocess.Popen(command(tmp_path, digits_dir, '--config.train.num_train_steps=26'),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  deadline = time.time() + 300
  while not catches(proc.pid, signal.SIGHUP) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGINT)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  assert [l for l in output.splitlines() if l.startswith(STOPPED)] == [
      'Stopped by SIGINT before training started; run the same command to start.'], output[-3000:]
  assert not os.listdir(tmp_path)  # it stopped before writing anything

  kill_after = random.Random().randint(5, 21)
  proc = subprocess.Popen(command(tmp_path, digits_dir, '--config.train.num_train_steps=26'),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while logged_step(tmp_path) < kill_after and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = logged_step(tmp_path)
  assert killed_at < 26, 'the run finished before it could be killed'
  out = run(tmp_path, digits_dir, '--config.train.num_train_steps=26')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resuming from step' in out.stdout + out.stderr, (killed_at, out.stderr[-2000:])
  assert f'Took over {tmp_path / "lock"} from pid {proc.pid} ' in out.stdout + out.stderr
  assert metrics(tmp_path) == metrics(reference), f'killed after step {killed_at}'
  assert tensorboard_scalars(tmp_path) == jsonl_scalars(tmp_path)
  assert (tmp_path / 'lock').read_text() == ''  # released
  step, restored = checkpoint(tmp_path)
  ref_step, ref = checkpoint(reference)
  assert step == ref_step == 26
  assert_same_tree(restored, ref)


def test_keeps_latest_and_best(reference):
  # LatestN(3) keeps 18, 22, 24, 26 minus the oldest; the epoch-end checkpoint 22 is the best.
  assert steps(reference)[-3:] == [22, 24, 26] or steps(reference)[-3:] == [20, 24, 26]
  assert 22 in steps(reference)


def stop_in_the_loop(workdir, digits_dir, signum, on_a_terminal=False):
  """Starts a long run and sends it `signum` once it has logged past its start: it exits 0 with
  a checkpoint at the step it logged last, a log step. Returns its output and that step. With
  `on_a_terminal` its stdout and stderr are a terminal (a pty) that hangs up right after the
  signal; the output is what the terminal showed until then."""
  start = logged_step(workdir)
  terminal, tty = os.openpty() if on_a_terminal else (None, None)
  proc = subprocess.Popen(command(workdir, digits_dir, '--config.train.num_train_steps=500'),
                          cwd=REPO, stdout=tty or subprocess.PIPE, stderr=tty or subprocess.STDOUT,
                          text=True)
  shown = b''
  if terminal is not None:
    os.close(tty)
    os.set_blocking(terminal, False)
  deadline = time.time() + 300
  while logged_step(workdir) < start + 3 and proc.poll() is None and time.time() < deadline:
    if terminal is not None:
      with contextlib.suppress(BlockingIOError):
        shown += os.read(terminal, 1 << 16)  # drained, so that no write blocks
    time.sleep(0.05)
  proc.send_signal(signum)
  if terminal is not None:
    os.close(terminal)  # from now on every write to it fails (EIO)
  output = proc.communicate(timeout=300)[0] or shown.decode(errors='replace')
  assert proc.returncode == 0, output[-3000:]
  step = logged_step(workdir)
  assert step % 2 == 0 and steps(workdir)[-1] == step > start + 2
  if terminal is None:
    assert [l for l in output.splitlines() if l.startswith(STOPPED)] == [
        f'Stopped by {signal.Signals(signum).name} at step {step} (epoch {step / 22:.2f}); '
        f'checkpoint {step} saved in {workdir / "checkpoints"}. Run the same command to '
        f'resume.'], output[-3000:]
  return output, step


def test_sighup_checkpoints_and_exits_0_even_when_its_terminal_is_gone(tmp_path, digits_dir):
  """A closed terminal or a dropped ssh: SIGHUP; the terminal may be gone already, so that
  every write to it fails (the run's own lines, the progress bar)."""
  _, step = stop_in_the_loop(tmp_path, digits_dir, signal.SIGHUP)
  output, _ = stop_in_the_loop(tmp_path, digits_dir, signal.SIGHUP, on_a_terminal=True)
  assert f'Resuming from step {step}' in output


def test_signal_during_the_metrics_fetch_is_saved_before_it_is_reported(config, tmp_path,
                                                                        monkeypatch, capsys):
  """The loop blocks on the device at every log step; a signal landing in that wait is acted on
  at the next step: checkpoint first, then the message. A signal before the loop changes
  nothing."""
  from alexnet_jax import checkpoints, parallel, train, workdir
  config.train.num_train_steps = 6  # 89 steps an epoch: no epoch end, no periodic checkpoint
  real_get, sent = parallel.Parallel.get, []

  def get_after_a_signal(self, tree):
    if isinstance(tree, list) and not sent:  # step 2's metrics fetch
      sent.append(os.kill(os.getpid(), signal.SIGTERM))
    return real_get(self, tree)

  monkeypatch.setattr(parallel.Parallel, 'get', get_after_a_signal)
  train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert sent
  # Seen at step 3; the run goes on to its next log step, so a resumed run logs what an
  # uninterrupted one does.
  assert ('SIGTERM received: stopping at step 4 (the next log step) with a checkpoint; signal '
          'again to stop at once.') in out, out
  assert (f'Stopped by SIGTERM at step 4 (epoch 0.04); checkpoint 4 saved in '
          f'{tmp_path / "checkpoints"}. Run the same command to resume.') in out, out
  assert checkpoints.all_steps(str(tmp_path)) == [4]
  monkeypatch.undo()
  # Ctrl-C before the loop (as the state goes to the devices, the last thing before it): the
  # start unwinds, releasing what it took (the lock's text too); the workdir is as it was.
  before = sizes(tmp_path)
  monkeypatch.setattr(parallel.Parallel, 'put_state',
                      lambda self, state: os.kill(os.getpid(), signal.SIGINT))
  with pytest.raises(workdir.Stopped):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert sizes(tmp_path) == before and (tmp_path / 'lock').read_text() == ''
  train.train_and_evaluate(config, str(tmp_path))
  assert 'Resuming from step 4' in capsys.readouterr().out
  assert checkpoints.all_steps(str(tmp_path)) == [4, 6]
  uninterrupted = str(tmp_path / 'uninterrupted')
  train.train_and_evaluate(config, uninterrupted)
  assert metrics(tmp_path) == metrics(uninterrupted)


def test_second_signal_stops_at_once(config, tmp_path, monkeypatch, capsys):
  from alexnet_jax import checkpoints, parallel, train
  config.train.num_train_steps = 6
  real_get, sent = parallel.Parallel.get, []

  def get_after_two_signals(self, tree):
    if isinstance(tree, list) and not sent:  # step 2's metrics fetch
      sent.extend(os.kill(os.getpid(), s) for s in (signal.SIGTERM, signal.SIGINT))
    return real_get(self, tree)

  monkeypatch.setattr(parallel.Parallel, 'get', get_after_two_signals)
  train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert 'received' not in out  # no "stopping at step 4": the second signal overrides the first
  assert (f'Stopped by SIGINT at step 3 (epoch 0.03); checkpoint 3 saved in '
          f'{tmp_path / "checkpoints"}. Run the same command to resume.') in out, out
  assert checkpoints.all_steps(str(tmp_path)) == [3]


def largest_file(directory):
  files = [p for p in directory.rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def sizes(directory):
  return {str(p): p.stat().st_size for p in directory.rglob('*') if p.is_file()}


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path, digits_dir,
                                                                    reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)  # a run stopped at step 26
  damaged = largest_file(tmp_path / 'checkpoints' / '26')
  cut = damaged.stat().st_size // 2
  os.truncate(damaged, cut)  # a copy cut short, a bad disk
  out = run(tmp_path, digits_dir, '--config.train.num_train_steps=26')
  assert out.returncode == 0, out.stderr[-3000:]
  said = out.stdout + out.stderr
  assert f'checkpoint 26 in {tmp_path / "checkpoints"} cannot be restored (' in said
  assert f'Moved damaged checkpoint 26 to {tmp_path / "damaged_checkpoints"}.' in said
  assert 'Resuming from step 24' in said and 'Traceback' not in said, said[-3000:]
  moved = tmp_path / 'damaged_checkpoints' / '26' / damaged.relative_to(
      tmp_path / 'checkpoints' / '26')
  assert moved.stat().st_size == cut  # kept as it was found
  assert metrics(tmp_path) == metrics(reference)  # steps 25-26 trained again, identically
  assert_same_tree(checkpoint(tmp_path)[1], checkpoint(reference)[1])


def test_no_restorable_checkpoint_is_one_line_and_touches_none(tmp_path, digits_dir, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  for step in steps(tmp_path):
    damaged = largest_file(tmp_path / 'checkpoints' / str(step))
    os.truncate(damaged, 1000)
  before = sizes(tmp_path / 'checkpoints')
  out = run(tmp_path, digits_dir, '--config.train.num_train_steps=30')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      f'error: none of the checkpoints in {tmp_path / "checkpoints"} can be restored (steps '
      f'{", ".join(map(str, steps(reference)))}; step 26: ')
  assert out.stderr.strip().endswith('to start over, use a fresh --workdir or move that '
                                     'checkpoints directory away.')
  assert 'Traceback' not in out.stderr
  assert sizes(tmp_path / 'checkpoints') == before


def test_one_run_per_workdir(digits_dir, reference):
  from alexnet_jax import workdir
  before = sizes(reference / 'checkpoints')
  with workdir.Lock(str(reference)) as held:
    held.acquire()
    holder = (reference / 'lock').read_text().strip()
    out = run(reference, digits_dir, '--config.train.num_train_steps=30')
  assert holder.startswith(f'pid {os.getpid()} on ')
  assert out.returncode == EXIT_INTERRUPTED  # not the config's fault: the same command resumes
  assert out.stderr.strip().splitlines()[-1] == (
      f'error: workdir {reference} is in use by {holder} (holder of {reference / "lock"}); wait '
      f'for that run to end or stop it, or use another --workdir.')
  assert sizes(reference / 'checkpoints') == before


def test_failed_start_writes_nothing_and_reads_create_nothing(tmp_path, digits_dir, reference):
  fresh, typo = tmp_path / 'fresh', tmp_path / 'typo'
  out = run(fresh, digits_dir, f'--config.init.checkpoint={reference}', '--config.model.groups=1')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"error: init.checkpoint='{reference}' (step 26) does not fit this model: conv2.kernel")
  out = run(fresh, digits_dir, f'--config.init.checkpoint={typo}')
  assert out.stderr.strip().splitlines()[-1].startswith(f'error: {typo} has no checkpoints')
  for args in (['evaluate', '--config=configs/default.py', f'--workdir={typo}'],
               ['predict', f'--checkpoint={typo}', 'photo.jpg']):
    out = subprocess.run([sys.executable, '-m', f'alexnet_jax.{args[0]}', *args[1:]], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f'error: {args[-2 if args[0] == "predict" else -1]} does not exist; pass the directory '
        f'of a training run (or of python -m alexnet_jax.convert_torchvision).']
  empty = tmp_path / 'empty'
  empty.mkdir()
  out = subprocess.run([sys.executable, '-m', 'alexnet_jax.evaluate', '--config=configs/default.py',
                        f'--workdir={empty}'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f'error: {empty} has no checkpoints; train there first (python -m alexnet_jax.main) or '
      f'import weights (python -m alexnet_jax.convert_torchvision PATH.pth {empty}).']
  assert not os.listdir(empty)
  assert not fresh.exists() and not typo.exists()
  # The corrected command is not refused as "a different config": nothing was recorded.
  assert not os.path.exists(fresh / 'config.json')


def nan_at(nan_step):
  """A batch hook: the batch of step `nan_step` becomes NaN (through its lighting shift, as
  uint8 pixels cannot be)."""
  def hook(batches, first_step):
    for step, batch in enumerate(batches, first_step):
      yield {**batch, 'shift': np.full_like(batch['shift'], np.nan)} if step == nan_step else batch
  return hook


def eight_steps(data_dir):
  """`run`'s config (SHORT), eight steps, in process."""
  config = tiny_config(data_dir)
  config.dataset.prepared = True
  config.train.batch_size, config.train.checkpoint_every_steps = 64, 4
  config.train.num_train_steps = 8
  return config


def test_nonfinite_stop_names_step_and_checkpoint(tmp_path, digits_dir):
  from alexnet_jax import train
  from alexnet_jax.errors import TrainingStopped
  with pytest.raises(TrainingStopped, match='non-finite loss or gradient at step 6 ') as stopped:
    train.train_and_evaluate(eight_steps(digits_dir), str(tmp_path), batch_hook=nan_at(6))
  assert f'Last good checkpoint: step 4 in {tmp_path / "checkpoints"}.' in str(stopped.value)
  assert steps(tmp_path) == [4]


def test_nonfinite_skip_counts_and_keeps_params_finite(tmp_path, digits_dir):
  from alexnet_jax import train
  config = eight_steps(digits_dir)
  config.train.on_nonfinite = 'skip'
  train.train_and_evaluate(config, str(tmp_path), batch_hook=nan_at(6))
  skipped = {l['step']: l['nonfinite_steps'] for l in metrics(tmp_path) if 'train_loss' in l}
  assert skipped == {2: 0, 4: 0, 6: 1, 8: 0}
  _, state = checkpoint(tmp_path)
  import jax
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


ALLOWED = 'train.allow_config_change'
EIGHT = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


@pytest.mark.parametrize('overrides,message', [
    (['--config.train.batch_siz=8'],
     "'batch_siz' is not a config field (did you mean 'batch_size'?)"),
    (['--config.train.batch_size=eight'], 'flag --config.train.batch_size=eight: invalid literal'),
    (['--config.train.batch_size=60'], 'train.batch_size=60 does not divide evenly over 8 devices'),
    (['--config=configs/nope.py'],
     '--config=configs/nope.py is not a file; pass a config such as configs/default.py.'),
])
def test_bad_input_is_one_line_and_leaves_checkpoints(digits_dir, reference, overrides, message):
  """From the command line: flag errors, and one of the config checks (the rest, in-process, in
  the test below, raise the ConfigError whose message main prints the same way)."""
  before = steps(reference)
  out = run(reference, digits_dir, '--config.train.num_train_steps=30', *overrides, env=EIGHT)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith('error: '), out.stderr[-2000:]
  assert message in out.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in out.stderr
  assert steps(reference) == before
  assert checkpoint(reference)[0] == 26


@pytest.mark.parametrize('changes,message', [
    ({'dataset.name': 'no_such_set', ALLOWED: True},
     "dataset.name='no_such_set' is not a TFDS data set"),
    ({'dataset.name': 'mnist', ALLOWED: True}, 'mnist is not prepared in'),
    ({'dataset.name': 'imagenet2012', ALLOWED: True}, 'pass --config.dataset.manual_dir=DIR'),
    ({'model.lrn': False}, 'holds a run with a different config (model.lrn: True -> False)'),
    ({'train.on_nonfinite': 'ignore'}, "train.on_nonfinite='ignore' is unknown"),
    ({'train.batch_size': 0}, 'train.batch_size=0 must be positive.'),
])
def test_bad_config_is_refused_before_anything_changes(digits_dir, reference, changes, message):
  from alexnet_jax import train
  from alexnet_jax.errors import ConfigError
  from conftest import tiny_config
  config = tiny_config(digits_dir)  # as SHORT sets it
  config.dataset.prepared = True
  config.train.update(batch_size=64, checkpoint_every_steps=4, num_train_steps=30)
  for field, value in changes.items():
    section, key = field.split('.')
    config[section][key] = value
  before = sizes(reference)
  with pytest.raises(ConfigError, match=re.escape(message)):
    train.train_and_evaluate(config, str(reference))
  assert sizes(reference) == before


def test_split_smaller_than_a_batch_is_one_line(tmp_path, digits_dir):
  import fake_data
  fake_data.write_image_folder(str(tmp_path / 'images'))  # 30 training images
  out = run(tmp_path / 'run', digits_dir, '--config.dataset.name=folder',
            f'--config.dataset.path={tmp_path / "images"}',
            f'--config.dataset.data_dir={tmp_path / "tfds"}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      'error: the training split has 30 examples, fewer than one batch of 64; lower '
      '--config.train.batch_size.')
  assert not (tmp_path / 'run').exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path, digits_dir):
  (tmp_path / 'run').write_text('')
  out = run(tmp_path / 'run', digits_dir)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f'error: --workdir={tmp_path / "run"} is a file, not a directory; pass a directory.']


def test_disk_full_keeps_previous_checkpoint(tmp_path, digits_dir, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)  # a run stopped at step 26
  # Every write past 1 MiB fails (EFBIG), as writes do on a full disk.
  small_files = ['bash', '-c', 'trap "" XFSZ; ulimit -f 1024; exec "$@"', 'bash']
  out = subprocess.run(small_files + command(tmp_path, digits_dir,
                                             '--config.train.num_train_steps=30'),
                       cwd=REPO, capture_output=True, text=True)
  assert out.returncode == EXIT_INTERRUPTED, out.stderr[-2000:]
  assert 'error: could not write checkpoint 28' in out.stderr, out.stderr[-2000:]
  assert 'the previous checkpoint (step 26) is intact' in out.stderr
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert checkpoint(tmp_path)[0] == 26
