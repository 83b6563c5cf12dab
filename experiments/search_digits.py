"""A random search with ASHA early stopping against the same configs trained to the end.

    python -m experiments.search_digits --config.train.num_epochs=9

runs `configs/sweeps/search.py` (learning rate log-uniform in 1e-3..1e-1 × weight decay
log-uniform in 1e-5..1e-2) twice with the same `--search_seed`, so both draw the same configs:
with `--early_stop=asha` (r = `--min_epochs`, η = `--reduction_factor`) in `--asha_workdir`, and
with every trial trained to `train.num_epochs` in `--full_workdir`. Both continue like any search
(finished ones only rewrite their reports). Writes `experiments/results/search_digits.md` (the
commands, the comparison, each search's own report and log) and `.png` (both searches' curves).
The goal: ASHA's best validation error within 1 percentage point of the full-budget best, with
at most 45% of its epochs. It also checks, trial by trial, that what ASHA trained (paused and
promoted trials included) equals the same config's uninterrupted run over the epochs both have;
so ASHA can be replayed exactly on the full-budget curves: with other rungs, and ranking a rung on
other values than the controller's (validation loss, the best error so far, top-5 error), next
to each trial's ranks at the rungs. `--replay_seeds=1,2,3,4` adds those seeds' full-budget
searches and ASHA replayed on each, to show how often the goal holds on other draws.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import asha, curves, search, search_report
from alexnet_jax.workdir import WALL_CLOCK_METRICS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = 'configs/sweeps/search.py'
NOTES = '## Notes (written by hand after the run)'

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO, 'configs', 'default.py'), 'Config file (configs/*.py).',
    lock_config=True)
_TRIALS = flags.DEFINE_integer('trials', 9, 'Configs drawn.')
_SEED = flags.DEFINE_integer('search_seed', 0, 'Seed of the draws.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Trials run at the same time.')
_MIN_EPOCHS = flags.DEFINE_integer('min_epochs', 1, 'ASHA: the first rung, r.')
_ETA = flags.DEFINE_integer('reduction_factor', 3, 'ASHA: η.')
_ASHA_DIR = flags.DEFINE_string('asha_workdir', 'runs/search_asha', 'The ASHA search.')
_FULL_DIR = flags.DEFINE_string('full_workdir', 'runs/search_full', 'The full-budget search.')
_REPLAY_SEEDS = flags.DEFINE_list(
    'replay_seeds', [], 'More search seeds: each one\'s full-budget search is run (in '
    'FULL_WORKDIR_seedS) and ASHA is replayed on its curves, exactly, as the main seed checks.')
_REPLAY_PARALLEL = flags.DEFINE_integer('replay_parallel', 1,
                                        'Trials run at the same time in those searches.')
_OUT = flags.DEFINE_string('out', os.path.join(REPO, 'experiments', 'results', 'search_digits.md'),
                           'Markdown report (and .png beside it).')


def metric_lines(trial_dir: str) -> list[dict]:
  """metrics.jsonl without its wall-clock fields."""
  with open(os.path.join(trial_dir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in WALL_CLOCK_METRICS} for l in f]


def same_as_full(asha_dir: str, full_dir: str) -> bool:
  """Whether ASHA's trial logged exactly what the uninterrupted run logged up to that step."""
  asha_lines = metric_lines(asha_dir)
  last = asha_lines[-1]['step'] if asha_lines else 0
  return asha_lines == [l for l in metric_lines(full_dir) if l['step'] <= last]


