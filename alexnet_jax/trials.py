"""Sweeps: trials built from override dicts, run as `alexnet_jax.main` processes, and their results.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()` returning a list of override dicts,
`{'optimizer.learning_rate': 0.02, 'model.lrn': False}`, usually built with `product` and `zip`.
Every dict (times every seed) is one trial: `python -m alexnet_jax.main --config=C
--workdir=DIR/<trial name> --config.k=v ...` in its own process, so trials cannot disturb each
other and each one resumes from its own checkpoints; alexnet_jax/launchers.py starts them (local
processes, or SLURM job arrays). A trial is finished when its `done` file exists; a failed one
(its config is the cause) gets an `error.txt` holding the error line and runs again only with
`--retry_failed`; an interrupted one (`interrupted.txt`: the OOM killer, a full disk...) or one
stopped by a signal resumes from its checkpoints when the same command runs again.
(`get_sweep()` may also return a search space, which alexnet_jax/search.py draws trials from.)
"""

from __future__ import annotations

import builtins
import csv
import dataclasses
import importlib.util
import itertools
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_path as field_paths
import tqdm

from alexnet_jax import curves, launchers
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.errors import ConfigError

Overrides = dict[str, Any]


def product(*parts: Mapping[str, Sequence[Any]] | Sequence[Overrides]) -> list[Overrides]:
  """Every combination. A part is `{key: [values]}` (each key an axis) or a list of override
  dicts (e.g. from `zip`); later parts vary fastest.

  product({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 1, 'b': 4}, {'a': 2, ...}, ...]
  """
  axes: list[list[Overrides]] = []
  for part in parts:
    if isinstance(part, Mapping):
      axes.extend([{k: v} for v in values] for k, values in part.items())
    else:
      axes.append(list(part))
  return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)]


def zip(axes: Mapping[str, Sequence[Any]]) -> list[Overrides]:  # pylint: disable=redefined-builtin
  """Values taken together, position by position: zip({'a': [1, 2], 'b': [3, 4]}) ==
  [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ConfigError(f'zip() needs lists of equal length, got {lengths}.')
  return [dict(builtins.zip(axes, values)) for values in builtins.zip(*axes.values())]


def sweep_file_value(path: str) -> Any:
  """What `get_sweep()` of the Python file at `path` returns (a list of override dicts, or a
  search space: alexnet_jax/search.py)."""
  spec = importlib.util.spec_from_file_location('sweep_file', path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f'--sweep={path} is not a file; pass a configs/sweeps/*.py file.')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    sweep = module.get_sweep() if hasattr(module, 'get_sweep') else None
  except Exception as e:  # the file's own error, whatever it is: one line naming it
    reason = (f'line {e.lineno}: {e.msg}' if isinstance(e, SyntaxError)
              else (str(e).strip().splitlines() or [''])[-1])
    raise ConfigError(f'--sweep={path} cannot be loaded ({type(e).__name__}: {reason}); fix that '
                      f'file.') from None
  if sweep is None:
    raise ConfigError(f'{path} defines no get_sweep(); it must return a list of override dicts.')
  return sweep


def load_sweep(path: str) -> list[Overrides]:
  """The list of override dicts that `get_sweep()` of the Python file at `path` returns."""
  sweep = sweep_file_value(path)
  if isinstance(sweep, dict):
    raise ConfigError(f'get_sweep() of {path} returned a search space (a dict); run it with '
                      f'--search=random or --search=tpe, or return a list of override dicts.')
  if not isinstance(sweep, (list, tuple)) or not all(isinstance(o, dict) for o in sweep):
    raise ConfigError(f'get_sweep() of {path} returned {str(sweep)[:80]}; it must return a list '
                      f'of override dicts.')
  return list(sweep)


def trial_name(overrides: Overrides) -> str:
  """The trial's directory name: `key=value` pairs joined by commas; `base` for no overrides."""
  if not overrides:
    return 'base'
  name = ','.join(f'{k}={v}' for k, v in overrides.items())
  return re.sub(r'[^\w.,=+-]', '_', name)


@dataclasses.dataclass(frozen=True)
class Trial:
  overrides: Overrides  # the sweep's overrides, plus `seed` with --seeds > 1
  group: str  # the trial name without the seed: seeds of one group are averaged

  @property
  def name(self) -> str:
    return trial_name(self.overrides)


