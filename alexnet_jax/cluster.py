"""The multi-process world: starting `jax.distributed` (by hand, or from SLURM and the other
cluster environments JAX detects, with checks and timeouts), the one decision every process
takes together at every step: does the run stop here, and what the others do when one is gone.

Why our own agreement and not JAX's preemption service: `jax.distributed.initialize` installs a
C++ SIGTERM handler (the preemption notifier) that turns a SIGTERM into a notice to every process
and `multihost_utils.reached_preemption_sync_point(step)` into an agreed step. It knows SIGTERM
only (not SIGINT or SIGHUP, nor "signal again to stop at once") and agrees on "the step after
the fastest process", not on our next log step. So `start` turns that service off (its handler
would replace the one main installs before, workdir.StopSignal, which also stops a process that
has not reached the loop yet) and `Stop` below does the same job over the same coordination
service, for every signal.

A process that dies: JAX's coordination service notices it by its missing heartbeats and, by
default, aborts every other process with a C++ fatal error (a stack trace, and a core dump where
`ulimit -c` allows). Its hook for doing otherwise (`missed_heartbeat_callback`) cannot be given
from Python in jaxlib 0.10.2 (its status argument does not convert: std::bad_cast, another
abort). So `start` runs the service with recoverable tasks (a dead one only drops out of
`get_live_nodes`) and `Watch` ends the others in one line (the service's heartbeat verdict, not a
heartbeat of our own). Process 0 hosts the service: when it dies, the others still end with
JAX's fatal error (at once: its connection drops).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import jax
from jax._src import distributed as jax_distributed  # the coordination service client
import tqdm

from alexnet_jax.errors import EXIT_INTERRUPTED, ConfigError, TrainingStopped
from alexnet_jax.workdir import StopSignal

# How long a process waits for the others' answers in a stop agreement: they answer from a
# thread within milliseconds unless they are gone (then `Watch` ends the run first).
AGREEMENT_TIMEOUT_S = 300
_RUNS = itertools.count(1)  # every process counts its runs alike: each run's keys are its own
# How often `Watch` asks the coordination service which processes are alive.
WATCH_PERIOD_S = 1
# How long a process that ends waits for the others to end too (JAX's shutdown barrier's time).
END_TIMEOUT_S = 300
# What the service (process 0) logs at WARNING when it starts with recoverable tasks.
RECOVERABLE_NOTE = 'Using experimental recoverable task feature'
_watch: Watch | None = None


def start(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
          distributed: bool, initialization_timeout: int = 300,
          heartbeat_timeout: int = 100) -> None:
  """Joins the processes of a multi-process run (`jax.distributed.initialize`); nothing for a
  one-process run. By hand (`coordinator_address`, `num_processes`, `process_id`) or, with
  `distributed`, from the cluster environment (SLURM's `srun` tasks, Open MPI, Kubernetes...).
  Every mistake is a ConfigError before any wait: a SLURM batch script that is not one of srun's
  tasks, a process count that disagrees with SLURM_NTASKS, a missing flag."""
  by_hand = (num_processes, process_id)
  if not (coordinator_address or distributed):
    if any(v is not None for v in by_hand):
      raise ConfigError('--num_processes and --process_id need --coordinator_address=HOST:PORT '
                        '(or --distributed on a cluster).')
    return
  if coordinator_address and None in by_hand and not distributed:
    raise ConfigError(f'--coordinator_address={coordinator_address} needs --num_processes and '
                      f'--process_id too (or --distributed to read them from the cluster).')
  for name, value in (('initialization_timeout', initialization_timeout),
                      ('heartbeat_timeout', heartbeat_timeout)):
    if value <= 0:
      raise ConfigError(f'--{name}={value} must be a positive number of seconds.')
  if distributed and 'SLURM_JOB_ID' in os.environ:
    ntasks = int(os.environ.get('SLURM_NTASKS', '1'))
    in_step = 'SLURM_STEP_ID' in os.environ  # srun's tasks have it; the batch script has not
    count = num_processes if num_processes is not None else ntasks if in_step else 1
    if count != ntasks:
      raise ConfigError(
          f'--distributed: SLURM job {os.environ["SLURM_JOB_ID"]} has SLURM_NTASKS={ntasks} but '
          f'this start makes {count} process{"es" if count > 1 else ""}'
          f'{"" if in_step else " (the batch script itself, not one of srun tasks)"}; start '
          f'training with srun (srun python -m alexnet_jax.main ... --distributed) and no '
          f'--num_processes.')
    if ntasks == 1:
      return  # one process (sbatch -n 1 without srun): nothing to join
  jax.config.update('jax_enable_preemption_service', False)  # see the module docstring
  jax.config.update('jax_enable_recoverability', True)  # a dead process is `Watch`'s to report
  try:
    with lines_dropped(RECOVERABLE_NOTE):  # `Watch.leave` does what it warns about
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=initialization_timeout,
                                 heartbeat_timeout_seconds=heartbeat_timeout)
  except ValueError as e:  # JAX found no cluster environment to read them from
    raise ConfigError(f'--distributed found no cluster environment ({e}); run under srun '
                      f'(SLURM) or mpirun, or pass --coordinator_address, --num_processes and '
                      f'--process_id.') from None
  except jax.errors.JaxRuntimeError as e:
    first = (str(e).strip().splitlines() or [''])[0]
    raise ConfigError(f'could not join the other processes within --initialization_timeout='
                      f'{initialization_timeout} s ({first[:200]}); check that every process '
                      f'started and reaches the coordinator.') from None
  global _watch
  _watch = Watch(heartbeat_timeout)
  atexit.register(_watch.leave)  # before JAX's own shutdown, registered when jax was imported


def check_peers() -> None:
  """After an error in a multi-process run: if another process is gone (the error was a
  consequence, e.g. a collective that lost its peer), ends this one with the line that says so;
  else returns, within about two seconds. Nothing with one process."""
  if _watch is not None:
    _watch.verdict()


@contextlib.contextmanager
def lines_dropped(text: str) -> Iterator[None]:
  """Within it, lines written to file descriptor 2 that hold `text` are dropped (all are kept
  with TF_CPP_MIN_LOG_LEVEL=0). A `grep -v` forwards the others as they come, and still does if
  this process aborts: a fatal error's lines show."""
  if os.environ.get('TF_CPP_MIN_LOG_LEVEL') == '0':
    yield
    return
  sys.stderr.flush()
  grep = subprocess.Popen(['grep', '--line-buffered', '-vF', text], stdin=subprocess.PIPE,
                          stdout=2)
  saved = os.dup(2)
  os.dup2(grep.stdin.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    grep.stdin.close()
    grep.wait()


class Watch:
  """Ends this process, in one line and with exit status 75 (the same command resumes), when
  another process is gone: it exited, crashed, was killed, or sent no heartbeat for
  --heartbeat_timeout seconds. Whatever this process was doing: waiting in a collective for the
  dead one, or writing a checkpoint (orbax renames a checkpoint's temporary directory only once
  every process has written its part: the one being written stays unfinished, and the next start
  deletes it). A process hung with its threads alive (a read from a dead file server) still
  answers: the others wait for it.

  A thread asks the coordination service which processes are alive (`get_live_nodes`: it
  answers once every live process has asked, so every process's thread asks in step, once a
  second); a process missing from the answer, or there with a new incarnation (started again),
  is gone. Recoverable tasks have a cost this class pays too: JAX's shutdown barrier no longer
  keeps every process until all end, so `leave` does, and process 0, whose service the others
  talk to until they disconnect, leaves last.
  """

  def __init__(self, heartbeat_timeout: int):
    state = jax_distributed.global_state
    self.client, self.me, self.count = state.client, state.process_id, state.num_processes
    self.heartbeat_timeout = heartbeat_timeout
    self.changed = threading.Condition()
    self.rounds = 0  # answers received
    self.live: dict[int, int] = {}  # the last answer: process: incarnation
    self.armed = True  # until this process leaves
    self.thread = threading.Thread(target=self._watch, name='process watch', daemon=True)
    self.thread.start()

  def _watch(self) -> None:
    first = None
    while True:
      try:
        live = self.client.get_live_nodes(list(range(self.count)))
      except jax.errors.JaxRuntimeError:
        live = {}  # the service is gone (process 0 ended), or this client shut down
      first = live if first is None else first
      gone = [p for p in range(self.count)
              if p != self.me and (p not in live or live[p] != first.get(p))]
      with self.changed:
        self.live = live
        if gone and self.armed and not all(map(self._left, gone)):
          self._end(gone)
        self.rounds += 1
        self.changed.notify_all()
        if not self.armed and (self.me != 0 or set(live) <= {0}):
          return  # process 0 answers until every other process has disconnected
      time.sleep(WATCH_PERIOD_S)

  def _left(self, process: int) -> bool:
    """Whether `process` left after the end barrier (`leave`): gone, but not lost."""
    try:
      return self.client.key_value_try_get(f'alexnet_jax/left/{process}') == 'yes'
    except jax.errors.JaxRuntimeError:
      return False

  def _end(self, gone: list[int]) -> None:
    who = (f'process {gone[0]} of {self.count} is' if len(gone) == 1 else
           f'processes {", ".join(map(str, gone))} of {self.count} are')
    tqdm.tqdm.write(f'error: {who} gone (exited, crashed or killed, or no heartbeat for '
                    f'{self.heartbeat_timeout} s); run the same command on every process to resume '
                    f'from the newest checkpoint.', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)  # the main thread may wait forever in a collective

  def verdict(self) -> None:
    """Returns once an answer asked for after this call finds every process there (a process
    gone ends this one first); gives up after the heartbeat timeout, and a margin."""
    with self.changed:
      asked = self.rounds + 2  # the answer in flight now may have been asked for before
      self.changed.wait_for(lambda: self.rounds >= asked,
                            self.heartbeat_timeout + 10 * WATCH_PERIOD_S)

  def leave(self) -> None:
    """At exit: waits for every process to end too (a process stuck or gone: up to
    END_TIMEOUT_S), says it left, stops the watch."""
    try:
      self.client.wait_at_barrier('alexnet_jax/end', END_TIMEOUT_S * 1000, None)
      self.client.key_value_set(f'alexnet_jax/left/{self.me}', 'yes')
      together = True
    except jax.errors.JaxRuntimeError:
      together = False  # another process is stuck: leave without it (its watch reports this one)
    with self.changed:
      self.armed = False
    if together:
      self.thread.join(END_TIMEOUT_S)


class Stop:
  """Whether the run stops at a step, the same answer in every process, asked once a step.

  A signal (SIGINT, SIGTERM, SIGHUP) to any process stops every process at the same step, the
  first log step all of them can still reach, so the resumed run logs what an uninterrupted one
  does; a second signal to any process stops all at the first step all can reach. With one
  process that is the step the signal is seen at, or the next log step (no communication at all).

  With several processes (JAX's coordination service, key-value store): a process that received
  a signal posts a notice for each process; a thread in every process, woken by it, posts the
  last step its loop decided on (its loop may be blocked on the device waiting for a slower
  process: the thread answers anyway). No process decides a step past the one it posted before
  it has read every answer; the agreed step is max(posted) + 1 (the next log step after it, for
  a first signal), which no process has passed. Until a signal, a step costs a lock and two
  dictionary reads.
  """

  ROUNDS = (1, 2)  # the first signal: stop at a log step; the second: stop at once

  def __init__(self, signals: StopSignal, next_log_step: Callable[[int], int],
               say: Callable[[str], None]):
    """`next_log_step(s)`: the first step >= s where the loop logs (every process alike)."""
    self.signals, self.next_log_step, self.say = signals, next_log_step, say
    # round: (the first step every process can stop at, the signal, the process that got it)
    self.targets: dict[int, tuple[int, int, int]] = {}
    self.announced = False
    self.client = (jax_distributed.global_state.client if jax.process_count() > 1
                   else None)
    if self.client is None:
      return
    self.prefix = f'alexnet_jax/stop/{next(_RUNS)}'
    self.lock = threading.Lock()
    self.last = -1  # the last step this process's loop decided on (and went past)
    self.noticed: set[int] = set()  # rounds this process posted notices for
    self.posted: dict[int, int] = {}  # round: the step this process's thread posted
    self.closing = False
    self.thread = threading.Thread(target=self._answer, name='stop agreement', daemon=True)

  def __enter__(self) -> 'Stop':
    if self.client is not None:
      self.thread.start()
    return self

  def at(self, step: int) -> int | None:
    """The signal to stop on at `step` (every process gets the same answer), else None."""
    if self.client is None:  # one process: the first step all can stop at is this one
      for r in self.ROUNDS:
        if self.signals.count >= r and r not in self.targets:
          self.targets[r] = (step, self.signals.received, 0)
      return self._decide(step)
    for r in self.ROUNDS:
      if self.signals.count >= r and r not in self.noticed:
        self.noticed.add(r)
        for pid in range(jax.process_count()):
          self.client.key_value_set(self._key(r, 'notice', pid), 'stop', allow_overwrite=True)
    while True:
      with self.lock:
        pending = [r for r in self.posted if r not in self.targets]
        if not pending:  # no answer of this process is unread: decide, atomically with `last`
          self.last = step
          return self._decide(step)
      for r in pending:
        self.targets[r] = self._gather(r)

  def _decide(self, step: int) -> int | None:
    stops = [(step_ if r == 2 else self.next_log_step(step_), r, sig, pid)
             for r, (step_, sig, pid) in self.targets.items()]
    if not stops:
      return None
    at, r, sig, pid = min(stops)
    if at < step:
      raise AssertionError(f'the stop agreed for step {at} was read at step {step}')
    if at == step:
      return sig
    if r == 1 and not self.announced:
      self.announced = True
      by = f' by process {pid}' if jax.process_count() > 1 else ''
      self.say(f'{signal.Signals(sig).name} received{by}: stopping at step {at} (the next log '
               f'step) with a checkpoint; signal again to stop at once.')
    return None

  def _key(self, r: int, what: str, pid: int) -> str:
    return f'{self.prefix}/{r}/{what}/{pid}'

  def _answer(self) -> None:
    """The thread: for each round, waits for this process's notice, then posts `last`."""
    me = jax.process_index()
    for r in self.ROUNDS:
      while True:
        try:
          notice = self.client.blocking_key_value_get(self._key(r, 'notice', me), 60_000)
          break
        except jax.errors.JaxRuntimeError as e:
          if 'DEADLINE_EXCEEDED' not in str(e) or self.closing:
            return  # the client shut down, or this process is closing
      if notice == 'closed':
        return
      self._post(r)

  def _post(self, r: int) -> None:
    """Posts `last` for round `r` once (this process's thread, or its `close`)."""
    with self.lock:
      if r in self.posted:
        return
      self.posted[r] = self.last
      try:
        self.client.key_value_set(self._key(r, 'at', jax.process_index()),
                                  f'{self.last} {self.signals.received or 0}')
      except jax.errors.JaxRuntimeError as e:
        if 'ALREADY_EXISTS' not in str(e):
          raise

  def _gather(self, r: int) -> tuple[int, int, int]:
    """Every process's answer to round `r`: (first step all can stop at, a signal, its process)."""
    answers = []
    for pid in range(jax.process_count()):
      try:
        answers.append(self.client.blocking_key_value_get(self._key(r, 'at', pid),
                                                          AGREEMENT_TIMEOUT_S * 1000))
      except jax.errors.JaxRuntimeError:
        raise TrainingStopped(f'process {pid} did not answer the stop agreement within '
                              f'{AGREEMENT_TIMEOUT_S} s; it is gone or stuck: stop the job and '
                              f'run the same command to resume.') from None
    steps_and_signals = [tuple(map(int, a.split())) for a in answers]
    sig, pid = next(((s, p) for p, (_, s) in enumerate(steps_and_signals) if s),
                    (signal.SIGTERM, 0))
    return max(s for s, _ in steps_and_signals) + 1, sig, pid

  def __exit__(self, *exc) -> None:
    """Answers every round still open with this process's last step (a process that stopped or
    ended is never waited for) and ends the thread."""
    if self.client is None:
      return
    self.closing = True
    for r in self.ROUNDS:
      self._post(r)
      try:  # wakes the thread, whichever round it waits on
        self.client.key_value_set(self._key(r, 'notice', jax.process_index()), 'closed')
      except jax.errors.JaxRuntimeError:
        pass  # a notice is there already
    self.thread.join()
