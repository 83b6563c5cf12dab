"""Time per train step of the towers (one per device) against the layout of an earlier revision, on
--devices CPU devices (replicas x model_parallel), in one run; and the collectives each compiles.

    python experiments/model_parallel_cpu.py --baseline_rev=e9737b4 \
        --markdown=experiments/results/model_parallel_cpu.md

--baseline_rev is a git revision of this repository (exported to a temporary directory with git
archive) whose `model_parallel` layout to compare with: at e9737b4 the step was manual over the
batch axis only and XLA partitioned each layer over the model axis from the parameters' layout.
Each case (the paper's network at 224, and the tests' tiny model) runs in fresh processes, one per
revision and round, in the order baseline, current, current, baseline (so a drift of the shared
machine's speed hits both alike); a process builds the experiment of configs/default.py with the
case's overrides, compiles the train step (its HLO text is kept: alexnet_jax/traffic.py of the
current tree reads the collectives of both), runs --warmup steps, then times --steps steps one by
one on the same random batch. A revision's figure is the median of all its timed steps.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from alexnet_jax import traffic  # noqa: E402  (after the path)
from experiments.report_out import emit  # noqa: E402

_BASELINE = flags.DEFINE_string('baseline_rev', None, 'The revision whose layout to compare.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'CPU devices (XLA_FLAGS).')
_MODEL_PARALLEL = flags.DEFINE_integer('model_parallel', 2, 'Devices per model replica.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per process.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Steps after the compiling one, not timed.')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Also write the report here.')
flags.mark_flag_as_required('baseline_rev')

# name -> (global batch, configs/default.py overrides)
CASES = {
    'paper network, 224x224, 1000 classes': (32, {'dataset.image_size': 224,
                                                  'model.num_classes': 1000}),
    'tests\' tiny model, 63x63, width 0.25, 10 classes': (16, {'dataset.image_size': 63,
                                                               'model.width': 0.25,
                                                               'model.num_classes': 10}),
}

# Runs in the tree under test (only API both revisions have): JSON on its last stdout line.
CHILD = '''
import json, sys, time
import jax, numpy as np
from configs import default
from alexnet_jax import experiment
batch_size, overrides, model_parallel, warmup, steps, hlo_path = json.loads(sys.argv[1])
config = default.get_config()
config.parallelism, config.model_parallel = 'jit', model_parallel
for key, value in overrides.items():
  section, field = key.split('.')
  config[section][field] = value
exp = experiment.build(config)
size, rng = exp.pre.image_size, np.random.default_rng(0)
batch = exp.parallel.put_batch({
    'image': rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
    'shift': rng.normal(0, 0.01, (batch_size, 3)).astype(np.float32),
    'label': rng.integers(0, config.model.num_classes, batch_size).astype(np.int32),
    'index': np.arange(batch_size, dtype=np.int32)})
state = exp.parallel.put_state(exp.init_state())
start = time.perf_counter()
compiled = exp.train_step.lower(state, batch).compile()
compile_s = time.perf_counter() - start
with open(hlo_path, 'w') as f:
  f.write(compiled.as_text())
for _ in range(warmup + 1):
  state, metrics = exp.train_step(state, batch)
jax.block_until_ready(metrics)
times = []
for _ in range(steps):
  start = time.perf_counter()
  state, metrics = exp.train_step(state, batch)
  jax.block_until_ready(metrics)
  times.append(time.perf_counter() - start)
print(json.dumps({'compile_s': compile_s, 'step_s': times,
                  'loss': float(exp.parallel.get(metrics)['train_loss'])}))
'''


def export(rev: str, into: str) -> str:
  """This repository's tree at `rev`, written under `into`."""
  archive = subprocess.run(['git', '-C', REPO, 'archive', rev], check=True, capture_output=True)
  os.makedirs(into)
  subprocess.run(['tar', '-x', '-C', into], input=archive.stdout, check=True)
  return into


