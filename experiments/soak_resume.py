"""Kill-anywhere soak: a run killed at random moments and restarted each time ends bit-identical.

    python -m experiments.soak_resume --kills=20 --signals=KILL,TERM --workdir=/tmp/soak \
        --out=experiments/results/soak_resume.md

Trains a short digits run (the demo's model at 63 px, 2+ epochs, checkpoints every 4 steps, an
evaluation at every epoch end) once without interruption (the reference), then, for each signal,
the same run in a fresh workdir and a fresh TFDS data_dir, sent that signal at `--kills` random
wall-clock moments (uniform over the first `--window` of the reference's duration, so they land in
start-up, data preparation, compilation, steps, evaluations and checkpoint writes) and restarted
after each, and finally run to its end. Passes when every restart succeeded and the final
checkpoint (parameters, momentum, plateau state, step, RNG key), `metrics.jsonl` (every field but the
wall-clock ones) and the TensorBoard scalars equal the reference's. Not part of the test suite
(several minutes); `tests/test_resume.py` kills one run at one random step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from alexnet_jax.workdir import WALL_CLOCK_METRICS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 50  # 22 steps an epoch at batch 64: evaluations at 22, 44 and 50
RUN = ['--config=configs/default.py', '--config.dataset.image_size=63',
       '--config.train.batch_size=64', '--config.train.log_every_steps=2',
       '--config.train.checkpoint_every_steps=4', f'--config.train.num_train_steps={STEPS}']


def command(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, '-m', 'alexnet_jax.main', *RUN, f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}']


def start(workdir: str, data_dir: str, log) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, data_dir), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})


def metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  return [{k: v for k, v in l.items() if k not in WALL_CLOCK_METRICS} for l in lines]


def logged_step(workdir: str) -> int:
  try:
    return max((l['step'] for l in metrics(workdir)), default=0)
  except json.JSONDecodeError:  # killed mid-line
    return -1


def phase(workdir: str, step_before: int) -> str:
  """What the run was doing when the signal landed, as far as the files tell."""
  ckpt = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpt) and any('tmp' in name for name in os.listdir(ckpt)):
    return 'checkpoint write'
  if logged_step(workdir) <= step_before:
    return 'start-up (data, restore, compile)'
  return 'training / evaluation'


def final_state(workdir: str):
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, state


def same_state(a: str, b: str) -> bool:
  import jax
  (sa, ta), (sb, tb) = final_state(a), final_state(b)
  la, lb = jax.tree.leaves(ta), jax.tree.leaves(tb)
  return sa == sb and len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def tensorboard_matches(workdir: str) -> bool:
  """TensorBoard's view (purges applied) equals metrics.jsonl, first value per tag and step."""
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'))
  events.Reload()
  shown = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
           for tag in events.Tags()['scalars'] if tag not in WALL_CLOCK_METRICS}
  expected: dict[str, list] = {}
  for line in metrics(workdir):
    for tag, value in line.items():
      if tag != 'step' and line['step'] not in [s for s, _ in expected.get(tag, [])]:
        expected.setdefault(tag, []).append((line['step'], float(np.float32(value))))
  return shown == expected


def checks(workdir: str, reference: str, returncode: int) -> dict[str, bool]:
  if returncode:
    return {'final run exit 0': False}
  return {'final run exit 0': True,
          'final checkpoint identical': same_state(workdir, reference),
          'metrics.jsonl identical': metrics(workdir) == metrics(reference),
          'TensorBoard equals metrics.jsonl': tensorboard_matches(workdir)}