def comparison(stopped: search_report.Report, full: search_report.Report, asha_dir: str,
               full_dir: str) -> tuple[list[str], dict]:
  """The table of both searches' trials, and the goal's figures."""
  full_by_name = {r.name: r for r in full.results}
  keys = list(stopped.results[0].values)
  lines = ['| trial | ' + ' | '.join(keys) + ' | ASHA: epochs | ASHA: val top-1 % at its last '
           'epoch | full: val top-1 % at that epoch | full: val top-1 % at the end | '
           'ASHA trained exactly what the full run did |', '|---' * (len(keys) + 6) + '|']
  identical = True
  for r in sorted(stopped.results, key=lambda r: r.name):
    f = full_by_name[r.name]
    assert f.values == r.values, (r.values, f.values)  # the same seed drew the same config
    same = same_as_full(os.path.join(asha_dir, r.name), os.path.join(full_dir, r.name))
    identical &= same
    lines.append(f'| {r.name} | ' + ' | '.join(f'{r.values[k]:.4g}' for k in keys) +
                 f' | {r.epochs} | {100 * r.last_error:.2f} | '
                 f'{100 * f.errors[r.epochs]:.2f} | {100 * f.last_error:.2f} | '
                 f'{"yes" if same else "NO"} |')
  best_asha = stopped.ranked()[0]
  best_full = full.ranked()[0]
  used = sum(r.epochs for r in stopped.results)
  full_epochs = sum(r.epochs for r in full.results)
  figures = dict(best_asha=best_asha, best_full=best_full, used=used, full_epochs=full_epochs,
                 gap=100 * (best_asha.last_error - best_full.last_error),
                 share=used / full_epochs, identical=identical)
  return lines, figures


def replay(curves: dict[str, dict[int, float]], rungs: Sequence[int], eta: int
           ) -> dict[str, int]:
  """The epochs each trial would get from ASHA with one slot, replayed on the full-budget runs'
  curves (`curves`: trial -> the value ASHA ranks on, per epoch, in draw order): as the
  controller does it, a trial trains to its rung, then the highest rung's promotion goes first,
  else the next trial starts. Exact, because a paused and promoted trial trains what its
  uninterrupted run trained (the comparison table checks it)."""
  targets: dict[str, int] = {}
  names = list(curves)
  while True:
    progress = {i: asha.Progress(targets[n], {e: x for e, x in curves[n].items()
                                              if e <= targets[n]}, True)
                for i, n in enumerate(names) if n in targets}
    promoted = asha.promotion(progress, rungs, eta)
    if promoted:
      targets[names[promoted[0]]] = promoted[1]
    elif len(targets) < len(names):
      targets[names[len(targets)]] = rungs[0]
    else:
      return targets


def val_curves(report: search_report.Report, workdir: str, key: str) -> dict[str, dict[int, float]]:
  """Each trial's `key` (a validation metric) per epoch, in draw order."""
  out = {}
  for r in sorted(report.results, key=lambda r: r.name):
    epochs, values = curves.read_run(os.path.join(workdir, r.name)).series(key)
    out[r.name] = {round(e): v for e, v in zip(epochs, values)}
  return out


def best_so_far(curve: dict[int, float]) -> dict[int, float]:
  return {e: min(v for f, v in curve.items() if f <= e) for e in curve}


def replay_row(errors: dict[str, dict[int, float]], ranked_on: dict[str, dict[int, float]],
               rungs: Sequence[int], eta: int) -> tuple[dict[str, int], str, float]:
  """(epochs per trial, the pick, its validation top-1 error) of ASHA ranking on `ranked_on`;
  the pick is the search's first-ranked trial: the highest rung, then the lowest validation
  top-1 error there, as results.md ranks them."""
  epochs = replay(ranked_on, rungs, eta)
  pick = min(epochs, key=lambda n: (-epochs[n], errors[n][epochs[n]], n))
  return epochs, pick, errors[pick][epochs[pick]]


def meets_goal(gap: float, share: float) -> bool:
  """The issue's goal: within 1 pp of the full-budget best, with at most 45% of its epochs."""
  return gap <= 1.0 and share <= 0.45


def against_goal(epochs: dict[str, int], error: float, best_full: float, max_epochs: int
                 ) -> tuple[float, float, bool]:
  """(share of the full budget's epochs, gap in pp to the full-budget best, whether the goal
  holds)."""
  share = sum(epochs.values()) / (len(epochs) * max_epochs)
  gap = 100 * (error - best_full)
  return share, gap, meets_goal(gap, share)