def run_child(tree: str, batch_size: int, overrides: dict, hlo_path: str) -> dict:
  env = {**os.environ, 'PYTHONPATH': tree, 'TF_CPP_MIN_LOG_LEVEL': '3',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={_DEVICES.value}'}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # every process compiles: compile_s is comparable
  args = json.dumps([batch_size, overrides, _MODEL_PARALLEL.value, _WARMUP.value, _STEPS.value,
                     hlo_path])
  out = subprocess.run([sys.executable, '-c', CHILD, args], cwd=tree, env=env,
                       capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'{tree}: {out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def traffic_summary(hlo_text: str, mesh: tuple[int, int]) -> str:
  """Per axis: how many collectives of each kind, the bytes they send, and where (the named
  scope each runs in: our exchanges' names, or the flax layer XLA partitioned)."""
  found = traffic.collectives(hlo_text, mesh)
  parts = []
  for axis in ('model', 'mixed', 'batch'):
    mine = [c for c in found if c.axis == axis]
    if mine:
      kinds = {kind: sum(c.kind == kind for c in mine) for kind in traffic.KINDS}
      by_kind = ', '.join(f'{n} {kind}' for kind, n in kinds.items() if n)
      where = ', '.join(sorted({c.where for c in mine}))
      parts.append(f'{axis} axis: {len(mine)} collectives ({by_kind}), '
                   f'{sum(c.bytes_sent for c in mine):,} bytes sent per device, in: {where}')
  return '; '.join(parts)


def main(argv: list[str]) -> None:
  del argv
  rev = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', _BASELINE.value], check=True,
                       capture_output=True, text=True).stdout.strip()
  head = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'], check=True,
                        capture_output=True, text=True).stdout.strip()
  mesh = (_DEVICES.value // _MODEL_PARALLEL.value, _MODEL_PARALLEL.value)
  lines = [f'# Towers on their devices vs the layout of {rev}, {mesh[0]} x {mesh[1]} CPU devices',
           '', f'Current tree: {head} (and its working-tree changes); baseline: {rev}. '
           f'{_DEVICES.value} XLA:CPU devices (--xla_force_host_platform_device_count) on '
           f'{os.cpu_count()} cores, float32; {_WARMUP.value} warm-up and {_STEPS.value} timed '
           'steps per process, 2 processes per revision and case (order baseline, current, '
           'current, baseline); the median step.', '']
  with tempfile.TemporaryDirectory() as tmp:
    trees = {'baseline': export(rev, os.path.join(tmp, 'baseline')), 'current': REPO}
    lines += ['| case | revision | ms/step (median) | step times (ms) | compile s | loss |',
              '|---|---|---|---|---|---|']
    notes = []
    for case, (batch_size, overrides) in CASES.items():
      results = {'baseline': [], 'current': []}
      for i, name in enumerate(('baseline', 'current', 'current', 'baseline')):
        hlo = os.path.join(tmp, f'{name}.hlo')
        results[name].append(run_child(trees[name], batch_size, overrides, hlo))
        print(case, name, json.dumps(results[name][-1]), flush=True)
        if i < 2:
          with open(hlo) as f:
            notes.append(f'- {case}, {name}: {traffic_summary(f.read(), mesh)}')
      medians = {}
      for name, runs in results.items():
        times = [1e3 * t for run in runs for t in run['step_s']]
        medians[name] = statistics.median(times)
        cells = [f'{case} (batch {batch_size})', f'{name} ({rev if name == "baseline" else head})',
                 f'{medians[name]:.1f}', ', '.join(f'{t:.0f}' for t in times),
                 ', '.join(f'{run["compile_s"]:.1f}' for run in runs),
                 ', '.join(f'{run["loss"]:.5f}' for run in runs)]
        lines.append('| ' + ' | '.join(cells) + ' |')
      notes.append(f'- {case}: baseline / current time per step = '
                   f'**{medians["baseline"] / medians["current"]:.2f}**')
  lines += ['', 'Collectives of each compiled step (alexnet_jax/traffic.py; bytes by a '
            'bandwidth-optimal algorithm), and the ratios:', '', *notes]
  emit('\n'.join(lines), _MARKDOWN.value)


if __name__ == '__main__':
  app.run(main)
