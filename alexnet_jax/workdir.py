"""What a run directory holds besides checkpoints, and the rules for touching it.

`WORKDIR/lock`          held (flock) by the one run training there; names its host, pid and start.
`WORKDIR/config.json`   the config of the first start; a later start with a different config is
                        refused (fields in RESUMABLE may change).
`WORKDIR/class_names.txt`  the data set's class names, one a line in label order (for `predict`).
`WORKDIR/metrics.jsonl` and `WORKDIR/tensorboard/`  the metrics (`MetricLogger`).

A run writes nothing here until every check has passed; commands that only read a workdir
(evaluate, predict, plot, `init.checkpoint`) never create anything in it. Small files are written
whole or not at all (`write_atomic`), so a kill at any moment leaves either the old or the new one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import time
from typing import Any, Iterator, Sequence

import ml_collections

from alexnet_jax import terminal
from alexnet_jax.errors import ConfigError, Interrupted

# Fields a resumed run may change: run length, logging, paths, and how devices share the work.
RESUMABLE = ('parallelism', 'dataset.data_dir', 'dataset.manual_dir', 'train.num_epochs',
             'train.num_train_steps', 'train.log_every_steps', 'train.checkpoint_every_steps',
             'train.checkpoint_max_to_keep', 'train.allow_config_change', 'train.on_nonfinite',
             'train.eval_batch_size', 'train.profile_steps', 'model_parallel',
             'train.pause_at_epoch')
# Fields of earlier versions that never changed what a run computes (a test hook), so a workdir
# whose config.json still has them resumes.
RETIRED = ('train.debug_nan_step',)
# Fields added since, with the value a run whose config.json lacks them ran with: a stored config
# is read with them filled in, so an older run evaluates, predicts and resumes as it was trained
# (resuming it with another value is a config change like any other).
ADDED = {'model.width': 1.0, 'model.init': 'paper', 'model.lrn_scope': 'all',
         'dataset.eval_resize': 'paper', 'model_parallel': 1, 'dataset.process_reads': 'shard',
         'train.pause_at_epoch': 0}
# Metrics measured in wall-clock time: the only ones a resumed or repeated run does not reproduce.
WALL_CLOCK_METRICS = ('images_per_second', 'input_wait_fraction')
CONFIG = 'config.json'
CLASS_NAMES = 'class_names.txt'
LOCK = 'lock'


def check_dir(workdir: str, flag: str = '--workdir') -> None:
  """A workdir is a directory or does not exist yet."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'{flag}={workdir} is a file, not a directory; pass a directory.')


