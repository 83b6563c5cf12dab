"""Where a sweep's trials run: local processes, or SLURM jobs submitted with submitit; one small
interface, so that whoever runs trials does not know which launcher it has.

A `Task` is one command run in its own directory. A launcher

    launcher.submit(tasks)   starts (or queues) them now; callable again at any time, with any
                             tasks (a search submits one trial at a time)
    launcher.poll()          {task name: Status} of every task it knows, with no waiting: those
                             submitted through it, those it adopted, and (SLURM) those submitted
                             through an earlier controller on the same directory, re-attached
                             from its records
    launcher.adopt(tasks)    the names of those tasks whose command an earlier controller started
                             and that still run (local processes that outlived a killed
                             controller): polled, and sent signals, as if submitted here
    launcher.stop(signum)    a signal reached the controller: local tasks get it once (they save
                             a checkpoint and exit) and no queued one starts; SLURM jobs go on
    launcher.detached        whether its tasks go on without the controller (SLURM: True)
    launcher.stopping        set by the controller's `Relay` the moment a signal arrives: the
                             launcher gives up waiting on anything (SLURM: retries of a failing
                             squeue or sbatch) and `poll` returns what it knows

A task's states: 'queued', 'running', and how it ended (alexnet_jax/errors.py says how a run
reports each): 'done' (exit 0: a sweep's trial finished, a search's trial paused at its rung),
'failed' (its config is the cause: a `ConfigError`, a non-finite stop, an exception, or the same
interruption twice in a row; `Status.error` is its error line; it runs again only when asked),
'interrupted' (a cause outside its config: SIGKILL from the OOM killer, a full disk, a lost lock
race; it resumes when submitted again) and 'stopped' (a signal stopped it: Ctrl-C, SLURM's time
limit, pre-emption or scancel; or it ended with no verdict recorded: its controller was killed,
its SLURM job vanished; it resumes when submitted again). What
the task wrote is in its directory, which `poll` reads once a task is not queued or running:
`log.txt` (the command's output, appended), `done`, `error.txt` or `interrupted.txt` (the
error line), and `launched.json` (the pid of its running command).

SLURM's troubles are errors of their own: `ClusterError` (an `Interrupted`: its commands kept
failing for --slurm_retry_minutes; the jobs go on) and a ConfigError naming the flag to change
when its jobs wait for what the cluster never gives (more CPUs than a node has).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import getpass
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, NoReturn, Protocol, Sequence, TypeVar

from alexnet_jax import terminal
from alexnet_jax.errors import EXIT_INTERRUPTED, STOPPED, ConfigError, Interrupted

_T = TypeVar('_T')

STATES = ('queued', 'running', 'done', 'failed', 'interrupted', 'stopped')
LIVE = STATES[:2]  # the launcher still has them


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # unique among the controller's tasks
  command: list[str]  # argv; a leading 'python' runs with this Python
  directory: str  # the task's own: log.txt, done, error.txt (and whatever the command writes)


@dataclasses.dataclass(frozen=True)
class Status:
  state: str  # one of STATES
  error: str = ''  # 'failed', 'interrupted': the error line
  log: str = ''  # the launcher's own log of the task (SLURM: the job's output file), if any
  reason: str = ''  # 'queued': why it waits, if the launcher knows (SLURM: squeue's reason)


class Launcher(Protocol):
  detached: bool
  stopping: bool

  def submit(self, tasks: Sequence[Task]) -> None: ...

  def poll(self) -> dict[str, Status]: ...

  def adopt(self, tasks: Sequence[Task]) -> set[str]: ...

  def stop(self, signum: int) -> None: ...


# What ends a controller, a trial or a run: Ctrl-C, `kill`/SLURM's notice, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Relay:
  """A controller's signals: within `with`, each stop signal is recorded in `received` and sets
  `launcher.stopping` at once (the controller stops starting work, a SLURM launcher stops
  retrying); `pass_on()` hands each to the launcher once, from the controller's loop (local
  trials save a checkpoint and exit; a detached launcher's SLURM jobs go on without the
  controller). Trials run in their own sessions, so this relay is the only way a terminal's
  Ctrl-C reaches them: one keystroke, one stop."""

  def __init__(self, launcher: Launcher):
    self.launcher, self.received, self._passed = launcher, [], 0

  def __enter__(self) -> 'Relay':
    self._terminals = terminal.terminals()
    self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGHUP:
      terminal.leave(self._terminals)  # the controller goes on to stop its trials and report
    self.received.append(signum)
    self.launcher.stopping = True

  def pass_on(self) -> None:
    while len(self.received) > self._passed and not self.launcher.detached:
      self.launcher.stop(self.received[self._passed])
      self._passed += 1

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


_ERROR_LINE = re.compile(r'^(?:[\w.]*(?:Error|Exception|Exit)\b|FATAL\b|error:)')


def error_line(log: str, returncode: int) -> str:
  """The line of a failed command's output that says what went wrong."""
  lines = [l.strip() for l in re.split(r'[\r\n]+', log) if l.strip()]
  matches = [l for l in lines if _ERROR_LINE.match(l)]
  line = matches[-1] if matches else (lines[-1] if lines else 'no output')
  return f'exit code {returncode}: {line}'