def replays(full: search_report.Report, real: search_report.Report, full_dir: str,
            max_epochs: int) -> list[str]:
  """Other rungs, and other values to rank on, replayed: epochs used and the pick against the
  full-budget best."""
  errors = val_curves(full, full_dir, 'val_top1_error')
  signals = {'val top-1 error at the rung (the controller\'s)': errors,
             'val loss at the rung': val_curves(full, full_dir, 'val_loss'),
             'best val top-1 error so far': {n: best_so_far(c) for n, c in errors.items()},
             'val top-5 error at the rung': val_curves(full, full_dir, 'val_top5_error')}
  best_full = min(c[max_epochs] for c in errors.values())
  real_epochs = {r.name: r.epochs for r in real.results}
  lines = ['| ranked on | r | η | rungs | epochs | share of the full budget | pick | its val '
           'top-1 % | gap, pp | goal |', '|---|---|---|---|---|---|---|---|---|---|']
  ours, *others = signals
  cases = [(ours, 1, 3), *((name, 1, 3) for name in others),
           *((ours, r, eta) for r, eta in ((1, 2), (2, 3), (2, 2), (3, 3)))]
  for name, r, eta in cases:
    rungs = asha.rungs(r, eta, max_epochs)
    epochs, pick, error = replay_row(errors, signals[name], rungs, eta)
    if (name, r, eta) == (ours, _MIN_EPOCHS.value, _ETA.value):
      assert epochs == real_epochs, (epochs, real_epochs)  # the replay is the real run
    share, gap, holds = against_goal(epochs, error, best_full, max_epochs)
    lines.append(f'| {name} | {r} | {eta} | {", ".join(map(str, rungs))} | '
                 f'{sum(epochs.values())} | {100 * share:.0f}% | {pick} | {100 * error:.2f} | '
                 f'{gap:+.2f} | {"holds" if holds else "misses"} |')
  return lines


def ranks(full: search_report.Report, full_dir: str, at: Sequence[int]) -> list[str]:
  """Each trial's rank (1: best) by validation top-1 error and by validation loss at the
  epochs `at`; ties go to the lower trial number, as in ASHA's promotions."""
  table = {key: val_curves(full, full_dir, key) for key in ('val_top1_error', 'val_loss')}
  names = sorted(table['val_top1_error'])
  rank = {(key, e): {n: i + 1 for i, n in enumerate(sorted(names, key=lambda n: (c[n][e], n)))}
          for key, c in table.items() for e in at}
  head = ' | '.join(f'{what} at epoch {e}' for e in at
                    for what in ('top-1 rank (error %)', 'loss rank (loss)'))
  lines = [f'| trial | {head} |', '|---' * (1 + 2 * len(at)) + '|']
  for n in sorted(names, key=lambda n: (table['val_top1_error'][n][at[-1]], n)):
    lines.append(f'| {n} | ' + ' | '.join(
        f'{rank["val_top1_error", e][n]} ({100 * table["val_top1_error"][n][e]:.2f}) | '
        f'{rank["val_loss", e][n]} ({table["val_loss"][n][e]:.3f})' for e in at) + ' |')
  return lines


def sweep_command(workdir: str, early: bool, overrides: Sequence[str], seed: int, parallel: int
                  ) -> list[str]:
  return (['python', '-m', 'alexnet_jax.sweep',
           f'--config={os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]), REPO)}',
           f'--sweep={SWEEP}', f'--workdir={workdir}', '--search=random',
           f'--trials={_TRIALS.value}', f'--search_seed={seed}', f'--parallel={parallel}'] +
          (['--early_stop=asha', f'--min_epochs={_MIN_EPOCHS.value}',
            f'--reduction_factor={_ETA.value}'] if early else []) + list(overrides))


def run_search(command: Sequence[str], config, config_path: str, base_overrides, workdir: str,
               early: bool, seed: int, parallel: int) -> search_report.Report:
  """Runs (or continues) one search and reads its report."""
  print(f'$ {shlex.join(command)}', flush=True)
  subprocess.run([sys.executable] + list(command[1:]), cwd=REPO, check=False)
  settings = search.Settings('random', _TRIALS.value, seed, 'asha' if early else 'none',
                             _MIN_EPOCHS.value, _ETA.value, parallel)
  return search.open_search(config, config_path, base_overrides, os.path.join(REPO, SWEEP),
                            workdir, settings, search.journal(workdir)).report()


