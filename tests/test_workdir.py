"""The run directory: one live run per workdir, atomic small files, metrics that match TensorBoard."""

import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from alexnet_jax import workdir
from alexnet_jax.errors import ConfigError
from conftest import REPO


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
  assert not workdir.is_locked(str(tmp_path))
  with workdir.Lock(str(tmp_path)) as held:
    assert held.acquire() is None  # a fresh workdir: nobody to take over from
    assert workdir.is_locked(str(tmp_path))
    me = (tmp_path / 'lock').read_text()
    assert me.startswith(f'pid {os.getpid()} on ')
    # Another process (flock is per open file, so a second Lock in this process would do too).
    out = subprocess.run(
        [sys.executable, '-c', f'from alexnet_jax import workdir; '
         f'workdir.Lock({str(tmp_path)!r}).acquire()'],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1
    assert (f'alexnet_jax.errors.Interrupted: workdir {tmp_path} is in use by {me.strip()} '
            f'(holder of {tmp_path / "lock"}); wait for that run to end or stop it, or use another '
            f'--workdir.') in out.stderr
  assert (tmp_path / 'lock').read_text() == ''  # released cleanly: the next start takes no note

  # A holder killed with SIGKILL never releases: the kernel drops its flock, its text stays.
  dead = subprocess.Popen(
      [sys.executable, '-c', 'import os, signal; from alexnet_jax import workdir; '
       f'workdir.Lock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)'],
      cwd=REPO)
  assert dead.wait() == -signal.SIGKILL
  assert not workdir.is_locked(str(tmp_path))  # its text is there, its flock is not
  with workdir.Lock(str(tmp_path)) as lock:
    note = lock.acquire()
  assert note.startswith(f'Took over {tmp_path / "lock"} from pid {dead.pid} on ')
  assert note.endswith(', which ended without releasing it.')


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'run'
  path.write_text('')
  with pytest.raises(ConfigError, match=f'--workdir={path} is a file, not a directory'):
    workdir.check_dir(str(path))
  with pytest.raises(ConfigError, match=f'--workdir={tmp_path / "nope"} does not exist'):
    workdir.read_config(str(tmp_path / 'nope'))
  assert not (tmp_path / 'nope').exists()


def test_config_changes_split_resumable_fields():
  old = ml_collections.ConfigDict({'train': {'num_epochs': 2, 'batch_size': 8}, 'seed': 0})
  new = ml_collections.ConfigDict({'train': {'num_epochs': 3, 'batch_size': 8}, 'seed': 1})
  assert workdir.config_changes(old, new) == (['seed: 0 -> 1'], ['train.num_epochs: 2 -> 3'])
  assert workdir.config_changes(old, old) == ([], [])


def test_metric_logger_purges_resumed_steps_and_writes_one_value_per_tag_and_step(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  logger = workdir.MetricLogger(str(tmp_path), resume_step=0)
  for step in (1, 2, 3):
    logger.write(step, epoch=step / 2, train_loss=10.0 + step)
    if step == 2:  # an epoch end: the evaluation line repeats `epoch` at the same step
      logger.write(step, epoch=1.0, val_top1_error=0.5)
  logger.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "train_lo')  # the half-written line of a killed run

  assert workdir.MetricLogger(str(tmp_path), resume_step=2).close() is None  # logs nothing
  assert len(os.listdir(tmp_path / 'tensorboard')) == 1  # ... and leaves no event file
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [1, 2, 2]

  resumed = workdir.MetricLogger(str(tmp_path), resume_step=2)  # steps 3, 4 are gone
  resumed.write(3, epoch=1.5, train_loss=20.0)
  resumed.close()
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('train_loss')] == [
      (1, 11.0), (2, 12.0), (3, 20.0)]
  assert [(e.step, e.value) for e in events.Scalars('epoch')] == [(1, 0.5), (2, 1.0), (3, 1.5)]
  assert [(e.step, e.value) for e in events.Scalars('val_top1_error')] == [(2, 0.5)]


def test_write_atomic_replaces_whole(tmp_path):
  path = str(tmp_path / 'config.json')
  workdir.write_atomic(path, 'old')
  workdir.write_atomic(path, 'new')
  assert open(path).read() == 'new'
  with pytest.raises(UnicodeEncodeError):  # a write that fails half-way (or a stop signal)
    workdir.write_atomic(path, 'newer \ud800')
  assert open(path).read() == 'new'
  assert os.listdir(tmp_path) == ['config.json']  # no temporary file left


def test_stop_signal_is_raised_before_the_loop_where_nothing_mistakes_it(tmp_path, capsys,
                                                                         monkeypatch):
  """Before the loop a stop signal raises Stopped, but not inside an import nor `held()`, and a
  Stopped dropped in a `__del__` is raised again; in the loop it is only counted."""
  (tmp_path / 'signalled.py').write_text(
      'import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nimported = True\n')
  monkeypatch.syspath_prepend(str(tmp_path))

  class SignalsWhenCollected:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGINT)

  with workdir.StopSignal() as signals:
    import signalled  # noqa: F401 (the whole module ran: the signal waited for its end)
    assert signalled.imported and signals.early == signal.SIGTERM
    with pytest.raises(workdir.Stopped):
      signals.check()
  with workdir.StopSignal() as signals:
    with pytest.raises(workdir.Stopped):
      with signals.held():
        os.kill(os.getpid(), signal.SIGINT)
        held = True
    assert held
  with workdir.StopSignal() as signals:
    SignalsWhenCollected()  # collected at once: its Stopped is dropped there, silently
    with pytest.raises(workdir.Stopped):
      signals.looping()  # ... and raised here
  assert capsys.readouterr().err == ''
  with workdir.StopSignal() as signals:
    signals.looping()
    for signum in (signal.SIGINT, signal.SIGTERM):  # (SIGHUP would silence a terminal: pytest -s)
      os.kill(os.getpid(), signum)
    assert (signals.received, signals.count) == (signal.SIGTERM, 2)
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_an_older_config_json_reads_with_the_values_its_run_had(tmp_path):
  """config.json files written before model.width/init/lrn_scope and dataset.eval_resize existed:
  their runs had width 1, the paper's init, LRN across all channels and the paper's eval resize."""
  from configs import default
  from alexnet_jax import models
  stored = json.loads(default.get_config().to_json_best_effort())
  for field in workdir.ADDED:
    *section, name = field.split('.')
    del (stored[section[0]] if section else stored)[name]
  stored['model']['dtype'] = 'bfloat16'
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  config = workdir.read_config(str(tmp_path))
  model = models.from_config(config.model, num_classes=3)
  assert (model.width, model.init_scheme, model.lrn_scope, model.dtype, model.num_classes) == (
      1.0, 'paper', 'all', jnp.bfloat16, 3)
  assert (config.dataset.eval_resize, config.model_parallel) == ('paper', 1)
  # Resuming it with the new default lrn_scope is a change; with the value it had, none.
  current = default.get_config()
  current.model.dtype = 'bfloat16'
  assert workdir.config_changes(config, current)[0] == ["model.lrn_scope: 'all' -> 'tower'"]
  current.model.lrn_scope = 'all'
  assert workdir.config_changes(config, current) == ([], [])