def done_path(directory: str) -> str:
  return os.path.join(directory, 'done')


def error_path(directory: str) -> str:
  return os.path.join(directory, 'error.txt')


def interrupted_path(directory: str) -> str:
  return os.path.join(directory, 'interrupted.txt')


def _launched_path(directory: str) -> str:
  return os.path.join(directory, 'launched.json')


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except FileNotFoundError:
    return None


def finished(directory: str) -> Status:
  """A task that is not queued nor running, from what it left in its directory."""
  if os.path.exists(done_path(directory)):
    return Status('done')
  for state, path in (('failed', error_path), ('interrupted', interrupted_path)):
    text = _read(path(directory))
    if text is not None:
      return Status(state, text)
  return Status('stopped')


def _clear(task: Task) -> None:
  """Before a (re)start: the task's earlier verdict no longer holds (`run_task` reads an earlier
  interruption itself)."""
  for path in (done_path(task.directory), error_path(task.directory)):
    if os.path.exists(path):
      os.remove(path)


def _start_time(pid: int) -> str | None:
  """When process `pid` started (clock ticks since boot, /proc/PID/stat's field 22): with the
  pid, it names one process, not a later one that reuses the pid. None if there is none."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def alive(directory: str) -> int | None:
  """The pid of the task's command if it still runs on this host (an earlier controller started
  it and was killed), else None."""
  try:
    with open(_launched_path(directory)) as f:
      launched = json.load(f)
  except (OSError, ValueError):
    return None
  if launched.get('host') != socket.gethostname():
    return None
  pid = launched.get('pid')
  return pid if _start_time(pid) == launched.get('start') else None


def _verdict(returncode: int, output: str, stopped: bool, previous: str | None) -> Status:
  """How a task's command ended (alexnet_jax/errors.py: how a run says it)."""
  if stopped or any(line.startswith(STOPPED) for line in output.splitlines()):
    return Status('stopped')
  if returncode == 0:
    return Status('done')
  if returncode < 0:  # killed: the OOM killer, kill -9, a node going down
    name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else '?'
    return Status('interrupted', f'killed by {name} (exit code {returncode})')
  error = error_line(output, returncode)
  if returncode != EXIT_INTERRUPTED:
    return Status('failed', error)
  if error == previous:  # no progress between the two (the line names where it stopped)
    return Status('failed', f'{error} (the same interruption twice in a row)')
  return Status('interrupted', error)