def expand(sweep: Sequence[Overrides], seeds: int = 1, first_seed: int = 0) -> list[Trial]:
  """One trial per override dict, or `seeds` trials (seed = first_seed + i) per dict if > 1."""
  if seeds < 1:
    raise ConfigError(f'--seeds={seeds}; it must be at least 1.')
  trials = []
  for overrides in sweep:
    group = trial_name(overrides)
    if seeds == 1:
      trials.append(Trial(dict(overrides), group))
      continue
    if 'seed' in overrides:
      raise ConfigError(f'trial {group} sets seed itself; drop --seeds or the seed override.')
    trials.extend(Trial({**overrides, 'seed': first_seed + i}, group) for i in range(seeds))
  names = [t.name for t in trials]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ConfigError(f'the sweep lists the same trial more than once: {", ".join(duplicates)}.')
  return trials


def has_field(config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether `key` (a dotted path such as model.lrn) names a field of `config`."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def check_keys(config: ml_collections.ConfigDict, trials: Sequence[Trial]) -> None:
  """Raises on an override of a field the config does not have (a typo in the sweep file)."""
  for trial in trials:
    for key in trial.overrides:
      if not has_field(config, key):
        raise ConfigError(f'trial {trial.name}: the config has no field {key!r}; fix the sweep '
                          'file (fields are dotted paths such as model.lrn).')


def check_values(config: ml_collections.ConfigDict, values: Iterable[tuple[str, str, Any]],
                 config_path: str, base_overrides: Mapping[str, Any] = {}) -> None:
  """Raises on a (where, key, value) whose value the field `key` cannot take, parsed as the
  trial's `main` will parse `--config.key=value` (ml_collections: an int is a float field's
  value; 'big', or a float, is not an int field's), so a sweep fails here, before anything
  runs, not in each such trial later. `where` names the trial or the search space's key; each
  distinct key=value is parsed once (a few ms)."""
  seen = set()
  for where, key, value in values:
    if (arg := _flag(key, value)) in seen:
      continue
    seen.add(arg)
    try:
      trial_config(Trial({key: value}, ''), config_path, base_overrides)
    except flags.Error:
      raise ConfigError(f'{where}: {arg} is not a value {key} takes '
                        f'({field_paths.get_type(key, config).__name__}); fix the sweep file.'
                        ) from None


def _flag(key: str, value: Any) -> str:
  return f'--config.{key}={value}'


def _override_args(trial: Trial, base_overrides: Mapping[str, Any]) -> list[str]:
  """The sweep's own --config.x=y overrides first, then the trial's."""
  return [_flag(k, v) for k, v in [*base_overrides.items(), *trial.overrides.items()]]


def command(trial: Trial, config_path: str, workdir: str,
            base_overrides: Mapping[str, Any] = {}) -> list[str]:
  """The `python -m alexnet_jax.main` command line of one trial."""
  return ['python', '-m', 'alexnet_jax.main', f'--config={config_path}',
          f'--workdir={os.path.join(workdir, trial.name)}', *_override_args(trial, base_overrides)]


def trial_config(trial: Trial, config_path: str,
                 base_overrides: Mapping[str, Any] = {}) -> ml_collections.ConfigDict:
  """The config the trial's `main` process runs: its command line, parsed as main parses it."""
  argv = ['main', f'--config={config_path}', *_override_args(trial, base_overrides)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)  # the override flags are made from argv
  values(argv)
  return values.config


def check_stored_configs(trials: Sequence[Trial], config_path: str, workdir: str,
                         base_overrides: Mapping[str, Any] = {}) -> list[Trial]:
  """Compares each trial's stored config.json with what the sweep would run now.

  A difference in a field a run may not change (workdir.RESUMABLE) is a ConfigError naming the
  trials: their results answer another question. Trials marked done whose resumable fields
  changed (e.g. more epochs) lose the mark, so they resume; those are returned.
  """
  stale, reopened = [], []
  for trial in trials:
    stored = workdir_lib.stored_config_dict(os.path.join(workdir, trial.name))
    if stored is None:
      continue
    changed, resumable = workdir_lib.config_changes(
        stored, trial_config(trial, config_path, base_overrides))
    if changed:
      stale.append(f'{trial.name} ({", ".join(changed[:2])}{", ..." if len(changed) > 2 else ""})')
    elif resumable and os.path.exists(_done_path(workdir, trial)):
      reopened.append(trial)
  if stale:
    raise ConfigError(
        f'{len(stale)} trial{"s" if len(stale) > 1 else ""} in {workdir} ran with another config '
        f'than this sweep gives them: {stale[0]}{f" and {len(stale) - 1} more" if len(stale) > 1 else ""}'
        f'; use a fresh --workdir, or move those trial directories away to run them anew.')
  for trial in reopened:
    os.remove(_done_path(workdir, trial))
  return reopened


def _done_path(workdir: str, trial: Trial) -> str:
  return launchers.done_path(os.path.join(workdir, trial.name))


def _error_path(workdir: str, trial: Trial) -> str:
  return launchers.error_path(os.path.join(workdir, trial.name))


def task(trial: Trial, config_path: str, workdir: str,
         base_overrides: Mapping[str, Any] = {}) -> launchers.Task:
  """The trial as a launcher's task: its `main` command, in its own directory."""
  return launchers.Task(trial.name, command(trial, config_path, workdir, base_overrides),
                        os.path.join(workdir, trial.name))


@dataclasses.dataclass
class Result:
  trial: Trial
  status: str  # 'done', 'failed', 'interrupted' or 'unfinished'
  error: str = ''
  epochs: float = math.nan
  best_val_top1_error: float = math.nan
  best_val_top5_error: float = math.nan
  final_val_top1_error: float = math.nan
  final_val_top5_error: float = math.nan
  run: curves.Run | None = None


def collect(trial: Trial, workdir: str) -> Result:
  """The trial's status and its best/final validation errors from its metrics.jsonl."""
  trial_dir = os.path.join(workdir, trial.name)
  ended = launchers.finished(trial_dir)
  result = Result(trial, 'unfinished' if ended.state == 'stopped' else ended.state,
                  error=ended.error)
  if os.path.exists(os.path.join(trial_dir, 'metrics.jsonl')):
    run = curves.read_run(trial_dir)
    if run.evals:
      result.run = run
      result.epochs = run.evals[-1]['epoch']
      result.best_val_top1_error = min(l['val_top1_error'] for l in run.evals)
      result.best_val_top5_error = min(l['val_top5_error'] for l in run.evals)
      result.final_val_top1_error = run.evals[-1]['val_top1_error']
      result.final_val_top5_error = run.evals[-1]['val_top5_error']
  return result


_METRICS = ('best_val_top1_error', 'best_val_top5_error', 'final_val_top1_error',
            'final_val_top5_error')


def write_csv(results: Sequence[Result], path: str) -> None:
  """One row per trial: its name, group, overrides (one column per key), status and errors."""
  keys = list(dict.fromkeys(k for r in results for k in r.trial.overrides))
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['trial', 'group', *keys, 'status', 'epochs', *_METRICS, 'error'])
    for r in results:
      writer.writerow([r.trial.name, r.trial.group,
                       *(r.trial.overrides.get(k, '') for k in keys), r.status,
                       '' if math.isnan(r.epochs) else f'{r.epochs:g}',
                       *('' if math.isnan(getattr(r, m)) else f'{getattr(r, m):.6f}'
                         for m in _METRICS), r.error])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for a single value); nan for none."""
  if not values:
    return math.nan, math.nan
  mean = sum(values) / len(values)
  if len(values) == 1:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclasses.dataclass
class Group:
  """The trials of one override dict (its seeds), with the mean and spread over finished ones."""
  name: str
  results: list[Result]

  @property
  def done(self) -> list[Result]:
    return [r for r in self.results if r.status == 'done']

  def stat(self, metric: str) -> tuple[float, float]:
    return mean_std([getattr(r, metric) for r in self.done])


def group_results(results: Sequence[Result]) -> list[Group]:
  """Groups in order of mean best validation top-1 error; groups with no finished trial last."""
  groups: dict[str, list[Result]] = {}
  for r in results:
    groups.setdefault(r.trial.group, []).append(r)
  out = [Group(name, rs) for name, rs in groups.items()]
  return sorted(out, key=lambda g: (not g.done, g.stat('best_val_top1_error')[0]
                                    if g.done else 0.0))


def percent(mean_and_std: tuple[float, float], show_std: bool) -> str:
  mean, std = mean_and_std
  if math.isnan(mean):
    return '—'
  return f'{100 * mean:.2f} ± {100 * std:.2f}' if show_std else f'{100 * mean:.2f}'


def markdown_table(groups: Sequence[Group], logs: Mapping[str, str] = {}) -> str:
  """Errors in percent, mean ± sample std over the finished seeds of each group; a trial not
  done is noted with its error and (`logs`, by trial name) where its launcher's log is."""
  show_std = any(len(g.results) > 1 for g in groups)
  rows = ['| trial | finished | best val top-1 % | best val top-5 % | final val top-1 % | '
          'final val top-5 % | notes |', '|---|---|---|---|---|---|---|']
  for g in groups:
    notes = '; '.join(f'{r.trial.name} {r.status}' + (f': {r.error}' if r.error else '') +
                      (f' (SLURM log: {logs[r.trial.name]})' if r.trial.name in logs else '')
                      for r in g.results if r.status != 'done')
    rows.append(f'| {g.name} | {len(g.done)}/{len(g.results)} | ' +
                ' | '.join(percent(g.stat(m), show_std) for m in _METRICS) +
                f' | {notes.replace("|", "/")} |')
  return '\n'.join(rows) + '\n'


