"""Training curves from `metrics.jsonl`: reading runs (`Tail`: following live ones) and drawing
them with matplotlib.

Used by `python -m alexnet_jax.plot` (one figure per set of runs) and `python -m alexnet_jax.sweep`
(`sweep.png`, the validation error of every trial; a search's controller follows its trials with
a `Tail` each).
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
  return Tail(workdir).read()


class Tail:
  """`read_run` of a live run, again and again (a search's controller polls every trial): each
  `read` parses only what was appended to `metrics.jsonl` since the last one, and costs one
  stat when nothing was. A log that was rewound is read again from its start: replaced (a
  resumed run rewrites it atomically, up to its checkpoint: a new inode) or shorter than it was.
  A missing file reads as a run with no lines. With `only_last_train`, the run's train lines are
  its last one (what a controller needs; an ImageNet run's 9,000 would hold ~10 MB a trial)."""

  def __init__(self, workdir: str, only_last_train: bool = False):
    self.workdir, self._path = workdir, os.path.join(workdir, 'metrics.jsonl')
    self._only_last_train = only_last_train
    self._restart(None)

  def _restart(self, identity: tuple[int, int] | None) -> None:
    self._identity = identity  # (device, inode) of the file read so far
    self._size = 0  # its size when last read
    self._offset = 0  # the bytes parsed: all but a line still being written
    self._train: dict[int, dict[str, float]] = {}
    self._evals: dict[int, dict[str, float]] = {}
    self._run = Run(self.workdir, [], [])

  def read(self) -> Run:
    """The run as its file is now (the same object as the last read's if the file is as it
    was)."""
    try:
      stat = os.stat(self._path)
    except FileNotFoundError:
      if self._identity is not None:
        self._restart(None)
      return self._run
    if (stat.st_dev, stat.st_ino) == self._identity and stat.st_size == self._size:
      return self._run
    with open(self._path, 'rb') as f:
      stat = os.fstat(f.fileno())  # of what is read, should the path be replaced meanwhile
      if (stat.st_dev, stat.st_ino) != self._identity or stat.st_size < self._size:
        self._restart((stat.st_dev, stat.st_ino))
      f.seek(self._offset)
      data = f.read()
    self._size = self._offset + len(data)
    self._offset += self._parse(data)
    train, evals = self._train, self._evals
    self._run = Run(self.workdir, [train[s] for s in sorted(train)],
                    [evals[s] for s in sorted(evals)])
    return self._run

  def _parse(self, data: bytes) -> int:
    """Takes in the lines of `data`; returns how many bytes it used: all but a last line that
    does not parse yet (being written: the next read parses it whole)."""
    end = data.rfind(b'\n') + 1
    lines = data[:end].decode(errors='replace').split('\n')  # one decode: the faster
    lines[-1] = data[end:]  # not '' (after the last newline): the line being written, if any
    train, evals = self._train, self._evals
    for i, line in enumerate(lines):
      try:
        record = json.loads(line)
      except ValueError:  # empty, or cut short: a running (or killed) run's last line
        if i == len(lines) - 1:
          return end
        continue
      step = record['step']
      if 'val_top1_error' in record:
        evals[step] = record
      elif not self._only_last_train:
        train[step] = record
      elif not train or step >= next(iter(train)):
        train.clear()
        train[step] = record
    return len(data)


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
