"""The paper's ablations at small scale, next to the effects the paper reports.

    python -m experiments.ablation --seeds=3 --parallel=2 --config.train.num_epochs=8

runs `configs/sweeps/ablation.py` (the full model and each trick switched off) with every seed on
the config's data set (the offline digits by default; `--config=configs/imagenet.py` or
`--config.dataset.name=cifar10` for others) in `--workdir` (default `runs/ablation_<dataset>`),
resuming finished and unfinished trials like `alexnet_jax.sweep`, and writes
`experiments/results/ablation_<dataset>.md` (and `.png`, the validation curves): each row's final validation error (mean ± sample std
over seeds), its change against the full model (paired by seed) with its standard error, and
the paper's reported change.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import trials
from configs.sweeps import ablation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO, 'configs', 'default.py'), 'Config file (configs/*.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; default runs/ablation_<dataset>.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per row (at least 3 for a spread worth reading).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Trials run at the same time.')
_OUT = flags.DEFINE_string('out', None,
                           'Markdown table; default experiments/results/ablation_<dataset>.md.')

# The paper's change in ILSVRC validation error (percentage points, ablated minus full) when the
# trick is removed (docs/paper.md); None where the paper gives no number.
PAPER = {
    'full model': (None, None, ''),
    'no LRN': (1.4, 1.2, '§3.3'),
    'non-overlapping pooling': (0.4, 0.3, '§3.4'),
    'no PCA lighting': (1.0, None, '§4.1: top-1 "by over 1%"'),
    'no dropout': (None, None, '§4.2: no number; "substantial overfitting" without it'),
    'one GPU (half the kernels)': (1.7, 1.2, '§3.2: 48-128-192-192-256 kernels on one GPU'),
    'one tower, all kernels': (None, None, 'not in the paper: groups 1, every kernel kept'),
}


def difference(ablated: trials.Group, full: trials.Group, metric: str) -> tuple[float, float]:
  """Mean change in percentage points and its standard error. Rows share their seeds (the same
  data order and dropout masks), so the change is paired by seed: the mean of the per-seed
  differences, SE = their std / sqrt(n); unpaired (difference of means) if the seeds differ."""
  a = {r.trial.overrides.get('seed'): getattr(r, metric) for r in ablated.done}
  f = {r.trial.overrides.get('seed'): getattr(r, metric) for r in full.done}
  if not a or not f:
    return math.nan, math.nan
  if a.keys() == f.keys() and len(a) > 1:
    mean, std = trials.mean_std([a[s] - f[s] for s in a])
    return 100 * mean, 100 * std / math.sqrt(len(a))
  (ma, sa), (mf, sf) = trials.mean_std(list(a.values())), trials.mean_std(list(f.values()))
  return 100 * (ma - mf), 100 * math.sqrt(sa ** 2 / len(a) + sf ** 2 / len(f))


def verdict(change: float, stderr: float, paper: float | None) -> str:
  """Whether the measured change resolves the paper's direction at two standard errors."""
  if math.isnan(change):
    return 'no result'
  if stderr == 0 or abs(change) < 2 * stderr:
    return 'not resolved (within 2 SE)'
  if paper is None:
    return 'hurts' if change > 0 else 'helps'
  return 'holds' if change > 0 else 'reversed'


def signed(value: float | None, stderr: float | None = None) -> str:
  if value is None or math.isnan(value):
    return '—'
  return f'{value:+.2f}' + ('' if stderr is None else f' ± {stderr:.2f}')


def report(groups: dict[str, trials.Group], dataset: str, command: str, schedule: str) -> str:
  full = groups['full model']
  lines = [
      f'# The paper\'s ablations on `{dataset}`', '',
      f'Produced by `{command}`.', '',
      f'Schedule: {schedule}. Errors are the final validation errors (last epoch), in percent, '
      'mean ± sample standard deviation over seeds. "Change" is the row minus the full model in '
      'percentage points, paired by seed (every row runs the same seeds), ± its standard error '
      '(std of the per-seed differences / sqrt(seeds); positive: removing the trick hurts); "paper" is the change the paper reports on ILSVRC (docs/paper.md). '
      'The verdict asks whether our change is further than 2 standard errors from zero, in the '
      "paper's direction. A short schedule compares how fast each variant learns as much as "
      'where it ends (the paper: dropout "roughly doubles the number of iterations required to '
      'converge"); digits are 10 easy classes, so top-5 error is near 0.', '',
      '| row | seeds | top-1 % | top-5 % | change top-1 | paper top-1 | change top-5 | '
      'paper top-5 | verdict (top-1) | paper\'s note |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for label, (paper1, paper5, note) in PAPER.items():
    g = groups[label]
    c1, se1 = difference(g, full, 'final_val_top1_error')
    c5, se5 = difference(g, full, 'final_val_top5_error')
    is_full = label == 'full model'
    failures = [f'{r.trial.name}: {r.error or r.status}' for r in g.results if r.status != 'done']
    lines.append(
        f'| {label} | {len(g.done)}/{len(g.results)} | '
        f'{trials.percent(g.stat("final_val_top1_error"), True)} | '
        f'{trials.percent(g.stat("final_val_top5_error"), True)} | '
        f'{"" if is_full else signed(c1, se1)} | {signed(paper1)} | '
        f'{"" if is_full else signed(c5, se5)} | {signed(paper5)} | '
        f'{"" if is_full else verdict(c1, se1, paper1)} | '
        f'{"; ".join([note] * bool(note) + failures)} |')
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  dataset = config.dataset.name
  workdir = _WORKDIR.value or os.path.join('runs', f'ablation_{dataset}')
  out = _OUT.value or os.path.join(REPO, 'experiments', 'results', f'ablation_{dataset}.md')
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  base_overrides = config_flags.get_override_values(flags.FLAGS['config'])
  labels = {trials.trial_name(o): label for label, o in ablation.ABLATIONS.items()}
  trial_list = trials.expand(ablation.get_sweep(), _SEEDS.value, config.seed)
  trials.check_keys(config, trial_list)
  results = trials.run_sweep(trial_list, config_path, workdir, _PARALLEL.value, base_overrides)
  groups = {labels[g.name]: g for g in trials.group_results(results)}
  schedule = (f'{config.train.num_epochs} epochs of batch {config.train.batch_size} at '
              f'{config.dataset.image_size}px, LR {config.optimizer.learning_rate} with the '
              f'plateau rule (patience {config.optimizer.plateau.patience}), seeds '
              f'{config.seed}..{config.seed + _SEEDS.value - 1}')
  if config.train.num_train_steps > 0:
    schedule += f', capped at {config.train.num_train_steps} steps'
  command = 'python -m experiments.ablation ' + shlex.join(sys.argv[1:])
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  figure = os.path.splitext(out)[0] + '.png'
  shutil.copyfile(os.path.join(workdir, 'sweep.png'), figure)
  with open(out, 'w') as f:
    f.write(report(groups, dataset, command, schedule))
    f.write(f'\n![validation top-1 error of every trial]({os.path.basename(figure)})\n')
  print(f'wrote {out} and {figure}')


if __name__ == '__main__':
  app.run(main)