def run_task(task: Task, stopped: Callable[[], bool],
             started: Callable[[subprocess.Popen], None] = lambda process: None) -> Status:
  """Runs the task's command to its end, its output appended to `log.txt`, and records how it
  ended (`_verdict`): `done`, `error.txt` or `interrupted.txt` (its error line), or nothing when
  it was stopped (`stopped()`: a signal reached whoever runs it). The command runs in a session
  of its own, so a terminal's signals reach only the controller, which passes them on
  (`started` receives the process for that)."""
  os.makedirs(task.directory, exist_ok=True)
  previous = _read(interrupted_path(task.directory))  # the last start's interruption
  if previous is not None:
    os.remove(interrupted_path(task.directory))
  log_path = os.path.join(task.directory, 'log.txt')
  command = [sys.executable, *task.command[1:]] if task.command[0] == 'python' else task.command
  with open(log_path, 'a') as log:
    log.write(f'$ {shlex.join(task.command)}\n')
    log.flush()
    begin = log.tell()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={'TF_CPP_MIN_LOG_LEVEL': '3', **os.environ},
                               start_new_session=True)
    _write(_launched_path(task.directory), json.dumps(
        {'pid': process.pid, 'start': _start_time(process.pid), 'host': socket.gethostname()}))
    started(process)
    returncode = process.wait()
  with open(log_path) as f:
    f.seek(max(begin, os.path.getsize(log_path) - 20_000))
    status = _verdict(returncode, f.read(), stopped(), previous)
  path = {'done': done_path, 'failed': error_path, 'interrupted': interrupted_path}.get(
      status.state)
  if path is not None:
    _write(path(task.directory), status.error + '\n' if status.error else '')
  os.remove(_launched_path(task.directory))
  return status


def _write(path: str, text: str) -> None:
  """Whole or not at all: a kill leaves the old file or the new one."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class Local:
  """Tasks as child processes, `parallel` at a time, in submission order; and processes an
  earlier controller started (`adopt`)."""

  detached = False

  def __init__(self, parallel: int):
    if parallel < 1:
      raise ConfigError(f'--parallel={parallel}; it must be at least 1.')
    self.pool = concurrent.futures.ThreadPoolExecutor(parallel)
    self.lock = threading.Lock()
    self.statuses: dict[str, Status] = {}
    self.processes: set[subprocess.Popen] = set()
    self.adopted: dict[str, str] = {}  # task name: its directory
    self.signals: list[int] = []  # passed on, in order: a process started later gets them too
    self.stopping = False

  def submit(self, tasks: Sequence[Task]) -> None:
    for task in tasks:
      _clear(task)
      with self.lock:
        self.adopted.pop(task.name, None)
        self.statuses[task.name] = Status('queued')
      self.pool.submit(self._run, task)

  def adopt(self, tasks: Sequence[Task]) -> set[str]:
    names = {task.name for task in tasks if alive(task.directory)}
    with self.lock:
      self.adopted.update({t.name: t.directory for t in tasks if t.name in names})
    return names

  def _run(self, task: Task) -> None:
    status = Status('stopped')
    try:
      with self.lock:
        if self.stopping:
          return
        self.statuses[task.name] = Status('running')
      status = run_task(task, lambda: self.stopping, self._started)
    except Exception as e:  # its directory gone, a fork refused: the task ends all the same
      status = Status('interrupted', f'the launcher could not run it: {type(e).__name__}: {e}')
    finally:
      with self.lock:
        self.processes.difference_update(p for p in list(self.processes) if p.poll() is not None)
        self.statuses[task.name] = status

  def _started(self, process: subprocess.Popen) -> None:
    with self.lock:
      self.processes.add(process)
      for signum in self.signals:  # those that came while it started
        process.send_signal(signum)

  def poll(self) -> dict[str, Status]:
    with self.lock:
      adopted = dict(self.adopted)
      statuses = dict(self.statuses)
    for name, directory in adopted.items():
      statuses[name] = Status('running') if alive(directory) else finished(directory)
    return statuses

  def stop(self, signum: int) -> None:
    with self.lock:
      self.stopping = True
      self.signals.append(signum)
      for process in self.processes:
        if process.poll() is None:
          process.send_signal(signum)
      adopted = list(self.adopted.values())
    for directory in adopted:
      pid = alive(directory)
      if pid is not None:
        os.kill(pid, signum)


@dataclasses.dataclass(frozen=True)
class SlurmResources:
  """What every trial's job asks for (sbatch's options of the same names)."""
  partition: str | None = None
  gpus: int = 0  # per trial (--gpus-per-node; a trial is one process on one node)
  cpus: int = 1  # --cpus-per-task
  mem_gb: float = 0  # --mem (0: the partition's default)
  time_min: int = 24 * 60  # --time
  signal_s: int = 120  # SIGTERM this long before the time limit: the trial saves a checkpoint
  options: tuple[str, ...] = ()  # more sbatch options, as on its command line: '--qos=high'
  retry_minutes: float = 5  # how long SLURM's commands are retried while they fail (transient)


class ClusterError(Interrupted):
  """SLURM's commands kept failing for --slurm_retry_minutes (slurmctld down or restarting, the
  network, a submit limit): not the config's fault (exit 75); the jobs already submitted go on
  and the same command re-attaches to them."""


class _Failed(Exception):
  """One try of a SLURM command failed in a way that may pass; the message is SLURM's."""