def check_readable(workdir: str, flag: str = '--workdir') -> None:
  """A workdir someone wants to read from: an existing directory."""
  check_dir(workdir, flag)
  if not os.path.isdir(workdir):
    raise ConfigError(f'{flag}={workdir} does not exist; pass the directory of a training run '
                      f'(or of python -m alexnet_jax.convert_torchvision).')


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`; a failure or
  a stop signal on the way leaves no temporary file."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _is_main_process() -> bool:
  import jax  # here, not at the top: main.py imports this module (StopSignal) before JAX loads
  return jax.process_index() == 0


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    flat.update(_flatten(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return flat


def differences(stored: ml_collections.ConfigDict | dict,
                current: ml_collections.ConfigDict | dict) -> list[str]:
  """Every field whose value differs, as 'field: old -> new', sorted by field."""
  as_flat = lambda c: _flatten(json.loads(c.to_json_best_effort()) if isinstance(
      c, ml_collections.ConfigDict) else c)
  stored, current = as_flat(stored), as_flat(current)
  return [f'{k}: {stored.get(k)!r} -> {current.get(k)!r}'
          for k in sorted(set(stored) | set(current))
          if k not in RETIRED and stored.get(k) != current.get(k)]


def config_changes(stored: ml_collections.ConfigDict | dict,
                   current: ml_collections.ConfigDict | dict) -> tuple[list[str], list[str]]:
  """(fields that differ and may not change on resume, fields that differ but may), each as
  'field: old -> new'."""
  changes = differences(stored, current)
  resumable = lambda change: change.split(':')[0] in RESUMABLE
  return ([c for c in changes if not resumable(c)], [c for c in changes if resumable(c)])


def stored_config_dict(workdir: str) -> dict[str, Any] | None:
  """The stored config.json as a dict (fields in `ADDED` filled in), or None if there is none."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  for field, value in ADDED.items():
    *section, name = field.split('.')
    (stored.get(section[0], {}) if section else stored).setdefault(name, value)
  return stored


def read_config(workdir: str, flag: str = '--workdir') -> ml_collections.ConfigDict:
  """The config a workdir was trained (or imported) with (`flag`: how the CLI names it)."""
  check_readable(workdir, flag)
  stored = stored_config_dict(workdir)
  if stored is None:
    raise ConfigError(f'{workdir} has no {CONFIG}: not a training workdir nor the output of '
                      f'python -m alexnet_jax.convert_torchvision.')
  return ml_collections.ConfigDict(stored)


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose run used another config (see `RESUMABLE`)."""
  stored = stored_config_dict(workdir)
  if stored is None:
    return
  changed, _ = config_changes(stored, config)
  if changed and not config.train.allow_config_change:
    raise ConfigError(
        f'workdir {workdir} holds a run with a different config ({", ".join(changed[:3])}'
        f'{", ..." if len(changed) > 3 else ""}); use a fresh --workdir, or pass '
        f'--config.train.allow_config_change=True to continue it with the new config.')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config of the run (once all checks passed); the next start compares to it."""
  if _is_main_process():
    os.makedirs(workdir, exist_ok=True)
    write_atomic(os.path.join(workdir, CONFIG), config.to_json_best_effort(indent=2))


def write_class_names(workdir: str, names: Sequence[str]) -> None:
  if _is_main_process():
    os.makedirs(workdir, exist_ok=True)
    write_atomic(os.path.join(workdir, CLASS_NAMES), ''.join(f'{name}\n' for name in names))


def read_class_names(workdir: str) -> list[str] | None:
  """The class names written beside the checkpoints, or None if the workdir has none."""
  path = os.path.join(workdir, CLASS_NAMES)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().splitlines()


class Lock:
  """One live run per workdir: an exclusive `flock` on `WORKDIR/lock` for the run's life.

  The kernel drops the lock when its process dies (even by SIGKILL), so a restart after a crash
  is never blocked; the file's text (host, pid, start time) names the holder in the refusal, and
  is cleared on a clean exit, so a start that finds text there took over from a run that died.
  In multi-host runs process 0 holds it for all. Needs a file system with working `flock` (local
  disks, NFSv4, Lustre with flock enabled).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._fd: int | None = None

  def acquire(self) -> str | None:
    """Takes the lock; returns a one-line note if it took over from a run that died, raises
    Interrupted if a live run holds it (not the config's fault: the same command starts once
    that run has ended)."""
    if not _is_main_process():
      return None
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 1000).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise Interrupted(f'workdir {os.path.dirname(self.path)} is in use by {holder} (holder '
                        f'of {self.path}); wait for that run to end or stop it, or use another '
                        f'--workdir.') from None
    self._fd = fd  # held from here: `release` clears whatever a stop signal leaves written
    previous = os.read(fd, 1000).decode(errors='replace').strip()
    me = (f'pid {os.getpid()} on {socket.gethostname()} since '
          f'{datetime.datetime.now().isoformat(sep=" ", timespec="seconds")}')
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode() + b'\n', 0)
    os.fsync(fd)
    return f'Took over {self.path} from {previous}, which ended without releasing it.' if (
        previous) else None

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self) -> 'Lock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def is_locked(workdir: str) -> bool:
  """Whether a live process holds `workdir`'s lock: a run is training there (e.g. a trial that a
  killed sweep left running). The probe holds a shared lock for an instant, so only ask about a
  run that is not starting at that moment."""
  path = os.path.join(workdir, LOCK)
  if not os.path.exists(path):
    return False
  fd = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)  # drops the probe's lock


class MetricLogger:
  """Writes metrics to `WORKDIR/metrics.jsonl` (one object a line) and TensorBoard event files.

  On resume from step s, lines past s (written after the checkpoint the run restarts from) are
  dropped, and this run's event file begins with TensorBoard's purge marker (a SessionLog START
  at s + 1) that hides every older event past s, so both read as if the run had never stopped.
  Events are written and flushed synchronously (tensorboardX's SummaryWriter queues them for a
  thread, which a kill can beat): what a checkpoint covers is on disk in both files before it.
  TensorBoard gets one value per tag and step (an evaluation line repeats `epoch` and
  `learning_rate` of the train line at its step: the first one is kept). The event file is
  created at the first write, so a start that logs nothing leaves none.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._workdir, self._resume_step = workdir, resume_step
    path = os.path.join(workdir, 'metrics.jsonl')
    lines = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line)['step'] <= resume_step:
              lines.append(line)
          except (ValueError, KeyError):  # the half-written last line of a killed run
            break
    write_atomic(path, ''.join(lines))
    self._jsonl = open(path, 'a')
    self._tb = None
    self._tb_last: dict[str, int] = {}

  def write(self, step: int, **scalars: float) -> None:
    if not self.enabled:
      return
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar
    scalars = {k: (v if isinstance(v, int) else float(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is None:
      os.makedirs(os.path.join(self._workdir, 'tensorboard'), exist_ok=True)
      # The suffix keeps two starts within one second apart, in start order (TensorBoard reads
      # the files sorted by name).
      self._tb = EventsWriter(os.path.join(self._workdir, 'tensorboard', 'events'),
                              f'.{time.time_ns()}')
      self._tb.write_event(Event(step=self._resume_step + 1, wall_time=time.time(),
                                 session_log=SessionLog(status=SessionLog.START)))
    event = Event(step=step, wall_time=time.time())
    for k, v in scalars.items():
      if self._tb_last.get(k) != step:
        event.summary.value.extend(scalar(k, v).value)
        self._tb_last[k] = step
    self._tb.write_event(event)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _importing(frame: Any) -> bool:
  """Whether the main thread is executing an import (Python's import machinery is on its stack)."""
  while frame is not None:
    if frame.f_code.co_filename.startswith('<frozen importlib'):
      return True
    frame = frame.f_back
  return False


class Stopped(BaseException):
  """A stop signal before the training loop began: it unwinds the start (every `with` releases
  what it holds) up to main, which says so and exits 0. A BaseException, as KeyboardInterrupt,
  so that no `except Exception` on the way (ours or a library's) takes it for an error."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class StopSignal:
  """The signals that stop a run: SIGINT (Ctrl-C), SIGTERM (kill, a scheduler's pre-emption) and
  SIGHUP (a closed terminal, a dropped ssh), from `with` on.

  Before `looping()` (the training loop begins) a signal raises `Stopped` where the main thread
  is (data preparation, building the model...): there is nothing to save yet. Not inside an
  import (a C extension initialising would turn it into its own ImportError, or print it and
  drop it) nor within `held()`: there it is raised once they are over (main's `check()` after
  its imports, the end of `held()`); one a library drops, by the next signal or `check()`, and
  `looping()` at the latest. From `looping()` on a signal only sets `received` and counts: the
  loop checkpoints at its next log step, or at once on a second signal (`cluster.Stop` decides
  when, for every process together). Main installs one as it starts; `train_and_evaluate`
  installs its own when called without one.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

  def __init__(self):
    self.received: int | None = None
    self.count = 0
    self.early: int | None = None  # the first signal before the loop
    self._raised = False  # a Stopped is on its way up: more signals do not interrupt it
    self._holding = self._looping = False

  def __enter__(self) -> 'StopSignal':
    self._terminals = terminal.terminals()
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable
    return self

  def check(self) -> None:
    """Raises `Stopped` if a signal came and was held or dropped on the way."""
    if self.early is not None:
      self._raised = True
      raise Stopped(self.early)

  @contextlib.contextmanager
  def held(self) -> Iterator[None]:
    """Within `with`, a signal before the loop is held, and raised at its end: for code that
    takes an exception inside it for something else (orbax: for a damaged checkpoint)."""
    self._holding = True
    try:
      yield
    finally:
      self._holding = False
    self.check()

  def looping(self) -> None:
    """The training loop begins: from now on a signal stops it at a step, with a checkpoint."""
    self.check()
    self._looping = True

  def _handle(self, signum, frame) -> None:
    if signum == signal.SIGHUP:
      terminal.leave(self._terminals)  # the run goes on to save, silently
    self.received = signum
    self.count += 1
    if self._looping or self._raised:
      return
    self.early = self.early or signum
    if not (self._holding or _importing(frame)):
      self._raised = True
      raise Stopped(signum)

  def _unraisable(self, unraisable: Any) -> None:
    """A Stopped raised in a `__del__` or a gc callback (JAX runs one at every collection) is
    dropped there, silently: it is raised again by the next `check()` or signal."""
    if isinstance(unraisable.exc_value, Stopped):
      self._raised = False
    else:
      self._previous_hook(unraisable)

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    if sys.unraisablehook == self._unraisable:  # else a later hook calls this one: keep it
      sys.unraisablehook = self._previous_hook