def soak(sig: signal.Signals, kills: int, window: float, root: str, reference: str,
         rng: random.Random, say) -> tuple[list[dict], list[dict[str, bool]]]:
  """Signals the run at `kills` random moments, restarting it after each. A run that finishes
  before its signal is complete: it is compared with the reference, and the soak goes on in a
  fresh workdir. Returns the signals' rows and the comparisons of every completed run."""
  workdir, data_dir = os.path.join(root, f'soak_{sig.name}'), os.path.join(root, f'tfds_{sig.name}')
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.rmtree(data_dir, ignore_errors=True)
  rows, completed = [], []
  with open(os.path.join(root, f'soak_{sig.name}.log'), 'w') as log:
    while len(rows) < kills:
      before = logged_step(workdir)
      moment = rng.uniform(0.5, window)
      proc = start(workdir, data_dir, log)
      try:
        returncode = proc.wait(timeout=moment)
        completed.append(checks(workdir, reference, returncode))
        say(f'  {sig.name}: the run ended (exit {returncode}) before signal {len(rows) + 1}: '
            f'{completed[-1]}; going on in a fresh workdir')
        shutil.rmtree(workdir)
        continue
      except subprocess.TimeoutExpired:
        proc.send_signal(sig)
      returncode = proc.wait()
      rows.append({'kill': len(rows) + 1, 'moment': moment, 'returncode': returncode,
                   'phase': phase(workdir, before), 'step': logged_step(workdir)})
      say(f'  {sig.name} {rows[-1]["kill"]:2d} at {moment:5.1f} s: exit {returncode}, '
          f'{rows[-1]["phase"]}, logged step {rows[-1]["step"]}')
    completed.append(checks(workdir, reference, start(workdir, data_dir, log).wait()))
  return rows, completed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=20, help='Signals sent per signal kind.')
  parser.add_argument('--signals', default='KILL,TERM', help='Comma-separated: KILL, TERM, INT.')
  parser.add_argument('--window', type=float, default=0.8,
                      help="Moments are uniform over this fraction of the reference's duration.")
  parser.add_argument('--workdir', default='/tmp/soak_resume', help='Scratch directory.')
  parser.add_argument('--seed', type=int, default=0, help='Seeds the kill moments.')
  parser.add_argument('--out', default=None, help='Markdown report to write.')
  args = parser.parse_args()
  sigs = [signal.Signals[f'SIG{name.strip().upper()}'] for name in args.signals.split(',')]
  os.makedirs(args.workdir, exist_ok=True)
  rng = random.Random(args.seed)
  lines: list[str] = []
  say = lambda text: (print(text, flush=True), lines.append(text))

  reference = os.path.join(args.workdir, 'reference')
  shutil.rmtree(reference, ignore_errors=True)
  t0 = time.perf_counter()
  with open(os.path.join(args.workdir, 'reference.log'), 'w') as log:
    rc = start(reference, os.path.join(args.workdir, 'tfds_reference'), log).wait()
  duration = time.perf_counter() - t0
  if rc:
    sys.exit(f'error: the reference run failed (exit {rc}); see {args.workdir}/reference.log')
  say(f'reference: {STEPS} steps in {duration:.1f} s; kill moments uniform in '
      f'[0.5, {args.window * duration:.1f}] s')

  results = {}
  for sig in sigs:
    rows, completed = soak(sig, args.kills, args.window * duration, args.workdir, reference, rng,
                           say)
    results[sig] = (rows, completed)
    say(f'{sig.name}: {len(rows)} signals, {len(completed)} completed runs; ' + '; '.join(
        f'{name}: {sum(c.get(name, False) for c in completed)}/{len(completed)}'
        for name in completed[-1]))

  passed = all(all(all(c.values()) and len(c) == 4 for c in completed)
               for _, completed in results.values())
  if args.out:
    write_report(args, duration, results, passed)
  sys.exit(0 if passed else 1)


def write_report(args, duration: float, results: dict, passed: bool) -> None:
  out = [f'# Kill-anywhere soak: {"PASSED" if passed else "FAILED"}', '',
         'Command (2 CPU cores):', '', '```',
         f'python -m experiments.soak_resume --kills={args.kills} --signals={args.signals} '
         f'--window={args.window} --seed={args.seed} --workdir={args.workdir} --out={args.out}',
         '```', '',
         f'The run: `python -m alexnet_jax.main {" ".join(RUN)}` ({STEPS} steps, evaluations at '
         f'steps 22, 44 and 50, checkpoints every 4 steps). Uninterrupted reference: '
         f'{duration:.1f} s. Each signal kind runs in a fresh workdir and a fresh TFDS data_dir, '
         f'so the first signals can land in the data set\'s preparation. After the last signal '
         f'the run is started once more and left to finish; it is then compared with the '
         f'reference.', '']
  for sig, (rows, completed) in results.items():
    phases = {}
    for row in rows:
      phases[row['phase']] = phases.get(row['phase'], 0) + 1
    out += [f'## {sig.name}: {len(rows)} signals, {len(rows)} restarts', '',
            'Where they landed: ' + ', '.join(f'{k}: {v}' for k, v in phases.items()) + '.', '',
            '| # | moment (s) | exit code | landed in | logged step after |', '|---|---|---|---|---|']
    out += [f'| {r["kill"]} | {r["moment"]:.1f} | {r["returncode"]} | {r["phase"]} | {r["step"]} |'
            for r in rows]
    out += ['', f'{len(completed)} completed run{"s" if len(completed) > 1 else ""} (a run '
            f'that ended before its next signal is compared, then the soak goes on afresh):', '']
    out += [f'- run {i}: ' + '; '.join(f'{name}: {"yes" if ok else "**NO**"}'
                                         for name, ok in c.items())
            for i, c in enumerate(completed, 1)] + ['']
  with open(args.out, 'w') as f:
    f.write('\n'.join(out))


if __name__ == '__main__':
  main()
