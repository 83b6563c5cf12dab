"""Chaos soak for searches: a local ASHA search hit at random by what terminals, clusters and the
OOM killer send, rerun after each hit, ends as its undisturbed run does.

    python -m experiments.soak_search --disturbances=30 --workdir=/tmp/soak_search \
        --out=experiments/results/soak_search.md

Prepares the digits set once in `WORKDIR/tfds`, runs a 6-trial random search with ASHA
(`configs/sweeps/search.py`, r=1, η=3, 2 trials at a time) undisturbed in `WORKDIR/reference`,
then the same command in a fresh `WORKDIR/disturbed_1`, hit every `--min_interval`..
`--max_interval` seconds (seeded) by one disturbance: SIGINT, SIGTERM or SIGHUP to the
controller's process group (Ctrl-C, `kill`, a closed terminal; the controller leads its own
group, as in a terminal), SIGKILL to the controller alone, or SIGKILL to one running trial (the
OOM killer). The kinds are drawn from shuffled bags, so each is hit about equally often
(`--disturbances` counts them all: 30 is 6 of each, 150 is 30 of each). After a
signal to the controller the soak waits for it to exit (`--exit_timeout`; a controller still
running then is a finding, and is killed) and runs the same command again; after a trial is
killed the controller goes on. Once `--disturbances` were sent the search is left to finish; a
search that finishes before that is compared and the soak goes on in `disturbed_2`, and so on.

Compared with the reference, per trial: `metrics.jsonl` (every field but the wall-clock ones) and
its `results.csv` row. ASHA is asynchronous: which trial is promoted depends on the order the
trials reach a rung, and a disturbance can change that order. So a trial that trained other
epochs than in the reference counts as a difference only when its lines differ over the epochs
both trained or when the promotions are not what ASHA decides for the order the soak saw the
trials reach each rung (every trial of a rung's final best 1/η promoted, and no trial promoted
that was not among the best 1/η of some prefix of that order). Duplicate starts, per trial: a
launch that lost its workdir's lock race, a start from scratch after an earlier launch saved a
checkpoint, two of its training processes alive at once (the soak scans /proc), and a
'starts' line in `search_log.txt` that no start from scratch accounts for (a resumption must say
'resumes' or 'promoted'). Writes the markdown report `--out`; exits 1 on any difference or
duplicate start. A finished reference from the same command in WORKDIR is reused (delete
WORKDIR/reference to run it again). Not part of the test suite: on 2 shared CPU cores the
reference takes 6-8 minutes, and 30 disturbances with the search's reruns about half an hour.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from alexnet_jax import asha
from alexnet_jax.workdir import WALL_CLOCK_METRICS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ('SIGINT group', 'SIGTERM group', 'SIGHUP group', 'SIGKILL controller', 'SIGKILL trial')
GROUP = {'SIGINT group': signal.SIGINT, 'SIGTERM group': signal.SIGTERM,
         'SIGHUP group': signal.SIGHUP}
LAUNCH = '$ python -m alexnet_jax.main'  # how launchers.run_task heads each start in log.txt
SAVED = re.compile(r': val top-1 |Stopped by SIG\w+ at step|Paused at epoch')  # a checkpoint
# A launch that reached its training loop: its progress bar (from its first step on) or a save.
TRAINED = re.compile(r'step/s|' + SAVED.pattern)
POLL_S = 0.5
BY_EPOCHS = ('status', 'rung', 'epochs', 'val_top1_error', 'best_val_top1_error',
             'val_top5_error')  # the results.csv fields that follow from the epochs trained


def search_command(args, workdir: str, data_dir: str) -> list[str]:
  return ['python', '-m', 'alexnet_jax.sweep', '--config=configs/default.py',
          '--sweep=configs/sweeps/search.py', '--search=random', f'--trials={args.trials}',
          f'--search_seed={args.search_seed}', '--early_stop=asha',
          f'--min_epochs={args.min_epochs}', f'--reduction_factor={args.reduction_factor}',
          f'--parallel={args.parallel}', f'--workdir={workdir}', *data_flags(args, data_dir),
          f'--config.model.width={args.width}', f'--config.train.batch_size={args.batch_size}',
          f'--config.train.num_epochs={args.num_epochs}',
          f'--config.train.log_every_steps={args.log_every_steps}']


def data_flags(args, data_dir: str) -> list[str]:
  return [f'--config.dataset.data_dir={data_dir}', f'--config.dataset.image_size={args.image_size}',
          '--config.dataset.prepared=True']


def popen(command: list[str], log_path: str, **kwargs) -> subprocess.Popen:
  with open(log_path, 'a') as log:  # unbuffered: what a killed controller said is in its log
    return subprocess.Popen([sys.executable, *command[1:]], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, **kwargs, env={
                                **os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'PYTHONUNBUFFERED': '1'})


def last_line(log_path: str) -> str:
  with open(log_path, errors='replace') as f:
    lines = [l.strip() for l in re.split(r'[\r\n]+', f.read()) if l.strip()]
  return lines[-1] if lines else '(nothing)'


def trial_processes(search_dir: str) -> dict[int, str]:
  """{pid: trial name} of every live `alexnet_jax.main` whose --workdir is in `search_dir` (a
  child process with its parent's command line is its parent's)."""
  found, parents = {}, {}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        argv = f.read().decode(errors='replace').split('\0')
      with open(f'/proc/{pid}/stat') as f:
        parents[int(pid)] = int(f.read().rsplit(')', 1)[1].split()[1])
    except OSError:  # gone meanwhile
      continue
    workdir = next((a[len('--workdir='):] for a in argv if a.startswith('--workdir=')), None)
    if 'alexnet_jax.main' in argv and workdir and os.path.dirname(workdir) == search_dir:
      found[int(pid)] = os.path.basename(workdir)
  return {pid: name for pid, name in found.items() if parents.get(pid) not in found}


def trial_names(search_dir: str) -> list[str]:
  return sorted(n for n in (os.listdir(search_dir) if os.path.isdir(search_dir) else [])
                if n.startswith('trial_'))


def metric_lines(trial_dir: str) -> list[dict]:
  """metrics.jsonl without its wall-clock fields (a torn last line dropped)."""
  out = []
  try:
    with open(os.path.join(trial_dir, 'metrics.jsonl')) as f:
      for line in f:
        try:
          out.append({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_METRICS})
        except ValueError:
          break
  except FileNotFoundError:
    pass
  return out


def val_errors(lines: list[dict]) -> dict[int, float]:
  return {round(l['epoch']): l['val_top1_error'] for l in lines if 'val_top1_error' in l}


class Watch:
  """What the soak sees of a search while it runs, every POLL_S: when each trial first logged
  its evaluation at each rung, and trials with two training processes alive at once."""

  def __init__(self, search_dir: str, rungs: list[int]):
    self.search_dir, self.rungs, self.t0 = search_dir, rungs, time.time()
    self.arrivals: dict[int, dict[str, float]] = {r: {} for r in rungs}
    self.concurrent: list[tuple[float, str, list[int]]] = []
    self._seen: dict[str, tuple[int, float]] = {}

  def poll(self) -> None:
    now = time.time() - self.t0
    by_trial: dict[str, list[int]] = {}
    for pid, name in trial_processes(self.search_dir).items():
      by_trial.setdefault(name, []).append(pid)
    for name, pids in by_trial.items():
      if len(pids) > 1 and not any(n == name and p == sorted(pids)
                                   for _, n, p in self.concurrent):
        self.concurrent.append((now, name, sorted(pids)))
    for name in trial_names(self.search_dir):
      path = os.path.join(self.search_dir, name, 'metrics.jsonl')
      try:
        stamp = (os.stat(path).st_size, os.stat(path).st_mtime)
      except OSError:
        continue
      if self._seen.get(name) == stamp:
        continue
      self._seen[name] = stamp
      for epoch in val_errors(metric_lines(os.path.dirname(path))):
        if epoch in self.arrivals:
          self.arrivals[epoch].setdefault(name, now)

  def wait(self, process: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code, or None if it still runs after `timeout` s."""
    deadline = time.time() + timeout
    while True:
      self.poll()
      if process.poll() is not None or time.time() >= deadline:
        return process.poll()
      time.sleep(min(POLL_S, max(0.0, deadline - time.time())))