def write_report(trials: Sequence[Trial], workdir: str,
                 logs: Mapping[str, str] = {}) -> list[Result]:
  """Writes `workdir/results.csv`, `results.md` and `sweep.png`; returns the trials' results.
  `logs`: the SLURM job logs of trials, by name, for results.md's notes."""
  results = [collect(t, workdir) for t in trials]
  write_csv(results, os.path.join(workdir, 'results.csv'))
  groups = group_results(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'# Sweep results: {workdir}\n\nSorted by best validation top-1 error; errors in '
            'percent, mean ± sample standard deviation over seeds.\n\n')
    f.write(markdown_table(groups, logs))
  plotted = [r for r in results if r.run is not None]
  fig = curves.plot_val_curves([r.run for r in plotted], [r.trial.name for r in plotted],
                               [r.trial.group for r in plotted])
  curves.save(fig, os.path.join(workdir, 'sweep.png'))
  return results


def write_hparams(result: Result, workdir: str) -> None:
  """The trial's overrides and best errors for TensorBoard's hparams dashboard
  (`tensorboard --logdir DIR` compares all trials)."""
  from tensorboardX import SummaryWriter
  hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
             for k, v in result.trial.overrides.items()} or {'trial': result.trial.name}
  metrics = {f'hparam/{m}': getattr(result, m) for m in _METRICS
             if not math.isnan(getattr(result, m))}
  with SummaryWriter(os.path.join(workdir, result.trial.name, 'tensorboard')) as writer:
    writer.add_hparams(hparams, metrics, name='hparams')


