"""Where a sweep's trials run: local processes, or SLURM jobs submitted with submitit; one small
interface, so that whoever runs trials does not know which launcher it has.

A `Task` is one command run in its own directory. A launcher

    launcher.submit(tasks)   starts (or queues) them now; callable again at any time, with any
                             tasks (a search submits one trial at a time)
    launcher.poll()          {task name: Status} of every task it knows, with no waiting: those
                             submitted through it and (SLURM) through an earlier controller on the
                             same directory, re-attached from its records
    launcher.stop(signum)    a signal reached the controller: local tasks get it too (they save a
                             checkpoint and exit) and no queued one starts; SLURM jobs go on
    launcher.detached        whether its tasks go on without the controller (SLURM: True)

A task's states: 'queued', 'running', 'done' (its command exited 0: a sweep's trial finished,
a search's trial run to a rung paused), 'failed' (it exited
otherwise; `Status.error` is the line that says why) and 'stopped' (a signal ended it before it
finished, or its job is gone without a word: it resumes when submitted again). What the task
wrote is in its directory, which is what `poll` reads once a task is not queued or running:
`log.txt` (the command's output, appended), `done` (exited 0) or `error.txt` (the error line).
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
import subprocess
import sys
import threading
import uuid
from typing import Any, Callable, Mapping, Protocol, Sequence

from alexnet_jax.errors import ConfigError

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

  def submit(self, tasks: Sequence[Task]) -> None: ...

  def poll(self) -> dict[str, Status]: ...

  def stop(self, signum: int) -> None: ...


class Relay:
  """A controller's signals: within `with`, SIGINT/SIGTERM are recorded in `received` (the
  controller stops starting work) and `pass_on()` hands each to the launcher once (local trials
  save a checkpoint and exit; a detached launcher's SLURM jobs go on without the controller)."""

  def __init__(self, launcher: Launcher):
    self.launcher, self.received, self._passed = launcher, [], 0

  def __enter__(self) -> 'Relay':
    self._previous = {s: signal.signal(s, lambda signum, frame: self.received.append(signum))
                      for s in (signal.SIGINT, signal.SIGTERM)}
    return self

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


def finished(directory: str) -> Status:
  """A task that is not queued nor running, from what it left in its directory."""
  if os.path.exists(done_path(directory)):
    return Status('done')
  if os.path.exists(error_path(directory)):
    with open(error_path(directory)) as f:
      return Status('failed', f.read().strip())
  return Status('stopped')


def _clear(task: Task) -> None:
  """Before a (re)start: the task's earlier verdict no longer holds."""
  for path in (done_path(task.directory), error_path(task.directory)):
    if os.path.exists(path):
      os.remove(path)


def run_task(task: Task, stopped: Callable[[], bool],
             started: Callable[[subprocess.Popen], None] = lambda process: None) -> Status:
  """Runs the task's command to its end, its output appended to `log.txt`, and records how it
  ended: `done` (exit 0), `error.txt` (its error line), or nothing when `stopped()` says a
  signal ended it first. `started` receives the process (to pass signals on)."""
  os.makedirs(task.directory, exist_ok=True)
  log_path = os.path.join(task.directory, 'log.txt')
  command = [sys.executable, *task.command[1:]] if task.command[0] == 'python' else task.command
  with open(log_path, 'a') as log:
    log.write(f'$ {shlex.join(task.command)}\n')
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={'TF_CPP_MIN_LOG_LEVEL': '3', **os.environ})
    started(process)
    returncode = process.wait()
  if stopped():  # neither finished nor failed: the next start resumes it
    return Status('stopped')
  if returncode == 0:
    open(done_path(task.directory), 'w').close()
    return Status('done')
  with open(log_path) as f:
    f.seek(max(0, os.path.getsize(log_path) - 20_000))
    error = error_line(f.read(), returncode)
  with open(error_path(task.directory), 'w') as f:
    f.write(error + '\n')
  return Status('failed', error)


class Local:
  """Tasks as child processes, `parallel` at a time, in submission order."""

  detached = False

  def __init__(self, parallel: int):
    if parallel < 1:
      raise ConfigError(f'--parallel={parallel}; it must be at least 1.')
    self.pool = concurrent.futures.ThreadPoolExecutor(parallel)
    self.lock = threading.Lock()
    self.statuses: dict[str, Status] = {}
    self.processes: set[subprocess.Popen] = set()
    self.stopping = False

  def submit(self, tasks: Sequence[Task]) -> None:
    for task in tasks:
      _clear(task)
      with self.lock:
        self.statuses[task.name] = Status('queued')
      self.pool.submit(self._run, task)

  def _run(self, task: Task) -> None:
    with self.lock:
      if self.stopping:
        self.statuses[task.name] = Status('stopped')
        return
      self.statuses[task.name] = Status('running')
    status = run_task(task, lambda: self.stopping, self._started)
    with self.lock:
      self.processes.difference_update(p for p in list(self.processes) if p.poll() is not None)
      self.statuses[task.name] = status

  def _started(self, process: subprocess.Popen) -> None:
    with self.lock:
      self.processes.add(process)
      if self.stopping:  # the signal came while it started
        process.send_signal(signal.SIGTERM)

  def poll(self) -> dict[str, Status]:
    with self.lock:
      return dict(self.statuses)

  def stop(self, signum: int) -> None:
    with self.lock:
      self.stopping = True
      for process in self.processes:
        if process.poll() is None:
          process.send_signal(signum)


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

  def stop(self, signum: int) -> None:
    del signum  # the jobs go on; the same command re-attaches to them


def run_in_job(task: Task) -> None:
  """The task, inside its SLURM job (submitit runs this there). SLURM signals every process of
  the job (a preemption, `scontrol requeue`, the time limit's --signal): the command saves a
  checkpoint and exits 0, and this records nothing, so the task resumes when the job starts
  again (--requeue) or is submitted again. A failed command fails the job too."""
  received = []
  previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    status = run_task(task, lambda: bool(received))
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if status.state == 'failed':
    raise RuntimeError(status.error)