def number(name: str) -> int:
  return int(name.rsplit('_', 1)[1])


def promotions_explained(watch: Watch, errors: dict[str, dict[int, float]], eta: int,
                         tolerance: float) -> list[str]:
  """What is wrong with the search's promotions for the order `watch` saw the trials reach
  each rung (nothing: []). A rung's final best 1/η must have gone on; any trial that went on
  must be among the best 1/η of the trials that had reached the rung when it arrived or later
  (arrivals within `tolerance` s of each other may have been seen in either order)."""
  wrong = []
  for rung, after in zip(watch.rungs, watch.rungs[1:]):
    arrived = watch.arrivals[rung]
    promoted = {n for n, e in errors.items() if max(e, default=0) > rung}
    best = lambda names: set(sorted(names, key=lambda n: (errors[n][rung], number(n)))[
        :len(names) // eta])
    may = set()
    for name, t in arrived.items():
      before = {n for n, s in arrived.items() if s < t - tolerance}
      near = [n for n, s in arrived.items() if abs(s - t) <= tolerance and n != name]
      for k in range(len(near) + 1):
        for extra in itertools.combinations(near, k):
          may |= best(before | {name, *extra})
    must = best(set(arrived))
    if must - promoted:
      wrong.append(f'epoch {rung}: {", ".join(sorted(must - promoted))} among the best 1/{eta} '
                   f'but not promoted')
    if promoted - may:
      wrong.append(f'epoch {rung}: {", ".join(sorted(promoted - may))} promoted but never among '
                   f'the best 1/{eta} of the trials there when it arrived')
    if set(errors) and {n for n, e in errors.items() if rung in e} - set(arrived):
      wrong.append(f'epoch {rung}: arrivals not seen by the soak')
  return wrong


def launches(search_dir: str, name: str) -> dict[str, int]:
  """How trial `name` was started: its 'starts' lines in search_log.txt and its launches in
  log.txt (from scratch, resumed, lost a lock race), and the duplicates among them."""
  try:
    with open(os.path.join(search_dir, 'search_log.txt')) as f:
      starts = sum(f' {name} starts:' in line for line in f)
    with open(os.path.join(search_dir, name, 'log.txt'), errors='replace') as f:
      segments = f.read().split(LAUNCH)[1:]
  except FileNotFoundError:
    return {'starts': 0, 'scratch': 0, 'resumed': 0, 'lock': 0, 'before training': 0,
            'duplicates': 0}
  count = {'starts': starts, 'scratch': 0, 'resumed': 0, 'lock': 0, 'late scratch': 0,
           'before training': 0}
  for i, segment in enumerate(segments):
    if 'is in use by' in segment:
      count['lock'] += 1
    elif 'Resuming from step' in segment:
      count['resumed'] += 1
    elif not TRAINED.search(segment):  # stopped or killed before its loop: neither trained
      count['before training'] += 1
    else:
      count['scratch'] += 1
      count['late scratch'] += any(SAVED.search(s) for s in segments[:i])
  legit = count['scratch'] - count['late scratch']  # the first, and restarts with nothing saved
  unaccounted = max(0, starts - legit - count['lock'] - count['late scratch'])
  count['duplicates'] = count['lock'] + count['late scratch'] + unaccounted
  return count


def read_csv(path: str) -> tuple[list[str], dict[str, dict[str, str]]]:
  if not os.path.exists(path):
    return [], {}
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return (list(rows[0]) if rows else []), {r['trial']: r for r in rows}


def complete(search_dir: str, trials: int, since: float) -> bool:
  """The search's results.csv, written after `since`, has every trial done or paused."""
  path = os.path.join(search_dir, 'results.csv')
  if not os.path.exists(path) or os.path.getmtime(path) < since:
    return False
  rows = read_csv(path)[1]
  return len(rows) == trials and all(r['status'] in ('done', 'paused') for r in rows.values())


def compare(search_dir: str, reference: str, watch: Watch, args) -> dict:
  """Each trial against the reference; returns the rows and the counts."""
  header, rows = read_csv(os.path.join(search_dir, 'results.csv'))
  ref_header, ref_rows = read_csv(os.path.join(reference, 'results.csv'))
  names = sorted(set(rows) | set(ref_rows) | set(trial_names(search_dir)))
  lines = {n: metric_lines(os.path.join(search_dir, n)) for n in names}
  errors = {n: val_errors(l) for n, l in lines.items()}
  wrong_promotions = promotions_explained(watch, errors, args.reduction_factor, args.tolerance)
  # Other promotions are ASHA's only in a search as complete as the reference (no trial failed).
  asha_order = not wrong_promotions and set(rows) == set(ref_rows) and all(
      r['status'] in ('done', 'paused') for r in [*rows.values(), *ref_rows.values()])
  out, differences, duplicates = [], 0, 0
  for name in names:
    got, want = lines[name], metric_lines(os.path.join(reference, name))
    row, ref_row = rows.get(name), ref_rows.get(name)
    last = min(got[-1]['step'] if got else 0, want[-1]['step'] if want else 0)
    prefix = [l for l in got if l['step'] <= last] == [l for l in want if l['step'] <= last]
    if got == want and row == ref_row:
      verdict = 'identical'
    elif prefix and got and want and asha_order and all(
        row[k] == ref_row[k] for k in ref_header if k not in BY_EPOCHS):
      verdict = (f'other epochs ({row["epochs"]}, reference {ref_row["epochs"]}): ASHA\'s order; '
                 f'equal over the epochs both trained')
    else:
      differences += 1
      verdict = '**differs**: ' + first_difference(got, want, row, ref_row)
    count = launches(search_dir, name)
    count['concurrent'] = sum(n == name for _, n, _ in watch.concurrent)
    count['duplicates'] += count['concurrent']
    duplicates += count['duplicates']
    out.append((name, verdict, count))
  csv_same = header == ref_header and rows == ref_rows
  return {'trials': out, 'differences': differences + (header != ref_header),
          'duplicates': duplicates, 'csv identical': csv_same, 'promotions': wrong_promotions}


def first_difference(got: list[dict], want: list[dict], row, ref_row) -> str:
  if row is None or ref_row is None:
    return 'no results.csv row' + (' in the reference' if ref_row is None else '')
  for a, b in zip(got, want):
    if a != b:
      keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      return (f'metrics.jsonl at step {a["step"]} (reference step {b["step"]}): ' + ', '.join(
          f'{k} {a.get(k)} vs {b.get(k)}' for k in keys[:3]))
  if len(got) != len(want):
    return (f'{len(got)} metrics lines to step {got[-1]["step"] if got else 0}, reference '
            f'{len(want)} to step {want[-1]["step"] if want else 0}; status {row["status"]} vs '
            f'{ref_row["status"]}')
  keys = [k for k in ref_row if row.get(k) != ref_row[k]]
  return 'results.csv ' + ', '.join(f'{k} {row.get(k)!r} vs {ref_row[k]!r}' for k in keys)


class Bag:
  """Disturbance kinds in shuffled rounds of every kind."""

  def __init__(self, kinds: list[str], rng: random.Random):
    self.kinds, self.rng, self.items = kinds, rng, []

  def draw(self, possible: Callable[[str], bool]) -> str | None:
    if not self.items:
      self.items = self.rng.sample(self.kinds, len(self.kinds))
    for i, kind in enumerate(self.items):
      if possible(kind):
        return self.items.pop(i)
    return None


def disturbed_round(index: int, args, command: Callable[[str], list[str]], state: dict, say
                    ) -> tuple[str, Watch, list[dict], bool]:
  """One search in a fresh directory, disturbed while `state['left']` > 0, then left to
  finish; returns its directory, watch, controller runs and whether it finished."""
  search_dir = os.path.join(args.workdir, f'disturbed_{index}')
  shutil.rmtree(search_dir, ignore_errors=True)
  watch = Watch(search_dir, asha.rungs(args.min_epochs, args.reduction_factor, args.num_epochs))
  runs, stuck, fingerprint = [], 0, None
  while True:
    log_path = os.path.join(args.workdir, 'logs', f'disturbed_{index}_run_{len(runs) + 1:02d}.log')
    started = time.time()
    process = popen(command(search_dir), log_path, start_new_session=True)
    run = {'run': len(runs) + 1, 'log': log_path, 'events': [], 'by': None}
    state['process'] = process
    while process.poll() is None:
      if state['left'] <= 0:
        if watch.wait(process, args.run_timeout) is None:
          run['events'].append(event(state, index, run, 'hang', f'still running after '
                                     f'{args.run_timeout:.0f} s undisturbed; SIGKILLed', None, ''))
          process.kill()
          process.wait()
          state['hangs'] += 1
        break
      if watch.wait(process, state['rng'].uniform(args.min_interval, args.max_interval)
                    ) is not None:
        break
      running = trial_processes(search_dir)
      kind = state['bag'].draw(lambda k: k != 'SIGKILL trial' or bool(running))
      if kind is None:  # only trials to kill, and none running
        continue
      state['left'] -= 1
      if kind == 'SIGKILL trial':
        pid = state['rng'].choice(sorted(running))
        try:
          os.kill(pid, signal.SIGKILL)
          target = f'{running[pid]} (pid {pid})'
        except ProcessLookupError:
          target = f'{running[pid]} (pid {pid}, which had just ended)'
        watch.wait(process, 3)  # what the controller makes of it
        run['events'].append(event(state, index, run, kind, target, process.poll(),
                                   last_line(log_path)))
        continue
      if kind == 'SIGKILL controller':
        process.kill()
      else:  # the controller is not reaped yet: its group exists
        os.killpg(process.pid, GROUP[kind])
      sent = time.time()
      returncode = watch.wait(process, args.exit_timeout)
      note = '' if returncode is not None else (
          f' **still running {args.exit_timeout:.0f} s later: SIGKILLed**')
      if returncode is None:
        process.kill()
        process.wait()
        state['hangs'] += 1
      run['by'] = kind
      run['events'].append(event(state, index, run, kind, f'controller pid {process.pid}' +
                                 ('' if kind == 'SIGKILL controller' else ' and its group'),
                                 process.returncode, last_line(log_path) + note,
                                 time.time() - sent))
      say(f'  {kind:18s} run {run["run"]:2d}: exit {process.returncode}; '
          f'{last_line(log_path)[:100]}{note}')
    watch.poll()
    run.update(returncode=process.returncode, seconds=time.time() - started,
               last=last_line(log_path))
    runs.append(run)
    if process.returncode == 0 and complete(search_dir, args.trials, started):
      say(f'  disturbed_{index}: finished after {len(runs)} controller runs')
      return search_dir, watch, runs, True
    if run['by'] is not None:
      stuck, fingerprint = 0, None
    else:  # ended by itself short of the end: is it making progress?
      say(f'  run {run["run"]} ended by itself, exit {process.returncode}: {run["last"][:100]}')
      now = [(n, len(metric_lines(os.path.join(search_dir, n))))
             for n in trial_names(search_dir)]
      stuck = stuck + 1 if now == fingerprint else 0
      fingerprint = now
      if stuck >= 2:
        say(f'  disturbed_{index}: 3 runs in a row ended by themselves with no progress; '
            f'giving up')
        return search_dir, watch, runs, False


def event(state: dict, index: int, run: dict, kind: str, target: str, returncode, said: str,
          exit_s: float | None = None) -> dict:
  return {'t': time.time() - state['t0'], 'round': index, 'run': run['run'], 'kind': kind,
          'target': target, 'returncode': returncode, 'said': said, 'exit_s': exit_s}


def cleanup(args, state: dict) -> list[str]:
  """Kills what the soak left running (the last controller, trial processes); says which."""
  left = []
  process = state.get('process')
  if process is not None and process.poll() is None:
    left.append(f'controller pid {process.pid}')
    process.kill()
    process.wait()
  for name in os.listdir(args.workdir):
    for pid, trial in trial_processes(os.path.join(args.workdir, name)).items():
      left.append(f'{name}/{trial} pid {pid}')
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  return left


def reference_search(args, command: Callable[[str], list[str]], state: dict, say
                     ) -> tuple[str, Watch, float]:
  """The undisturbed search in WORKDIR/reference, or the one there from the same command."""
  reference = os.path.join(args.workdir, 'reference')
  watch = Watch(reference, asha.rungs(args.min_epochs, args.reduction_factor, args.num_epochs))
  record = os.path.join(args.workdir, 'reference.json')
  if os.path.exists(record):
    with open(record) as f:
      saved = json.load(f)
    if saved['command'] == command(reference) and complete(reference, args.trials, 0):
      watch.arrivals = {int(k): v for k, v in saved['arrivals'].items()}
      say(f'reference: reused {reference} ({saved["seconds"]:.0f} s)')
      return reference, watch, saved['seconds']
  shutil.rmtree(reference, ignore_errors=True)
  t0 = time.time()
  process = popen(command(reference), os.path.join(args.workdir, 'logs', 'reference.log'),
                  start_new_session=True)
  state['process'] = process
  watch.wait(process, args.run_timeout)
  seconds = time.time() - t0
  if process.returncode != 0 or not complete(reference, args.trials, t0):
    sys.exit(f'error: the reference search did not finish (exit {process.returncode}); see '
             f'{args.workdir}/logs/reference.log')
  with open(record, 'w') as f:
    json.dump({'command': command(reference), 'seconds': seconds, 'arrivals': watch.arrivals}, f)
  say(f'reference: {seconds:.0f} s')
  return reference, watch, seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--disturbances', type=int, default=30,
                      help='Disturbances in all, the kinds drawn in shuffled rounds.')
  parser.add_argument('--kinds', default=','.join(KINDS),
                      help=f'Comma-separated, of: {", ".join(KINDS)}.')
  parser.add_argument('--min_interval', type=float, default=3, help='Seconds between hits, from.')
  parser.add_argument('--max_interval', type=float, default=15, help='Seconds between hits, to.')
  parser.add_argument('--exit_timeout', type=float, default=300,
                      help='Seconds a signalled controller may take to exit.')
  parser.add_argument('--run_timeout', type=float, default=3600,
                      help='Seconds an undisturbed controller run may take.')
  parser.add_argument('--tolerance', type=float, default=1.5,
                      help='Rung arrivals this close (s) may have been seen in either order.')
  parser.add_argument('--seed', type=int, default=0, help='Seeds the intervals and kinds.')
  parser.add_argument('--trials', type=int, default=6)
  parser.add_argument('--search_seed', type=int, default=0)
  parser.add_argument('--parallel', type=int, default=2)
  parser.add_argument('--min_epochs', type=int, default=1)
  parser.add_argument('--reduction_factor', type=int, default=3)
  parser.add_argument('--num_epochs', type=int, default=3)
  parser.add_argument('--image_size', type=int, default=63)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--log_every_steps', type=int, default=2)
  parser.add_argument('--workdir', default='/tmp/soak_search', help='Scratch directory.')
  parser.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results',
                                                    'soak_search.md'),
                      help='Markdown report to write.')
  args = parser.parse_args()
  kinds = [k.strip() for k in args.kinds.split(',')]
  if set(kinds) - set(KINDS) or args.min_interval > args.max_interval:
    sys.exit(f'error: --kinds={args.kinds} must name some of {", ".join(KINDS)}, and '
             f'--min_interval must not exceed --max_interval.')
  args.workdir = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(args.workdir, 'logs'), exist_ok=True)
  data_dir = os.path.join(args.workdir, 'tfds')
  command = lambda search_dir: search_command(args, search_dir, data_dir)
  rng = random.Random(args.seed)
  state = {'t0': time.time(), 'left': args.disturbances, 'rng': rng, 'bag': Bag(kinds, rng),
           'hangs': 0}
  lines: list[str] = []
  say = lambda text: (print(text, flush=True), lines.append(text))
  try:
    prepare = ['python', '-m', 'alexnet_jax.prepare', '--config=configs/default.py',
               *data_flags(args, data_dir)]
    if popen(prepare, os.path.join(args.workdir, 'logs', 'prepare.log')).wait():
      sys.exit(f'error: preparing the data set failed; see {args.workdir}/logs/prepare.log')
    reference, ref_watch, ref_seconds = reference_search(args, command, state, say)
    state['t0'] = time.time()
    rounds = []
    while True:
      search_dir, watch, runs, finished = disturbed_round(len(rounds) + 1, args, command, state,
                                                          say)
      rounds.append((search_dir, watch, runs, finished, compare(search_dir, reference, watch,
                                                                args)))
      if state['left'] <= 0 or not finished:
        break
    disturbed_seconds = time.time() - state['t0']
  finally:
    leftovers = cleanup(args, state)
  ref_check = promotions_explained(ref_watch, {n: val_errors(metric_lines(
      os.path.join(reference, n))) for n in trial_names(reference)}, args.reduction_factor,
                                   args.tolerance)
  passed = (all(r[3] and not r[4]['differences'] and not r[4]['duplicates'] for r in rounds)
            and not leftovers and not state['hangs'])
  write_report(args, command, ref_seconds, disturbed_seconds, rounds, leftovers, ref_check,
               state, passed)
  say(f'{"PASSED" if passed else "FAILED"}: ' + '; '.join(
      f'disturbed_{i}: {r[4]["differences"]} differences, {r[4]["duplicates"]} duplicate starts'
      for i, r in enumerate(rounds, 1)) + f'; wrote {args.out}')
  sys.exit(0 if passed else 1)