def seed_rows(searches: Mapping[int, tuple[search_report.Report, str]], max_epochs: int
              ) -> list[str]:
  """Per seed: the full-budget best, ASHA replayed at (r, η) and at r=2, and how much the
  full-budget trials' errors move between their last two epochs (the noise the goal's 1 pp
  sits in)."""
  settings = ((_MIN_EPOCHS.value, _ETA.value), (2, 3))
  lines = ['| seed | full-budget best (val top-1 %) | ' + ' | '.join(
      f'ASHA r={r}, η={eta}: pick (%), gap pp, share, goal' for r, eta in settings) +
           ' | median change of a trial\'s error from epoch ' + f'{max_epochs - 1} to {max_epochs}, pp |',
           '|---' * (3 + len(settings)) + '|']
  held = {s: 0 for s in settings}
  for seed, (report, workdir) in sorted(searches.items()):
    errors = val_curves(report, workdir, 'val_top1_error')
    best = min(errors, key=lambda n: (errors[n][max_epochs], n))
    cells = []
    for r, eta in settings:
      epochs, pick, error = replay_row(errors, errors, asha.rungs(r, eta, max_epochs), eta)
      share, gap, holds = against_goal(epochs, error, errors[best][max_epochs], max_epochs)
      held[r, eta] += holds
      cells.append(f'{pick} ({100 * error:.2f}), {gap:+.2f}, {100 * share:.0f}%, '
                   f'{"holds" if holds else "misses"}')
    moves = sorted(abs(c[max_epochs] - c[max_epochs - 1]) for c in errors.values())
    lines.append(f'| {seed} | {best} ({100 * errors[best][max_epochs]:.2f}) | ' + ' | '.join(cells) +
                 f' | {100 * moves[len(moves) // 2]:.2f} |')
  lines += ['', 'The goal holds in ' + '; '.join(
      f'{held[s]} of {len(searches)} seeds at r={s[0]}, η={s[1]}' for s in settings) + '.']
  return lines


