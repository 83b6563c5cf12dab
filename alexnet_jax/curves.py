"""Training curves from `metrics.jsonl`: reading runs and drawing them with matplotlib.

Used by `python -m alexnet_jax.plot` (one figure per set of runs) and `python -m alexnet_jax.sweep`
(`sweep.png`, the validation error of every trial).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display on training machines
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from alexnet_jax.errors import ConfigError  # noqa: E402


@dataclasses.dataclass
class Run:
  """One workdir's metrics: train lines and evaluation lines, each sorted by step."""
  workdir: str
  train: list[dict[str, float]]
  evals: list[dict[str, float]]

  def series(self, key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of `key` from whichever lines carry it."""
    lines = self.evals if key.startswith('val_') else self.train
    points = [(l['epoch'], l[key]) for l in lines if key in l]
    return [e for e, _ in points], [v for _, v in points]

  def lr_drops(self) -> list[tuple[float, float]]:
    """(epoch, new LR) of every evaluation after which the plateau rule lowered the LR."""
    return [(cur['epoch'], cur['learning_rate']) for prev, cur in zip(self.evals, self.evals[1:])
            if cur['learning_rate'] < prev['learning_rate']]


def read_run(workdir: str) -> Run:
  """Reads `workdir/metrics.jsonl`; a step logged twice (a run resumed from an older checkpoint
  repeats the steps after it) keeps its newest line, and a line being written (a live run) is
  left out."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise ConfigError(f'{path} does not exist; pass the --workdir of a training run or of a '
                      f'sweep.')
  train: dict[int, dict[str, float]] = {}
  evals: dict[int, dict[str, float]] = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # empty, or cut short: a running (or killed) run's last line
        continue
      (evals if 'val_top1_error' in record else train)[record['step']] = record
  return Run(workdir, [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)])


def read_runs(workdirs: Sequence[str]) -> list[Run]:
  """`read_run` of each workdir; a sweep's workdir (python -m alexnet_jax.sweep), which has no
  metrics.jsonl of its own, stands for its trials (its subdirectories that have one), by name."""
  runs = []
  for workdir in workdirs:
    trials = ([] if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else
              sorted(glob.glob(os.path.join(glob.escape(workdir), '*', 'metrics.jsonl'))))
    runs += [read_run(os.path.dirname(t)) for t in trials] or [read_run(workdir)]
  return runs


def plot_runs(runs: Sequence[Run], labels: Sequence[str] | None = None) -> matplotlib.figure.Figure:
  """Training loss, validation top-1/top-5 error and the LR against epochs, one line per run in
  each panel; triangles mark the evaluations after which the plateau rule dropped the LR."""
  labels = labels or [os.path.basename(os.path.normpath(r.workdir)) for r in runs]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  panels = [('train_loss', 'training loss'), ('val_top1_error', 'validation top-1 error'),
            ('val_top5_error', 'validation top-5 error'), ('learning_rate', 'learning rate')]
  for ax, (key, title) in zip(axes.flat, panels):
    for i, (run, label) in enumerate(zip(runs, labels)):
      color = f'C{i % 10}'
      if key == 'learning_rate':  # the LR in force after each evaluation, as a step function
        ax.step([l['epoch'] for l in run.evals], [l['learning_rate'] for l in run.evals],
                where='post', color=color, label=label)
        points = run.lr_drops()
      else:
        ax.plot(*run.series(key), color=color, label=label, marker='.', markersize=4)
        drops = {epoch for epoch, _ in run.lr_drops()}
        points = [(e, v) for e, v in zip(*run.series(key)) if e in drops]
      if points:
        ax.scatter(*zip(*points), marker='v', s=40, color=color, zorder=3)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1, 1].set_yscale('log')
  for ax in axes[1]:
    ax.set_xlabel('epoch')
  axes[0, 0].legend(fontsize='small')
  fig.tight_layout()
  return fig


def plot_val_curves(runs: Sequence[Run], labels: Sequence[str],
                    groups: Sequence[str]) -> matplotlib.figure.Figure:
  """Validation top-1 error against epochs, one line per run, one colour per group (the runs
  that differ only in seed)."""
  fig, ax = plt.subplots(figsize=(9, 5.5))
  colors = {g: f'C{i % 10}' for i, g in enumerate(dict.fromkeys(groups))}
  seen = set()
  for run, label, group in zip(runs, labels, groups):
    ax.plot(*run.series('val_top1_error'), color=colors[group], alpha=0.8, marker='.',
            label=None if group in seen else group)
    seen.add(group)
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation top-1 error')
  ax.set_yscale('log')
  ax.grid(alpha=0.3, which='both')
  if runs:
    ax.legend(fontsize='small')
  fig.tight_layout()
  return fig


def save(fig: matplotlib.figure.Figure, path: str) -> None:
  fig.savefig(path, dpi=110)
  plt.close(fig)