def cell(text) -> str:
  return str(text).replace('|', '\\|').replace('\n', ' ')[:160]


def write_report(args, command, ref_seconds: float, disturbed_seconds: float, rounds: list,
                 leftovers: list[str], ref_check: list[str], state: dict, passed: bool) -> None:
  events = [e for r in rounds for run in r[2] for e in run['events']]
  counts = {k: sum(e['kind'] == k for e in events) for k in KINDS}
  argv = ' '.join(sys.argv[1:])
  out = [f'# Search chaos soak: {"PASSED" if passed else "FAILED"}', '',
         'Command (2 CPU cores):', '', '```', f'python -m experiments.soak_search {argv}'.strip(),
         '```', '', 'The search, run undisturbed in `reference/` and disturbed in '
         '`disturbed_N/` (the data set prepared once, beforehand):', '', '```',
         shlex.join(command('DIR')), '```', '',
         f'Settings: {args.disturbances} disturbances, kinds {args.kinds}, drawn in shuffled '
         f'rounds; {args.min_interval:g}-{args.max_interval:g} s apart (seed {args.seed}); a '
         f'signalled controller may take {args.exit_timeout:g} s to exit; rung arrivals '
         f'{args.tolerance:g} s apart may have been seen in either order.', '',
         f'Wall time: reference {ref_seconds:.0f} s; disturbed {disturbed_seconds:.0f} s '
         f'({sum(len(r[2]) for r in rounds)} controller runs in {len(rounds)} '
         f'search{"es" if len(rounds) > 1 else ""}).', '',
         'Disturbances sent: ' + (', '.join(f'{k} {n}' for k, n in counts.items() if n) or
                                  'none') + '.', '',
         f'The reference\'s own promotions are what ASHA decides for the order seen: '
         f'{"yes" if not ref_check else "NO: " + "; ".join(ref_check)}.', '']
  if state['hangs']:
    out += [f'**Controllers still running when their time was up (killed): {state["hangs"]}.**',
            '']
  if leftovers:
    out += [f'**Left running when the soak ended (killed):** {", ".join(leftovers)}.', '']
  for i, (search_dir, watch, runs, finished, result) in enumerate(rounds, 1):
    out += [f'## disturbed_{i}: {"finished" if finished else "**did not finish**"}, '
            f'{result["differences"]} differences, {result["duplicates"]} duplicate starts', '',
            'results.csv identical to the reference\'s: ' +
            ('yes' if result['csv identical'] else 'no') + '. Promotions as ASHA decides for '
            'the order the trials reached the rungs: ' + ('yes' if not result['promotions'] else
                                                          '**no**: ' + '; '.join(
                                                              result['promotions'])) + '.', '',
            '| trial | metrics.jsonl and results.csv | \'starts\' in search_log | launches: from '
            'scratch / resumed / lost the lock / ended before training | from scratch after a '
            'checkpoint | two processes at once | duplicate starts |',
            '|---|---|---|---|---|---|---|']
    out += [f'| {name} | {cell(verdict)} | {c["starts"]} | {c["scratch"]} / {c["resumed"]} / '
            f'{c["lock"]} / {c.get("before training", 0)} | {c.get("late scratch", 0)} | '
            f'{c["concurrent"]} | {c["duplicates"]} |'
            for name, verdict, c in result['trials']]
    if watch.concurrent:
      out += ['', 'Two training processes of one trial alive at once: ' + '; '.join(
          f'{t:.0f} s: {n} pids {p}' for t, n, p in watch.concurrent) + '.']
    out += ['', '| time (s) | run | disturbance | target | exit code | exit took (s) | what the '
            'controller printed last |', '|---|---|---|---|---|---|---|']
    for run in runs:
      for e in run['events']:
        took = '' if e['exit_s'] is None else f'{e["exit_s"]:.1f}'
        out.append(f'| {e["t"]:.0f} | {e["run"]} | {e["kind"]} | {cell(e["target"])} | '
                   f'{"running" if e["returncode"] is None else e["returncode"]} | {took} | '
                   f'{cell(e["said"])} |')
      if run['by'] is None:
        out.append(f'| | {run["run"]} | (none: ended by itself after {run["seconds"]:.0f} s) | | '
                   f'{run["returncode"]} | | {cell(run["last"])} |')
    out.append('')
  out += [f'Logs: `{args.workdir}/logs/` (one per controller run), each trial\'s `log.txt` and '
          'each search\'s `search_log.txt`.', '']
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write('\n'.join(out))


if __name__ == '__main__':
  main()
