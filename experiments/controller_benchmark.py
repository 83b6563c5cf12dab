"""What a search's controller costs while it waits on 100 ImageNet-length trials (issue 31).

    python experiments/controller_benchmark.py --seconds=60 \
        --out=experiments/results/controller_benchmark.md

Makes a real search directory in --workdir: an Optuna journal with 100 trials asked through
`search.Search` (random search, 90 epochs), and each trial's `metrics.jsonl` as a 90-epoch
ImageNet run leaves it (configs/imagenet.py logs every 100 of 10,009 steps an epoch: 9,000 train
lines and 90 evaluation lines, with train.Loop's keys). Then, side by side in one process:

  (a) one poll's `Search.records()`: before (each trial's whole log read again, as records() did
      with the read_run of the base commit, written out below) and after (a `curves.Tail` per
      trial): the first poll, then polls with nothing appended and polls after one line was
      appended to 5 trials (median and max over --polls); and the journal read alone.
  (b) the controller waiting: the real `search.control` loop (0.5 s polls) for --seconds, with a
      launcher whose 100 tasks stay 'running' (SLURM jobs it re-attached to), while another
      process appends a train line to 5 trials' logs every second (an evaluation line every
      tenth); its process CPU time over that time, before (records() as it was) and after.

Prints the figures with the load average before and after each measurement (the host may be
shared), and with --out writes them to a Markdown file with the command and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

import optuna

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from alexnet_jax import curves, launchers, search  # noqa: E402

TRIALS, EPOCHS, LINES_PER_EPOCH, STEPS_PER_EPOCH = 100, 90, 100, 10_009
APPENDED = 5  # trials whose logs grow while the controller waits


def train_line(step: int, rng: random.Random) -> str:
  """A line of train.Loop.log_train (the values' digits as json.dumps writes float32s)."""
  return json.dumps({'step': step, 'epoch': step / STEPS_PER_EPOCH,
                     'learning_rate': 0.009999999776482582,
                     'images_per_second': rng.uniform(2000, 3000),
                     'input_wait_fraction': rng.uniform(0, 0.05), 'nonfinite_steps': 0,
                     'train_loss': rng.uniform(1, 7), 'train_top1_error': rng.uniform(0, 1)}) + '\n'


def eval_line(step: int, rng: random.Random) -> str:
  """A line of train.Loop.end_of_epoch."""
  return json.dumps({'step': step, 'epoch': step / STEPS_PER_EPOCH,
                     'learning_rate': 0.009999999776482582,
                     'val_top1_error': rng.uniform(0.4, 1), 'val_top5_error': rng.uniform(0.2, 1),
                     'val_loss': rng.uniform(1, 7)}) + '\n'


def imagenet_log(rng: random.Random) -> str:
  lines = []
  for epoch in range(1, EPOCHS + 1):
    last = epoch * STEPS_PER_EPOCH
    lines += [train_line(s, rng) for s in range(last - 9_900, last, 100)]
    lines += [train_line(last, rng), eval_line(last, rng)]
  return ''.join(lines)


def old_records(s: search.Search) -> list[search.Record]:
  """Search.records() of the base commit (701db7e): each trial's log read whole, each poll."""
  out = []
  for frozen in s.study.get_trials(deepcopy=False):
    if frozen.state == optuna.trial.TrialState.WAITING:
      continue
    trial = search._trial(frozen.number, s.space.overrides(frozen.params))
    errors, top5, step = {}, {}, 0
    trial_dir = os.path.join(s.workdir, trial.name)
    if os.path.exists(os.path.join(trial_dir, 'metrics.jsonl')):
      run = old_read_run(trial_dir)
      for line in run.evals:
        errors[round(line['epoch'])] = line['val_top1_error']
        top5[round(line['epoch'])] = line['val_top5_error']
      step = max([l['step'] for l in run.train + run.evals], default=0)
    out.append(search.Record(trial, frozen, frozen.user_attrs.get('epochs', s.rungs[0]), errors,
                             top5, step))
  return out


def old_read_run(workdir: str) -> curves.Run:
  """curves.read_run of the base commit."""
  train, evals = {}, {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      (evals if 'val_top1_error' in record else train)[record['step']] = record
  return curves.Run(workdir, [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)])


class OldSearch(search.Search):
  def records(self) -> list[search.Record]:
    return old_records(self)


class Waiting:
  """A launcher whose tasks (all the search's trials) run the whole time, like SLURM jobs a
  controller re-attached to; its poll ends the controller (raises Elapsed) after `seconds`."""
  detached = True
  stopping = False

  class Elapsed(Exception):
    pass

  def __init__(self, names: list[str], seconds: float):
    self.statuses = {n: launchers.Status('running') for n in names}
    self.deadline, self.polls = time.monotonic() + seconds, 0

  def submit(self, tasks) -> None:
    raise AssertionError(f'the benchmark starts nothing, but the controller submitted {tasks}')

  def poll(self) -> dict[str, launchers.Status]:
    if time.monotonic() >= self.deadline:
      raise Waiting.Elapsed
    self.polls += 1
    return dict(self.statuses)

  def adopt(self, tasks) -> set[str]:
    return set()

  def stop(self, signum: int) -> None:
    pass


def open_search(workdir: str, kind: type = search.Search) -> search.Search:
  space = search.make_space({'optimizer.learning_rate': search.log_uniform(1e-3, 1e-1),
                             'optimizer.weight_decay': search.log_uniform(1e-5, 1e-2)},
                            'random', 'controller_benchmark')
  settings = search.Settings('random', TRIALS, 0, 'none', 1, 3, TRIALS)
  return kind(space, settings, [EPOCHS], os.path.join(REPO, 'configs', 'imagenet.py'), workdir,
              {}, search.journal(workdir))


def timed(fn, times: int) -> list[float]:
  out = []
  for _ in range(times):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def ms(values: list[float]) -> str:
  return (f'median {1e3 * statistics.median(values):.2f} ms, max {1e3 * max(values):.2f} ms '
          f'({len(values)} polls)')


def rss_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1e3


def load() -> str:
  return '/'.join(f'{x:.2f}' for x in os.getloadavg())


def append_forever(workdir: str) -> None:
  """The appender process: a train line to each of APPENDED trials a second, every tenth an
  evaluation line too."""
  rng = random.Random(1)
  for n in range(1, sys.maxsize):
    append(workdir, n, rng)
    time.sleep(1)


def append(workdir: str, n: int, rng: random.Random) -> None:
  """The n-th line appended to each of APPENDED trials' logs (every tenth, with an evaluation
  line)."""
  step = EPOCHS * STEPS_PER_EPOCH + 100 * n
  for k in range(APPENDED):
    with open(os.path.join(workdir, f'trial_{k:03d}', 'metrics.jsonl'), 'a') as f:
      f.write(train_line(step, rng) + (eval_line(step, rng) if n % 10 == 0 else ''))


def wait_cpu(s: search.Search, seconds: float, say) -> tuple[float, float, int]:
  """(CPU seconds, wall seconds, polls) of search.control waiting for `seconds`."""
  launcher = Waiting([r.trial.name for r in s.records()], seconds)  # warm: its first poll done
  appender = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                               f'--append_to={s.workdir}'])
  lines: list[str] = []
  cpu0, t0 = time.process_time(), time.perf_counter()
  try:
    with launchers.Relay(launcher) as signals:
      search.control(s, launcher, TRIALS, lines.append, signals, 0.5)
  except Waiting.Elapsed:
    pass
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
  appender.terminate()
  appender.wait()
  if lines:
    say(f'  (the controller said: {lines[:3]})')
  return cpu, wall, launcher.polls


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/controller_benchmark', help='Scratch directory.')
  parser.add_argument('--seconds', type=float, default=60, help='How long (b) waits, each way.')
  parser.add_argument('--polls', type=int, default=20, help='(a): polls timed after.')
  parser.add_argument('--polls_before', type=int, default=3, help='(a): polls timed before.')
  parser.add_argument('--out', default=None, help='Markdown report to write.')
  parser.add_argument('--append_to', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.append_to:
    return append_forever(args.append_to)
  output: list[str] = []
  say = lambda text: (print(text, flush=True), output.append(text))

  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  s = open_search(args.workdir)
  for _ in range(TRIALS):
    s.ask(s.records())
  log = imagenet_log(random.Random(0))
  for k in range(TRIALS):
    os.makedirs(os.path.join(args.workdir, f'trial_{k:03d}'))
    with open(os.path.join(args.workdir, f'trial_{k:03d}', 'metrics.jsonl'), 'w') as f:
      f.write(log)
  say(f'{TRIALS} trials in {args.workdir}, each metrics.jsonl {len(log) / 1e6:.2f} MB: '
      f'{EPOCHS * LINES_PER_EPOCH} train lines and {EPOCHS} evaluation lines')

  say('(a) one poll of Search.records()')
  one = os.path.join(args.workdir, 'trial_050')
  say(f'  load {load()}')
  say(f'  read one whole log: old read_run {ms(timed(lambda: old_read_run(one), 5))}; '
      f'curves.read_run now {ms(timed(lambda: curves.read_run(one), 5))}')
  say(f'  the journal alone, study.get_trials(deepcopy=False) of {TRIALS} trials: '
      f'{ms(timed(lambda: s.study.get_trials(deepcopy=False), args.polls))}')
  before = timed(lambda: old_records(s), args.polls_before)
  say(f'  before (every log read whole): {ms(before)}; load {load()}')
  fresh, rss = open_search(args.workdir), rss_mb()
  say(f'  after, first poll (every log read whole once): {ms(timed(fresh.records, 1))}; the '
      f"process's RSS {rss:.0f} MB before it, {rss_mb():.0f} MB after")
  say(f'  after, nothing appended: {ms(timed(fresh.records, args.polls))}')
  rng, appended = random.Random(2), []
  for n in range(1, args.polls + 1):
    append(args.workdir, n, rng)
    appended += timed(fresh.records, 1)
  say(f'  after, a line appended to {APPENDED} trials before each poll: {ms(appended)}; '
      f'load {load()}')
  same = lambda records: [(r.trial, r.errors, r.top5, r.step) for r in records]
  assert same(fresh.records()) == same(old_records(s)), 'before and after disagree'
  say(f'  the records before and after are equal; {statistics.median(before) / max(appended):.0f}x '
      f'faster (median before / max after)')

  say(f'(b) the controller waiting {args.seconds:.0f} s on {TRIALS} running trials, '
      f'{APPENDED} logs growing')
  for name, kind in (('before', OldSearch), ('after', search.Search)):
    l0 = load()
    cpu, wall, polls = wait_cpu(open_search(args.workdir, kind), args.seconds, say)
    say(f'  {name}: {cpu:.2f} s CPU in {wall:.1f} s = {100 * cpu / wall:.1f}% of a core; '
        f'{polls} polls ({1e3 * cpu / max(polls, 1):.1f} ms CPU a poll); load {l0} -> {load()}')

  if args.out:
    with open('/proc/cpuinfo') as f:
      model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), '?')
    command = ' '.join(['python experiments/controller_benchmark.py', *sys.argv[1:]])
    with open(args.out, 'w') as f:
      f.write('\n'.join([
          '# A search controller waiting on 100 ImageNet-length trials (issue 31)', '',
          f'{model}, {os.cpu_count()} cores, Python {platform.python_version()}, Optuna '
          f'{optuna.__version__}; load averages (1/5/15 min) are given with the figures.', '',
          '```', command, '```', '', 'Output:', '', '```', *output, '```', '']))


if __name__ == '__main__':
  main()
