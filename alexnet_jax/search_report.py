"""A search's report: `results.md` (trials ranked, epochs used, the best trial's command),
`results.csv` (one row per trial with its drawn values) and `search.png` (each trial's validation
error against epochs, its pauses marked). Written by alexnet_jax/search.py from plain data."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any

from alexnet_jax import curves, trials

STATUSES = ('done', 'paused', 'unfinished', 'interrupted', 'failed')


@dataclasses.dataclass
class Result:
  name: str
  values: trials.Overrides  # the trial's overrides: what the search drew
  # one of STATUSES: trained to the last epoch, paused at a rung, neither (stopped, or still to
  # run), interrupted (the same command resumes it), failed
  status: str
  errors: dict[int, float]  # validation top-1 error after each epoch
  top5: dict[int, float]
  error: str  # a failed or interrupted trial's error line
  command: str  # its command line without pauses: trains it to the end

  @property
  def epochs(self) -> int:
    return max(self.errors, default=0)

  @property
  def last_error(self) -> float:
    return self.errors[self.epochs] if self.errors else math.nan


@dataclasses.dataclass
class Report:
  results: list[Result]
  rungs: list[int]  # epochs; the last is the run's end
  search: str
  early_stop: str
  eta: int
  budget: int  # trials the search draws in all

  def rung(self, result: Result) -> int:
    """The highest rung the trial reached, counted from 1 (0: none)."""
    return sum(result.epochs >= e for e in self.rungs)

  def ranked(self) -> list[Result]:
    """Highest rung first, then lowest validation error there; trials with no result last."""
    return sorted(self.results, key=lambda r: (not r.errors, -self.rung(r), -r.epochs,
                                               r.last_error if r.errors else 0.0))

  def pauses(self, result: Result) -> list[int]:
    """The rungs (before the last epoch) where the trial paused: all it reached."""
    return [e for e in self.rungs[:-1] if e <= result.epochs]


def _value(v: Any) -> str:
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def _pct(x: float) -> str:
  return '—' if math.isnan(x) else f'{100 * x:.2f}'


def summary(report: Report) -> str:
  """Epochs trained against training every drawn trial to the end, and trials per rung."""
  used = sum(r.epochs for r in report.results)
  full = len(report.results) * report.rungs[-1]
  per_rung = ', '.join(f'epoch {e}: {sum(r.epochs >= e for r in report.results)}'
                       for e in report.rungs)
  return (f'Epochs trained: {used} of the {full} that training all {len(report.results)} trials '
          f'to epoch {report.rungs[-1]} takes ({100 * used / max(full, 1):.0f}%). '
          f'Trials that reached each rung: {per_rung}.')


def markdown(report: Report, workdir: str) -> str:
  keys = list(dict.fromkeys(k for r in report.results for k in r.values))
  how = (f'ASHA early stopping (rungs at epochs {", ".join(map(str, report.rungs))}, '
         f'η = {report.eta}): each trial pauses at its rung, and the best 1/{report.eta} of a '
         f'rung go on to the next one, resuming from their checkpoints'
         if report.early_stop == 'asha' else f'every trial trained to epoch {report.rungs[-1]}')
  lines = [f'# Search results: {workdir}', '',
           f'{report.search} search, {len(report.results)} of {report.budget} trials drawn; '
           f'{how}.', '', f'**{summary(report)}**', '',
           'Ranked by the rung reached, then by the validation top-1 error there; errors in '
           'percent.', '',
           '| rank | trial | ' + ' | '.join(keys) + ' | status | rung reached | epochs | '
           'val top-1 % | best val top-1 % | val top-5 % | notes |',
           '|---' * (len(keys) + 9) + '|']
  for i, r in enumerate(report.ranked(), 1):
    rung = (f'{report.rung(r)} of {len(report.rungs)} (epoch {report.rungs[report.rung(r) - 1]})'
            if report.rung(r) else '—')
    lines.append(
        f'| {i} | {r.name} | ' + ' | '.join(_value(r.values.get(k, '')) for k in keys) +
        f' | {r.status} | {rung} | {r.epochs} | {_pct(r.last_error)} | '
        f'{_pct(min(r.errors.values(), default=math.nan))} | '
        f'{_pct(r.top5[r.epochs] if r.top5 else math.nan)} | {r.error.replace("|", "/")} |')
  best = next((r for r in report.ranked() if r.errors), None)
  if best is not None:
    lines += ['', f'Best trial: {best.name}, validation top-1 error {_pct(best.last_error)}% '
              f'after {best.epochs} epochs. Its full command (trains it to epoch '
              f'{report.rungs[-1]}, without pauses):', '', '```bash', best.command, '```']
  return '\n'.join(lines) + '\n'


def write_csv(report: Report, path: str) -> None:
  """One row per trial: its drawn values (full precision), status, rung, epochs, errors."""
  keys = list(dict.fromkeys(k for r in report.results for k in r.values))
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['trial', *keys, 'status', 'rung', 'epochs', 'val_top1_error',
                     'best_val_top1_error', 'val_top5_error', 'error'])
    for r in report.results:
      fmt = lambda x: '' if math.isnan(x) else f'{x:.6f}'
      writer.writerow([r.name, *(r.values.get(k, '') for k in keys), r.status, report.rung(r),
                       r.epochs, fmt(r.last_error), fmt(min(r.errors.values(), default=math.nan)),
                       fmt(r.top5[r.epochs] if r.top5 else math.nan), r.error])


def plot(report: Report, ax: Any) -> None:
  """Draws each trial's validation top-1 error against epochs into `ax` (matplotlib axes); an
  open circle where it paused and went on later, a cross where it paused for good; dotted lines
  at the rungs."""
  for e in report.rungs:
    ax.axvline(e, color='0.8', linestyle=':', zorder=0)
  for i, r in enumerate(sorted(report.results, key=lambda r: r.name)):
    if not r.errors:
      continue
    color = f'C{i % 10}'
    epochs = sorted(r.errors)
    ax.plot(epochs, [r.errors[e] for e in epochs], color=color, marker='.', alpha=0.85,
            label=f'{r.name} ' + ' '.join(_value(v) for v in r.values.values()))
    went_on = [e for e in report.pauses(r) if e < r.epochs]
    ax.scatter(went_on, [r.errors[e] for e in went_on], s=70, facecolors='none',
               edgecolors=color, zorder=3)
    if r.status in ('paused', 'failed'):
      ax.scatter([r.epochs], [r.errors[r.epochs]], marker='x', s=60, color=color, zorder=3)
  ax.xaxis.set_major_locator(curves.matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation top-1 error')
  ax.set_yscale('log')
  ax.grid(alpha=0.3, which='both')
  ax.set_title('○ paused, then promoted   × paused (or failed) there for good', fontsize='small')
  if any(r.errors for r in report.results) and len(report.results) <= 20:
    ax.legend(fontsize='x-small')


def write(report: Report, workdir: str) -> list[Result]:
  """Writes `workdir/results.md`, `results.csv` and `search.png`; returns the results."""
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown(report, workdir))
  write_csv(report, os.path.join(workdir, 'results.csv'))
  fig, ax = curves.plt.subplots(figsize=(9, 5.5))
  plot(report, ax)
  fig.tight_layout()
  curves.save(fig, os.path.join(workdir, 'search.png'))
  return report.results