def run_sweep(trials: Sequence[Trial], config_path: str, workdir: str, parallel: int = 1,
              base_overrides: Mapping[str, Any] = {}, log: Callable[[str], None] = print,
              launcher: launchers.Launcher | None = None, poll_s: float = 0.5,
              retry_failed: bool = False) -> list[Result]:
  """Runs every unfinished trial with `launcher` (default: local processes, `parallel` at a
  time), then writes the report; one controller per directory (its lock). Finished trials (a
  `done` file) are skipped, failed ones too unless `retry_failed`; trials still queued or
  running (SLURM jobs, or local processes a killed controller left) are watched, not started
  again; the others start and resume from their checkpoints. A signal (Ctrl-C) stops the sweep:
  local trials save a checkpoint and exit; SLURM jobs go on without the controller."""
  launcher = launcher or launchers.Local(parallel)
  workdir_lib.check_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  # The relay from the start: a signal while the directory is read is a stop like any other.
  with launchers.Relay(launcher) as signals, workdir_lib.Lock(workdir) as lock:
    note = lock.acquire()
    if note:
      log(note)
    return _control(trials, config_path, workdir, parallel, base_overrides, log, launcher,
                    poll_s, retry_failed, signals)


def _control(trials: Sequence[Trial], config_path: str, workdir: str, parallel: int,
             base_overrides: Mapping[str, Any], log: Callable[[str], None],
             launcher: launchers.Launcher, poll_s: float, retry_failed: bool,
             signals: launchers.Relay) -> list[Result]:
  """`run_sweep`'s loop, the directory locked, the signals relayed."""
  reopened = check_stored_configs(trials, config_path, workdir, base_overrides)
  if reopened:
    log(f'{len(reopened)} finished trial{"s" if len(reopened) > 1 else ""} resume with the '
        f'changed run length or logging fields: {", ".join(t.name for t in reopened)}')
  tasks = {t.name: task(t, config_path, workdir, base_overrides) for t in trials}
  live = {name for name, status in launcher.poll().items() if status.state in launchers.LIVE}
  adopted = launcher.adopt([tasks[t.name] for t in trials if t.name not in live])
  live |= adopted
  failed = [t for t in trials if os.path.exists(_error_path(workdir, t)) and t.name not in live]
  if retry_failed:
    for t in failed:
      os.remove(_error_path(workdir, t))
  todo = [t for t in trials if not os.path.exists(_done_path(workdir, t)) and t.name not in live
          and (retry_failed or t not in failed)]
  watched = [t for t in trials if t.name in live] + todo
  skipped = [t for t in trials if t not in watched and t not in failed]
  log(f'{len(skipped)} of {len(trials)} trials already finished' +
      (f', {len(failed)} failed (--retry_failed runs them again)' if failed and not retry_failed
       else '') + f'; running {len(todo)}, {parallel} at a time, in {workdir}' +
      (f'; re-attached to {len(watched) - len(todo)} still queued or running' if live else ''))
  reported: set[str] = set()
  resubmitted: set[str] = set()
  statuses: dict[str, launchers.Status] = {}
  if not signals.received:  # else nothing more starts
    launcher.submit([tasks[t.name] for t in todo])
  with tqdm.tqdm(total=len(watched), unit='trial', dynamic_ncols=True,
                 disable=not watched) as bar:
    while True:
      signals.pass_on()
      statuses = launcher.poll()
      counts = {state: 0 for state in launchers.STATES}
      waiting: set[str] = set()
      for trial in watched:
        status = statuses.get(trial.name, launchers.Status('queued'))
        if (status.state == 'stopped' and trial.name in adopted and not signals.received and
            trial.name not in resubmitted):
          # A process a killed controller left ended: its verdict went with that
          # controller, so it runs again and resumes (at once done if it had finished).
          resubmitted.add(trial.name)
          launcher.submit([tasks[trial.name]])
          status = launchers.Status('queued')
        counts[status.state] += 1
        if status.state == 'queued' and status.reason:
          waiting.add(status.reason[:40])
        if status.state in ('done', 'failed', 'interrupted') and trial.name not in reported:
          reported.add(trial.name)
          result = collect(trial, workdir)
          if status.state == 'done':
            write_hparams(result, workdir)
          bar.update(1)
          bar.write(_ended_line(trial, status, result, workdir, len(reported), len(watched)))
      bar.set_postfix({state: f'{n} ({", ".join(sorted(waiting))})' if state == 'queued' and
                       waiting else n for state, n in counts.items() if n})
      live_now = counts['queued'] + counts['running']
      if not live_now or (signals.received and launcher.detached):
        break
      time.sleep(poll_s)
  logs = {name: s.log for name, s in statuses.items() if s.log and s.state != 'done'}
  results = write_report(trials, workdir, logs)
  counts = {state: sum(r.status == state for r in results)
            for state in ('done', 'failed', 'interrupted', 'unfinished')}
  log(', '.join(f'{n} {"finished" if state == "done" else state}' for state, n in counts.items())
      + f'; wrote {os.path.join(workdir, "results.md")}, results.csv, sweep.png')
  if signals.received:
    running = sum(s.state in launchers.LIVE for s in statuses.values())
    log('Stopped by a signal; ' + (f'{running} trials go on queued or running on SLURM: run the '
                                   f'same command to re-attach to them and resume the rest.'
                                   if launcher.detached else
                                   'run the same command to resume the unfinished trials.'))
  elif counts['interrupted'] or counts['unfinished']:
    log('Some trials ended before they finished (interrupted: see results.md; or a time limit, '
        'scancel): run the same command to resume them.')
  return results


def _ended_line(trial: Trial, status: launchers.Status, result: Result, workdir: str, i: int,
                n: int) -> str:
  """The line for a trial that just finished or failed (the `i`th of `n`)."""
  if status.state == 'done':
    return (f'[{i}/{n}] {trial.name}: done, best val top-1 error '
            f'{100 * result.best_val_top1_error:.2f}%')
  log = status.log or os.path.join(workdir, trial.name, 'log.txt')
  what = ('FAILED' if status.state == 'failed' else
          'interrupted (the same command resumes it)')
  return f'[{i}/{n}] {trial.name}: {what}, {status.error} (log: {log})'