# Failures that pass: slurmctld down, restarting or overloaded, the network, munge, a per-user
# or per-account submit limit (AssocMaxSubmitJobLimit, QOSMaxSubmitJobPerUserLimit: the user's
# own jobs ending frees it). Any other sbatch refusal is the flags' (an invalid partition, more
# memory than a node has, an unknown option, a QOS or time limit): one line at once.
_TRANSIENT = re.compile(
    r'Unable to contact slurm controller|Socket timed out|Resource temporarily unavailable|'
    r'temporarily unable|Connection (?:refused|reset|timed out)|Transport endpoint|'
    r'Zero Bytes were transmitted|standby mode|Communication connection failure|MaxSubmitJob',
    re.IGNORECASE)
# squeue's pending reasons that waiting cannot clear: the job asks more than its partition's
# nodes have or allow (CPUs, memory, GPUs, time, a --constraint), or what its QOS or account
# never gives one job. Every other reason clears in time and is only shown: Resources, Priority,
# BeginTime, JobArrayTaskLimit, Dependency, nodes DOWN, DRAINED or reserved, ReqNodeNotAvail and
# PartitionNodeLimit (which SLURM also gives for those: a maintenance ends, and a restarted
# slurmctld says ReqNodeNotAvail until slurmd registers again), PartitionDown/Inactive, the
# Assoc*/QOS* group and per-user limits (the user's other jobs end).
_HOPELESS = re.compile(r'PartitionConfig|PartitionTimeLimit|BadConstraints|InvalidQOS|'
                       r'InvalidAccount|(?:Assoc|QOS)Max\w*PerJob\w*|QOSMin\w+')
