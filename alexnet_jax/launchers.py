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
    launcher.stopping        set by the controller's `Relay` the moment a signal arrives
    launcher.detached        whether its tasks go on without the controller (SLURM: True)

A task's states: 'queued', 'running', and how it ended (alexnet_jax/errors.py says how a run
reports each): 'done' (exit 0: a sweep's trial finished, a search's trial paused at its rung),
'failed' (its config is the cause: a `ConfigError`, a non-finite stop, an exception, or the same
interruption twice in a row; `Status.error` is its error line; it runs again only when asked),
'interrupted' (a cause outside its config: SIGKILL from the OOM killer, a full disk, a lost lock
race, a SLURM job that ended without a word; it resumes when submitted again) and 'stopped' (a
signal stopped it, or it ended with no verdict recorded: it resumes when submitted again). What
the task wrote is in its directory, which `poll` reads once a task is not queued or running:
`log.txt` (the command's output, appended), `done`, `error.txt` or `interrupted.txt` (the
error line), and `launched.json` (the pid of its running command).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import getpass
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any, Callable, Mapping, Protocol, Sequence

from alexnet_jax.errors import EXIT_INTERRUPTED, STOPPED, ConfigError

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


def leave_terminal() -> None:
  """After SIGHUP the terminal is gone and writing to it fails (EIO), which would end a process
  before it saves or reports: its output goes to /dev/null instead."""
  null = None
  for fd in (1, 2):
    try:
      if os.isatty(fd):
        null = os.open(os.devnull, os.O_WRONLY) if null is None else null
        os.dup2(null, fd)
    except OSError:
      pass  # that descriptor is closed already: nothing to write to
  if null is not None:
    os.close(null)


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
    self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGHUP:
      leave_terminal()
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
  if stopped or (returncode == 0 and any(line.startswith(STOPPED)
                                         for line in output.splitlines())):
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


class Slurm:
  """Each `submit` is one SLURM job array (one job per task, at most `parallel` of them running
  at once), submitted with submitit into `directory`/ (job scripts, pickles, one log per job).

  What was submitted is recorded in `directory`/jobs.jsonl before and after each sbatch (the
  tasks in array order, then the job ids); `poll` reads it, so a new controller on the same
  directory re-attaches. States come from `squeue` (no accounting, no `sacct` needed) and, for a
  job no longer in the queue, from its task's directory. An array whose ids were never recorded
  (the controller died during sbatch) is found by its job name in the queue.
  """

  detached = True
  stopping = False

  def __init__(self, directory: str, parallel: int, resources: SlurmResources):
    check_slurm()
    if parallel < 1:
      raise ConfigError(f'--parallel={parallel}; it must be at least 1.')
    self.directory, self.parallel, self.resources = directory, parallel, resources
    self.records = os.path.join(directory, 'jobs.jsonl')
    self.options = _sbatch_options(resources.options)

  def _record(self, entry: dict[str, Any]) -> None:
    os.makedirs(self.directory, exist_ok=True)
    with open(self.records, 'a') as f:
      f.write(json.dumps(entry) + '\n')
      f.flush()
      os.fsync(f.fileno())

  def submit(self, tasks: Sequence[Task]) -> None:
    import submitit
    if not tasks:
      return
    for task in tasks:
      _clear(task)
    r = self.resources
    name = f'alexnet_jax-{uuid.uuid4().hex[:12]}'
    self._record({'name': name, 'tasks': [dataclasses.asdict(t) for t in tasks]})
    executor = submitit.SlurmExecutor(folder=self.directory)
    executor.update_parameters(
        job_name=name, time=r.time_min, cpus_per_task=r.cpus, array_parallelism=self.parallel,
        stderr_to_stdout=True, **({'partition': r.partition} if r.partition else {}),
        **({'gpus_per_node': r.gpus} if r.gpus else {}),
        **({'mem': f'{int(r.mem_gb * 1024)}M'} if r.mem_gb else {}),
        additional_parameters={'requeue': True, 'signal': f'TERM@{r.signal_s}', **self.options})
    try:
      with executor.batch():
        jobs = [executor.submit(run_in_job, task) for task in tasks]
    except Exception as e:  # sbatch's own words: the line that says why
      said = [l.strip() for l in str(e).splitlines() if 'error:' in l] or [str(e).strip()]
      raise ConfigError(f'sbatch refused the trials\' job array ({said[0][:300]}); fix '
                        f'--slurm_partition or the other --slurm_* flags.') from None
    self._record({'name': name, 'jobs': [job.job_id for job in jobs]})

  def _queue(self) -> dict[str, tuple[str, str]]:
    """{job id: (state, job name)} of this user's jobs in SLURM's queue."""
    out = subprocess.run(['squeue', '-h', '-r', '-u', getpass.getuser(), '-o', '%i|%T|%j'],
                         capture_output=True, text=True)
    if out.returncode:
      raise ConfigError(f'squeue failed ({out.stderr.strip()[-200:]}); is SLURM up?')
    return {i: (state, name) for i, state, name in
            (line.split('|', 2) for line in out.stdout.splitlines() if line.count('|') >= 2)}

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
    for name, submission in submissions.items():  # in submission order: the newest one wins
      tasks = [Task(**t) for t in submission.get('tasks', [])]
      jobs = submission.get('jobs') or self._find(name, len(tasks), queue)
      if jobs is None:
        continue  # never submitted (sbatch refused it), or long gone: its tasks' files tell
      for task, job in zip(tasks, jobs):
        state = queue.get(job, (None,))[0]
        log = os.path.join(self.directory, f'{job}_0_log.out')
        if state is None:
          statuses[task.name] = dataclasses.replace(finished(task.directory), log=log)
        else:
          statuses[task.name] = Status('queued' if state in ('PENDING', 'REQUEUED', 'REQUEUE_HOLD',
                                                              'REQUEUE_FED', 'CONFIGURING')
                                       else 'running', log=log)
    return statuses

  @staticmethod
  def _find(name: str, count: int, queue: Mapping[str, tuple[str, str]]) -> list[str] | None:
    """The job ids of submission `name`, from the queue (the controller died during sbatch)."""
    ids = [i for i, (_, job_name) in queue.items() if job_name == name]
    if not ids:
      return None
    array = ids[0].split('_')[0]
    return [array] if count == 1 else [f'{array}_{k}' for k in range(count)]

  def adopt(self, tasks: Sequence[Task]) -> set[str]:
    del tasks  # `poll` re-attaches to every job its records name
    return set()

  def stop(self, signum: int) -> None:
    del signum  # the jobs go on; the same command re-attaches to them


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