def log_of(workdir: str) -> str:
  path = os.path.join(workdir, 'search_log.txt')
  if not os.path.exists(path):
    return '(no search_log.txt)'
  with open(path) as f:
    return f.read().rstrip()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  base_overrides = config_flags.get_override_values(flags.FLAGS['config'])
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  reports, commands = {}, {}
  for name, workdir, early in (('asha', _ASHA_DIR.value, True), ('full', _FULL_DIR.value, False)):
    commands[name] = sweep_command(workdir, early, overrides, _SEED.value, _PARALLEL.value)
    reports[name] = run_search(commands[name], config, config_path, base_overrides, workdir,
                               early, _SEED.value, _PARALLEL.value)
  seeds = {}
  for seed in map(int, _REPLAY_SEEDS.value):
    workdir = f'{_FULL_DIR.value}_seed{seed}'
    commands[f'full, seed {seed}'] = sweep_command(workdir, False, overrides, seed,
                                                   _REPLAY_PARALLEL.value)
    seeds[seed] = (run_search(commands[f'full, seed {seed}'], config, config_path,
                              base_overrides, workdir, False, seed, _REPLAY_PARALLEL.value),
                   workdir)
  table, g = comparison(reports['asha'], reports['full'], _ASHA_DIR.value, _FULL_DIR.value)
  holds = meets_goal(g['gap'], g['share'])
  out = _OUT.value
  figure = os.path.splitext(out)[0] + '.png'
  fig, axes = curves.plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
  for ax, (name, title) in zip(axes, (('asha', f'ASHA (r={_MIN_EPOCHS.value}, η={_ETA.value})'),
                                      ('full', 'every trial to the end'))):
    search_report.plot(reports[name], ax)
    ax.set_title(f'{title}: {sum(r.epochs for r in reports[name].results)} epochs' +
                 ('\n○ paused, then promoted   × paused for good' if name == 'asha' else ''),
                 fontsize='small')
  fig.tight_layout()
  curves.save(fig, figure)
  text = [
      '# Search on the digits demo: ASHA with promotion against training every trial to the end',
      '', f'Produced by `python -m experiments.search_digits {shlex.join(sys.argv[1:])}`, which '
      'runs these two searches (the same seed draws the same configs) and reads their results:',
      '', '```bash', *(shlex.join(c) for c in commands.values()), '```', '',
      f'{_TRIALS.value} random draws of learning rate (log-uniform 1e-3..1e-1) × weight decay '
      f'(log-uniform 1e-5..1e-2) on `{os.path.relpath(config_path, REPO)}` at '
      f'{config.dataset.image_size}px, model width {config.model.width}, batch '
      f'{config.train.batch_size}, {config.train.num_epochs} epochs. Errors: validation top-1, '
      'in percent. Both bests are measured alike: a search\'s best is its first-ranked trial '
      '(the highest rung reached, then the lowest validation top-1 error at its last epoch; for '
      'both searches here, a trial trained to the last epoch), and its figure is that trial\'s '
      f'validation top-1 error after epoch {config.train.num_epochs}, not the best of its '
      'curve.' +
      (' The digits validation split has 360 images: one image is 0.28 percentage points.'
       if config.dataset.name == 'digits' else ''), '',
      '## Result', '',
      f'- ASHA\'s best: {g["best_asha"].name}, {100 * g["best_asha"].last_error:.2f}% after '
      f'{g["best_asha"].epochs} epochs; the full-budget best: {g["best_full"].name}, '
      f'{100 * g["best_full"].last_error:.2f}% after {g["best_full"].epochs} epochs: '
      f'{g["gap"]:+.2f} percentage points.',
      f'- Epochs trained: ASHA {g["used"]}, the full budget {g["full_epochs"]} '
      f'({100 * g["share"]:.0f}%).',
      f'- Goal (within 1 pp, at most 45% of the epochs): {"holds" if holds else "does not hold"}.',
      f'- Every ASHA trial, paused and promoted ones included, logged exactly the metrics (but '
      f'for wall-clock fields) of the same config\'s uninterrupted run over the epochs it trained: '
      f'{"yes" if g["identical"] else "NO"}.', '',
      *table, '', f'![validation error of every trial of both searches]({os.path.basename(figure)})',
      '', '## Replayed on the full-budget curves: what ASHA ranks on, and other rungs', '',
      'Because a paused and promoted trial trains exactly what its uninterrupted run trains (the '
      'last column above), ASHA with one slot can be replayed on the full-budget runs\' curves '
      'without training anything, ranking the trials of a rung on another value or with other r '
      'and η; the first row is the run above (the replay gives each trial the epochs the real run '
      'gave it: checked). The pick is the first-ranked trial (the highest rung, then the lowest '
      'validation top-1 error there, whatever the promotions ranked on); the gap is its error '
      'minus the full-budget best.', '',
      *replays(reports['full'], reports['asha'], _FULL_DIR.value, config.train.num_epochs), '',
      *(['## Other search seeds: their full-budget searches, with ASHA replayed', '',
         'The same benchmark drawn with other `--search_seed`s (the commands above): each '
         'seed\'s 9 configs trained to the end, and ASHA replayed on their curves as in the table '
         'above (exact: ASHA trains what the uninterrupted runs train, checked on the main seed). '
         f'The first row is the main seed, {_SEED.value}.', '',
         *seed_rows({_SEED.value: (reports['full'], _FULL_DIR.value), **seeds},
                    config.train.num_epochs), ''] if seeds else []),
      '## Each trial\'s rank at the rungs (full-budget curves)', '',
      'Rank 1 is the best; ties go to the lower trial number, as in the promotions. Sorted by '
      f'the validation top-1 error after epoch {config.train.num_epochs}.', '',
      *ranks(reports['full'], _FULL_DIR.value,
             asha.rungs(_MIN_EPOCHS.value, _ETA.value, config.train.num_epochs)),
      '']
  for name, title in (('asha', 'ASHA search'), ('full', 'Full-budget search')):
    workdir = _ASHA_DIR.value if name == 'asha' else _FULL_DIR.value
    with open(os.path.join(workdir, 'results.md')) as f:
      own = f.read().split('\n', 1)[1].strip()  # without its title
    text += [f'## {title}: its results.md', '', own, '', '### Its search_log.txt', '', '```',
             log_of(workdir), '```', '']
  if os.path.exists(out):  # notes written by hand after a run are kept
    with open(out) as f:
      kept = f.read().partition(NOTES)
    if kept[1]:
      text += [kept[1] + kept[2]]
  with open(out, 'w') as f:
    f.write('\n'.join(text).rstrip('\n') + '\n')
  print(f'wrote {out} and {figure}')


if __name__ == '__main__':
  app.run(main)