_QUEUED = ('PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'CONFIGURING')
_COMMAND_TIMEOUT_S = 120  # a SLURM command that has not answered by then is killed: a failed try
_STOP_GRACE_S = 1  # a stopping controller waits this long for a squeue or sinfo that hangs
_MAX_DELAY_S = 60  # between tries: 1 s, doubling up to this
# The controller's sbatch, in a process of its own session: what submit_main reads on stdin.
_SUBMIT = 'from alexnet_jax import launchers; launchers.submit_main()'


def _sbatch_options(options: Sequence[str]) -> dict[str, Any]:
  """'--key=value' and '--flag' (as on sbatch's command line) as submitit wants them."""
  out = {}
  for option in options:
    match = re.fullmatch(r'--([\w-]+)(?:=(.*))?', option)
    if not match:
      raise ConfigError(f'--slurm_option={option!r} is not an sbatch option such as '
                        f'--qos=high or --exclusive; write it as on sbatch\'s command line.')
    out[match.group(1)] = True if match.group(2) is None else match.group(2)
  return out


def check_slurm() -> None:
  """SLURM's commands are here; else the one line a user can act on."""
  absent = [c for c in ('sbatch', 'squeue', 'srun') if shutil.which(c) is None]
  if absent:
    raise ConfigError(f'--launcher=slurm needs SLURM ({", ".join(absent)} not found on PATH); '
                      f'run the sweep on a SLURM login node, or use --launcher=local.')


def _said(stderr: str, returncode: int) -> str:
  """What a failed SLURM command said: its first error line (sbatch: 'sbatch: error: ...')."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  said = [l for l in lines if 'error:' in l] or lines[-1:] or [f'exit code {returncode}']
  return said[0][:300]


def _count(text: str) -> int:
  """The number a sinfo field starts with ('8', '8000+'); 0 for none ('(null)')."""
  return int(re.match(r'\d*', text).group() or 0)


def _minutes(limit: str) -> int | None:
  """sinfo's time limit ('infinite', '30:00', '2:00:00', '1-00:00:00') in whole minutes."""
  match = re.fullmatch(r'(?:(\d+)-)?(?:(\d+):)?(\d+):\d+', limit)
  if not match:
    return None
  days, hours, minutes = (int(g or 0) for g in match.groups())
  return (days * 24 + hours) * 60 + minutes


class _Job(NamedTuple):
  """One of the user's jobs, as squeue shows it."""
  state: str  # PENDING, RUNNING...
  partition: str
  reason: str  # why it is pending ('None' once it runs)
  name: str


class Slurm:
  """Each `submit` is one SLURM job array (one job per task, at most `parallel` of them running
  at once), submitted with submitit into `directory`/ (job scripts, pickles, one log per job).

  What was submitted is recorded in `directory`/jobs.jsonl before and after each sbatch (the
  tasks in array order, then the job ids); `poll` reads it, so a new controller on the same
  directory re-attaches. States come from `squeue` (no accounting, no `sacct` needed) and, for a
  job no longer in the queue, from its task's directory; a queued task's `Status.reason` is
  squeue's. An array whose ids were never recorded (the controller died during sbatch) is found
  by its job name in the queue.

  SLURM's commands run in their own session: the signals a terminal or `timeout` sends to the
  controller's process group do not reach them. A command failing in a way that may pass
  (slurmctld restarting, a timeout, a submit limit) is tried again, with one `say` line each,
  for at most `resources.retry_minutes`; then `ClusterError`. Once `stopping` is set (the
  controller's signal relay sets it) the tries end at once and `poll` returns what it knows.
  Jobs pending for a reason waiting cannot clear (their partition's nodes have fewer CPUs than
  they ask...) are cancelled, and `poll` raises the ConfigError naming the flag to change.
  """

  detached = True

  def __init__(self, directory: str, parallel: int, resources: SlurmResources,
               say: Callable[[str], None] = print):
    check_slurm()
    if parallel < 1:
      raise ConfigError(f'--parallel={parallel}; it must be at least 1.')
    if resources.retry_minutes < 0:
      raise ConfigError(f'--slurm_retry_minutes={resources.retry_minutes:g}; it must be at '
                        f'least 0.')
    self.directory, self.parallel, self.resources, self.say = directory, parallel, resources, say
    self.records = os.path.join(directory, 'jobs.jsonl')
    self.options = _sbatch_options(resources.options)
    self.stopping = False
    self._known: dict[str, _Job] | None = None  # the queue squeue last showed

  def _record(self, entry: dict[str, Any]) -> None:
    os.makedirs(self.directory, exist_ok=True)
    with open(self.records, 'a') as f:
      f.write(json.dumps(entry) + '\n')
      f.flush()
      os.fsync(f.fileno())

  def _run(self, command: list[str], stdin: str = '', interruptible: bool = True,
           env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """One try of a SLURM command in its own session: (exit status, stdout, stderr). A command
    that hangs is killed after _COMMAND_TIMEOUT_S (an `interruptible` one soon after `stopping`
    is set; sbatch is left to finish: a job array half submitted is worse than a late stop)."""
    try:
      process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
    except OSError as e:
      raise _Failed(f'{command[0]}: {e.strerror}') from None
    deadline = time.monotonic() + _COMMAND_TIMEOUT_S
    while True:
      try:
        out, err = process.communicate(stdin or None, timeout=0.1)
        return process.returncode, out, err
      except subprocess.TimeoutExpired:
        stdin = ''  # sent already
      if self.stopping and interruptible:
        deadline = min(deadline, time.monotonic() + _STOP_GRACE_S)
      if time.monotonic() > deadline:
        os.killpg(process.pid, signal.SIGKILL)  # its session's group: sbatch under the submitter
        process.communicate()
        raise _Failed(f'{os.path.basename(command[0])} did not answer within '
                      f'{_COMMAND_TIMEOUT_S} s')

  def _sleep(self, seconds: float) -> bool:
    """Sleeps in short slices; True (at once) if the controller is stopping."""
    end = time.monotonic() + seconds
    while not self.stopping and time.monotonic() < end:
      time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    return self.stopping

  def _retrying(self, what: str, attempt: Callable[[], _T]) -> _T | None:
    """`attempt()`, tried again while it fails in a way that may pass (`_Failed`), 1 s, 2 s,
    4 s... apart with one line each, for at most retry_minutes; then ClusterError. None once
    the controller is stopping: it reports what it knows instead of a cluster error."""
    minutes = self.resources.retry_minutes
    deadline, delay = time.monotonic() + 60 * minutes, 1.0
    while True:
      try:
        return attempt()
      except _Failed as e:
        said = str(e)
      left = deadline - time.monotonic()
      if self.stopping:
        return None
      if left <= 0:
        raise ClusterError(
            f'{what} failed{f" for {minutes:g} minutes" if minutes else ""} '
            f'(--slurm_retry_minutes={minutes:g}): {said}. The jobs already submitted go on; the '
            f'same command re-attaches to them (and submits the rest) once SLURM answers.')
      wait = min(delay, left)
      self.say(f'SLURM: {what} failed ({said}); trying again in {wait:.3g} s, for at most '
               f'--slurm_retry_minutes={minutes:g}.')
      delay = min(2 * delay, _MAX_DELAY_S)
      if self._sleep(wait):
        return None

  def submit(self, tasks: Sequence[Task]) -> None:
    if not tasks:
      return
    for task in tasks:
      _clear(task)
    r = self.resources
    name = f'alexnet_jax-{uuid.uuid4().hex[:12]}'
    self._record({'name': name, 'tasks': [dataclasses.asdict(t) for t in tasks]})
    parameters = dict(
        job_name=name, time=r.time_min, cpus_per_task=r.cpus, array_parallelism=self.parallel,
        stderr_to_stdout=True, **({'partition': r.partition} if r.partition else {}),
        **({'gpus_per_node': r.gpus} if r.gpus else {}),
        **({'mem': f'{int(r.mem_gb * 1024)}M'} if r.mem_gb else {}),
        additional_parameters={'requeue': True, 'signal': f'TERM@{r.signal_s}', **self.options})
    request = json.dumps({'folder': self.directory, 'parameters': parameters,
                          'tasks': [dataclasses.asdict(t) for t in tasks]})
    jobs = self._retrying('sbatch', lambda: self._sbatch(request))
    if jobs is not None:  # None: stopped before SLURM took them; a rerun submits them
      self._record({'name': name, 'jobs': jobs})

  def _sbatch(self, request: str) -> list[str]:
    """One try of submit_main (submitit's sbatch) in its own session: the job ids."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # alexnet_jax's, for
    path = os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH')) if p)  # it and jobs
    code, out, err = self._run([sys.executable, '-c', _SUBMIT], request, interruptible=False,
                               env={**os.environ, 'PYTHONPATH': path})
    if code == 0:
      return json.loads(out.strip().splitlines()[-1])
    said = _said(err, code)
    if code < 0 or self.stopping or _TRANSIENT.search(err):  # killed, or SLURM's words for a
      raise _Failed(said)  # failure that passes (the retries end at once if stopping)
    raise ConfigError(f'sbatch refused the trials\' job array ({said}); fix --slurm_partition '
                      f'or the other --slurm_* flags.')

  def _slurm(self, *command: str) -> str:
    """One try of squeue, sinfo or scancel (any failure may pass: the arguments are ours)."""
    code, out, err = self._run(list(command))
    if code:
      raise _Failed(_said(err, code))
    return out

  def _queue(self) -> dict[str, _Job] | None:
    """{job id: _Job} of this user's jobs in SLURM's queue (squeue, retried); once stopping,
    the queue squeue last showed (None if none)."""
    out = self._retrying('squeue', lambda: self._slurm(
        'squeue', '-h', '-r', '-u', getpass.getuser(), '-o', '%i|%T|%P|%r|%j'))
    if out is not None:
      self._known = {i: _Job(*fields) for i, *fields in
                     (line.split('|', 4) for line in out.splitlines() if line.count('|') >= 4)}
    return self._known

  def poll(self) -> dict[str, Status]:
    if not os.path.exists(self.records):
      return {}
    submissions: dict[str, dict[str, Any]] = {}
    with open(self.records) as f:
      for line in f:
        try:
          entry = json.loads(line)
        except ValueError:  # a line cut short by a kill
          continue
        submissions.setdefault(entry['name'], {}).update(entry)
    queue = self._queue()
    statuses: dict[str, Status] = {}
    pending: dict[str, list[str]] = {}  # submission: the ids of its queued jobs
    hopeless: dict[str, _Job] = {}  # submission: a job of it pending for a reason that stays
    for name, submission in submissions.items():  # in submission order: the newest one wins
      tasks = [Task(**t) for t in submission.get('tasks', [])]
      jobs = submission.get('jobs') or self._find(name, len(tasks), queue or {})
      if jobs is None:
        continue  # never submitted (sbatch refused it), or long gone: its tasks' files tell
      for task, job_id in zip(tasks, jobs):
        log = os.path.join(self.directory, f'{job_id}_0_log.out')
        job = (queue or {}).get(job_id)
        status = dataclasses.replace(finished(task.directory), log=log)
        if queue is None and status.state == 'stopped':
          status = Status('queued', log=log)  # stopped before squeue ever answered: unknown
        elif job and job.state in _QUEUED:
          status = Status('queued', log=log, reason='' if job.reason == 'None' else job.reason)
          pending.setdefault(name, []).append(job_id)
          if _HOPELESS.fullmatch(job.reason):
            hopeless.setdefault(name, job)
        elif job:
          status = Status('running', log=log)
        statuses[task.name] = status
    if hopeless and not self.stopping:
      self._give_up(hopeless, pending)
    return statuses

  def _give_up(self, hopeless: Mapping[str, _Job], pending: Mapping[str, list[str]]) -> NoReturn:
    """Cancels every queued job of the arrays that can never start (all of an array's jobs ask
    the same) and raises the line that says which flag asks too much."""
    line = self._cannot_start(next(iter(hopeless.values())))
    ids = [job_id for name in hopeless for job_id in pending[name]]
    if self._retrying('scancel', lambda: self._scancel(ids)):
      raise ConfigError(f'{line} Their pending jobs were cancelled.')
    raise ConfigError(f'{line} Cancel their pending jobs: scancel {" ".join(ids)}')

  def _scancel(self, ids: Sequence[str]) -> bool:
    """One try of scancel (a job that ended meanwhile is no failure)."""
    code, _, err = self._run(['scancel', *ids], interruptible=False)
    if code and _TRANSIENT.search(err):
      raise _Failed(_said(err, code))
    return True

  def _cannot_start(self, job: _Job) -> str:
    """Why jobs pending for `job.reason` never start: the flags that ask more than the nodes of
    their partition have or allow (sinfo), or, if none does, all of them."""
    r, partition = self.resources, job.partition
    try:
      out = self._slurm('sinfo', '-h', '-N', '-p', partition, '-o', '%c|%m|%G|%l')
    except _Failed:
      out = ''  # the limits unknown: the line names every flag
    nodes = [line.split('|') for line in out.splitlines() if line.count('|') == 3]
    asked = []  # (the flag that asks too much, what to pass instead)
    if nodes:
      where = f'the nodes of partition {partition}'
      cpus, mem = (max(_count(n[k]) for n in nodes) for k in (0, 1))
      gpus = max(sum(map(int, re.findall(r'gpu(?::[^:,(]+)?:(\d+)', n[2]))) for n in nodes)
      limit = _minutes(nodes[0][3])
      if r.cpus > cpus:
        asked.append((f'--slurm_cpus={r.cpus} but {where} have at most {cpus} CPUs',
                      f'--slurm_cpus={cpus} or less'))
      if r.gpus > gpus:
        asked.append((f'--slurm_gpus={r.gpus} but {where} have at most {gpus} GPUs',
                      f'--slurm_gpus={gpus} or less' if gpus else 'another --slurm_partition'))
      if int(r.mem_gb * 1024) > mem:
        asked.append((f'--slurm_mem_gb={r.mem_gb:g} but {where} have at most {mem} MB',
                      f'--slurm_mem_gb={math.floor(mem / 1024 * 100) / 100:g} or less'))
      if limit is not None and r.time_min > limit:
        asked.append((f'--slurm_time={r.time_min} but partition {partition} allows at most '
                      f'{limit} minutes', f'--slurm_time={limit} or less'))
    if asked:
      return (f"the trials' jobs cannot start: {' and '.join(a for a, _ in asked)} (squeue: "
              f"{job.reason}); pass {' and '.join(fix for _, fix in asked)}.")
    flags = ' '.join([f'--slurm_cpus={r.cpus}', f'--slurm_gpus={r.gpus}',
                      f'--slurm_mem_gb={r.mem_gb:g}', f'--slurm_time={r.time_min}',
                      *(f'--slurm_option={o}' for o in r.options)])
    return (f"the trials' jobs cannot start in partition {partition} (squeue: {job.reason}): it "
            f"never gives what they ask; change --slurm_partition or the --slurm_* flags "
            f"({flags}).")

  @staticmethod
  def _find(name: str, count: int, queue: Mapping[str, _Job]) -> list[str] | None:
    """The job ids of submission `name`, from the queue (the controller died during sbatch)."""
    ids = [i for i, job in queue.items() if job.name == name]
    if not ids:
      return None
    array = ids[0].split('_')[0]
    return [array] if count == 1 else [f'{array}_{k}' for k in range(count)]

  def adopt(self, tasks: Sequence[Task]) -> set[str]:
    del tasks  # `poll` re-attaches to every job its records name
    return set()

  def stop(self, signum: int) -> None:
    del signum  # the jobs go on; the same command re-attaches to them
    self.stopping = True


def submit_main() -> None:
  """The controller's sbatch (`Slurm._sbatch` runs it in its own session): submits the job array
  of the JSON request on stdin with submitit and prints the job ids as JSON; sbatch's own words
  on stderr if it refuses."""
  import submitit
  request = json.load(sys.stdin)
  executor = submitit.SlurmExecutor(folder=request['folder'])
  executor.update_parameters(**request['parameters'])
  try:
    with executor.batch():
      jobs = [executor.submit(run_in_job, Task(**t)) for t in request['tasks']]
  except Exception as e:  # submitit's FailedJobError: sbatch's stderr
    sys.exit(str(e))
  print(json.dumps([job.job_id for job in jobs]))


def run_in_job(task: Task) -> None:
  """The task, inside its SLURM job (submitit runs this there). SLURM signals every process of
  the job (a preemption, `scontrol requeue`, the time limit's --signal): the command saves a
  checkpoint and exits 0, and this records nothing, so the task resumes when the job starts
  again (--requeue) or is submitted again. A failed command fails the job too."""
  received = []
  previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
              for s in STOP_SIGNALS}
  try:
    status = run_task(task, lambda: bool(received))
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if status.state == 'failed':
    raise RuntimeError(status.error)
