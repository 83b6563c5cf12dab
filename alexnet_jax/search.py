"""Searches: search spaces, Optuna's ask-and-tell over a journal file, and the controller that runs
a search's trials, with ASHA early stopping whose paused trials resume when promoted.

A sweep file's `get_sweep()` may return a search space instead of a list of override dicts:

    def get_sweep():
      return {'optimizer.learning_rate': log_uniform(1e-3, 1e-1),
              'optimizer.weight_decay': log_uniform(1e-5, 1e-2),
              'model.lrn': choice(True, False), 'train.num_epochs': 9}  # a plain value: fixed

`python -m alexnet_jax.sweep --search=random|tpe --trials=N --search_seed=S` draws N configs from
it (`--search=grid` takes every combination of the `choice`s, or every dict of a list sweep, in
order; random and TPE draw one of a list sweep's dicts). Trial k is `DIR/trial_<k>/`, a
`python -m alexnet_jax.main` process like any sweep trial, and each start of it (the first, a
resumption, a promotion) is one task of alexnet_jax/launchers.py: a local process, or a SLURM job
whose records in `DIR/slurm/` let a new controller re-attach to it. The draws, each trial's epoch
budget and its results live in Optuna's journal file `DIR/search_journal.log` (one process
appends at a time under a file lock: no database, nothing to serve), the rest in the trial
directories; so running the same command again continues the search where it stopped. Trial
k's draw depends only on S and k (and, for TPE, on the results so far), so the same command draws
the same configs.

With `--early_stop=asha` (alexnet_jax/asha.py) every trial pauses at its rung: its command
carries `--config.train.pause_at_epoch=<rung>`, the run saves and exits there, and a promotion
runs it again with the next rung, resuming from that checkpoint: a promoted trial ends exactly as
if it had trained straight through. (So a trial's `done` file, the launcher's mark of a command
that exited 0, also marks a trial paused at its rung; the controller goes by `metrics.jsonl`.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from alexnet_jax import asha, curves, launchers, search_report, trials
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.errors import ConfigError

SEARCHES = ('grid', 'random', 'tpe')
EARLY_STOPS = ('none', 'asha')
JOURNAL = 'search_journal.log'
GRID_POINT = 'grid_point'  # the parameter of a list sweep: which of its dicts
PAUSE_FIELD = 'train.pause_at_epoch'


def log_uniform(low: float, high: float) -> FloatDistribution:
  """A float drawn uniformly in log space between low and high (both > 0)."""
  return FloatDistribution(low, high, log=True)


def uniform(low: float, high: float) -> FloatDistribution:
  return FloatDistribution(low, high)


def integer(low: int, high: int, log: bool = False) -> IntDistribution:
  """An int from low to high, both included (log: uniform in log space)."""
  return IntDistribution(low, high, log=log)


def choice(*values: Any) -> CategoricalDistribution:
  """One of `values` (None, bools, ints, floats or strings)."""
  return CategoricalDistribution(values)


@dataclasses.dataclass(frozen=True)
class Space:
  """What a search draws: Optuna distributions by parameter name, and how a draw becomes a
  trial's overrides (a space's keys in its order, or one of `points`, a list sweep's dicts)."""
  distributions: dict[str, BaseDistribution]
  template: dict[str, Any]  # key -> distribution or fixed value
  points: list[trials.Overrides] | None = None

  def overrides(self, params: Mapping[str, Any]) -> trials.Overrides:
    if self.points is not None:
      return dict(self.points[params[GRID_POINT]])
    return {k: params[k] if isinstance(v, BaseDistribution) else v
            for k, v in self.template.items()}

  def keys(self) -> list[str]:
    return list(dict.fromkeys(k for p in self.points for k in p) if self.points is not None
                else self.template)


def make_space(sweep: Any, search: str, path: str) -> Space:
  """The space of what `get_sweep()` of `path` returned, for `--search=search`."""
  if isinstance(sweep, dict):
    lists = [k for k, v in sweep.items() if isinstance(v, list)]
    if lists:
      raise ConfigError(f'the search space of {path} gives {lists[0]} a list; write '
                        f'choice(...) for values to search over (a tuple is a fixed value).')
    drawn = {k: v for k, v in sweep.items() if isinstance(v, BaseDistribution)}
    if not drawn:
      raise ConfigError(f'the search space of {path} has nothing to draw; give a key '
                        f'log_uniform, uniform, integer or choice values.')
    if search != 'grid':
      return Space(drawn, dict(sweep))
    continuous = [k for k, v in drawn.items() if not isinstance(v, CategoricalDistribution)]
    if continuous:
      raise ConfigError(f'--search=grid needs choice(...) values, but {continuous[0]} is '
                        f'{drawn[continuous[0]]}; use --search=random or --search=tpe.')
    sweep = trials.product({k: list(v.choices) if k in drawn else [v] for k, v in sweep.items()})
  if not (isinstance(sweep, (list, tuple)) and sweep and all(isinstance(o, dict) for o in sweep)):
    raise ConfigError(f'get_sweep() of {path} returned {str(sweep)[:80]}; it must return a list '
                      f'of override dicts or a search space (a dict).')
  if any(isinstance(v, BaseDistribution) for o in sweep for v in o.values()):
    raise ConfigError(f'get_sweep() of {path} returned a list holding log_uniform/uniform/'
                      f'integer/choice values; return one search space dict instead.')
  return Space({GRID_POINT: CategoricalDistribution(tuple(range(len(sweep))))}, {}, list(sweep))


def check_space(config: ml_collections.ConfigDict, space: Space, path: str, config_path: str,
                base_overrides: Mapping[str, Any] = {}) -> None:
  """Every key of the space names a config field, and every value it may give (each choice and
  fixed value, the bounds of a range) is one the field takes (checked before anything runs)."""
  for key in space.keys():
    if not trials.has_field(config, key):
      raise ConfigError(f'the search space of {path} names {key!r}, which the config does not '
                        f'have; fix the sweep file (fields are dotted paths such as model.lrn).')
  if space.points is not None:
    values = [(f'trial {trials.trial_name(point)}', k, v) for point in space.points
              for k, v in point.items()]
  else:
    values = [(f'the search space of {path}, key {k}', k, v) for k, d in space.template.items()
              for v in (d.choices if isinstance(d, CategoricalDistribution) else
                        (d.low, d.high) if isinstance(d, BaseDistribution) else (d,))]
  trials.check_values(config, values, config_path, base_overrides)


@dataclasses.dataclass(frozen=True)
class SearchTrial(trials.Trial):
  """Trial `number` of a search: `DIR/trial_<number>/`."""
  number: int = 0

  @property
  def name(self) -> str:
    return f'trial_{self.number:03d}'


def _trial(number: int, overrides: trials.Overrides) -> SearchTrial:
  return SearchTrial(dict(overrides), f'trial_{number:03d}', number)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags a search runs with. All but `trials` (more continues the search) and `parallel`
  must stay the same across runs of one search directory."""
  search: str = 'grid'
  trials: int = 0  # 0: every grid point
  seed: int = 0
  early_stop: str = 'none'
  min_epochs: int = 1
  eta: int = 3
  parallel: int = 1

  def fixed(self, rung_epochs: Sequence[int], space: Space) -> dict[str, Any]:
    """What a rerun must match: the search, its rungs and its space."""
    return {'search': self.search, 'search_seed': self.seed, 'early_stop': self.early_stop,
            'rungs': list(rung_epochs), 'eta': self.eta if self.early_stop == 'asha' else None,
            'space': {k: optuna.distributions.distribution_to_json(v)
                      for k, v in space.distributions.items()},
            'overrides': repr(space.points if space.points is not None else space.template)}


def check_settings(settings: Settings, max_epochs: int, config: ml_collections.ConfigDict
                   ) -> list[int]:
  """The rungs, or a ConfigError for flags that do not fit together."""
  if settings.search not in SEARCHES:
    raise ConfigError(f'--search={settings.search} is unknown; use one of {", ".join(SEARCHES)}.')
  if settings.early_stop not in EARLY_STOPS:
    raise ConfigError(f'--early_stop={settings.early_stop} is unknown; use none or asha.')
  if settings.search != 'grid' and settings.trials < 1:
    raise ConfigError(f'--search={settings.search} needs --trials=N, how many configs to draw.')
  if settings.trials < 0 or settings.parallel < 1:
    raise ConfigError(f'--trials={settings.trials} and --parallel={settings.parallel}: --trials '
                      f'must be at least 0 (0: every grid point) and --parallel at least 1.')
  if config.train.num_train_steps > 0:
    raise ConfigError(f'train.num_train_steps={config.train.num_train_steps}: a search counts '
                      f'whole epochs; set train.num_epochs instead.')
  if settings.early_stop == 'none':
    return [max_epochs]
  return asha.rungs(settings.min_epochs, settings.eta, max_epochs)


def _trial_seed(seed: int, number: int) -> int:
  """The sampler seed of trial `number`: its draw does not depend on how often the search was
  restarted (a sampler made once would replay its first draws after a restart)."""
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


@dataclasses.dataclass
class Record:
  """A trial of the search as the journal and its directory tell it."""
  trial: SearchTrial
  frozen: optuna.trial.FrozenTrial
  target: int  # the epoch it may train to: its rung
  errors: dict[int, float]  # validation top-1 error after each epoch it trained
  top5: dict[int, float]
  step: int  # the last step it logged

  @property
  def reached(self) -> int:
    return max(self.errors, default=0)

  @property
  def failed(self) -> bool:
    """Its config failed it (`Search.fail`; FAIL in the journals of earlier versions)."""
    return (self.frozen.state == optuna.trial.TrialState.FAIL or
            bool(self.frozen.user_attrs.get('error')))

  @property
  def live(self) -> bool:
    """Neither finished nor failed: it trains, waits at its rung, or waits to resume."""
    return self.frozen.state == optuna.trial.TrialState.RUNNING and not self.failed


class Search:
  """One search directory: its study (journal), space, rungs and trials."""

  def __init__(self, space: Space, settings: Settings, rung_epochs: Sequence[int],
               config_path: str, workdir: str, base_overrides: Mapping[str, Any],
               storage: optuna.storages.BaseStorage | None = None):
    self.space, self.settings, self.rungs = space, settings, list(rung_epochs)
    self.config_path, self.workdir, self.base_overrides = config_path, workdir, base_overrides
    self.budget = settings.trials or len(space.points)
    # records(): each trial's metrics.jsonl, read as far as it grew, and what its last Run gave
    self._tails: dict[str, curves.Tail] = {}
    self._progress_of: dict[str, tuple[curves.Run, tuple[Any, ...]]] = {}
    if space.points is not None and settings.search == 'grid' and self.budget > len(space.points):
      raise ConfigError(f'--trials={settings.trials} but the grid has {len(space.points)} '
                        f'points; pass at most that, or 0 for all.')
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None:  # a dry run: nothing written
      storage = optuna.storages.InMemoryStorage()
    self.study = optuna.create_study(study_name='search', storage=storage, load_if_exists=True,
                                     direction='minimize')
    fixed = settings.fixed(self.rungs, space)
    stored = self.study.user_attrs.get('settings')
    if stored is None:
      self.study.set_user_attr('settings', fixed)
    elif stored != fixed:
      changed = [k for k in fixed if stored.get(k) != fixed[k]]
      raise ConfigError(
          f'{workdir} holds a search started with other settings ({", ".join(changed)}: '
          f'{", ".join(json.dumps(stored.get(k))[:60] for k in changed)}); run it with those, or '
          f'use a fresh --workdir.')

  @property
  def max_epochs(self) -> int:
    return self.rungs[-1]

  def command(self, trial: SearchTrial, target: int) -> list[str]:
    """The trial's command line; paused at `target` unless that is the last epoch."""
    pause = {PAUSE_FIELD: target} if target < self.max_epochs else {}
    return trials.command(dataclasses.replace(trial, overrides={**trial.overrides, **pause}),
                          self.config_path, self.workdir, self.base_overrides)

  def task(self, trial: SearchTrial, target: int) -> launchers.Task:
    """The start of `trial` that trains it to epoch `target`, as a launcher's task."""
    return launchers.Task(trial.name, self.command(trial, target),
                          os.path.join(self.workdir, trial.name))

  def records(self) -> list[Record]:
    out = []
    for frozen in self.study.get_trials(deepcopy=False):
      if frozen.state == optuna.trial.TrialState.WAITING:
        continue  # drawn but not asked (a run killed between the two): the next ask takes it
      # The enqueued draw fills any parameter whose record a torn journal lost (`journal`).
      params = {**frozen.system_attrs.get('fixed_params', {}), **frozen.params}
      trial = _trial(frozen.number, self.space.overrides(params))
      out.append(Record(trial, frozen, frozen.user_attrs.get('epochs', self.rungs[0]),
                        *self._progress(trial.name)))
    return out

  def _progress(self, name: str) -> tuple[dict[int, float], dict[int, float], int]:
    """The trial's validation top-1 and top-5 errors by epoch and the last step it logged, from
    its metrics.jsonl (polled: read as far as it grew, worked out again only if it did)."""
    if name not in self._tails:
      self._tails[name] = curves.Tail(os.path.join(self.workdir, name), only_last_train=True)
    run = self._tails[name].read()
    if name not in self._progress_of or self._progress_of[name][0] is not run:
      errors = {round(l['epoch']): l['val_top1_error'] for l in run.evals}
      top5 = {round(l['epoch']): l['val_top5_error'] for l in run.evals}
      step = max([l['step'] for l in run.train[-1:] + run.evals[-1:]], default=0)
      self._progress_of[name] = run, (errors, top5, step)
    return self._progress_of[name][1]

  def draw(self, records: Sequence[Record]) -> dict[str, Any]:
    """The parameters of the next trial (number len(records)): the k-th grid point, or a draw of
    a sampler seeded for this trial; TPE sees every trial with a result, a paused one as pruned
    at its last epoch (Optuna's own study cannot reopen a trial it was told had ended)."""
    number = len(records)
    if self.settings.search == 'grid':
      return {GRID_POINT: number}
    seed = _trial_seed(self.settings.seed, number)
    sampler = (optuna.samplers.RandomSampler(seed=seed) if self.settings.search == 'random'
               else optuna.samplers.TPESampler(seed=seed))
    view = optuna.create_study(sampler=sampler, direction='minimize')
    if self.settings.search == 'tpe':
      view.add_trials([self._as_finished(r) for r in records if r.errors and not r.failed])
    return view.ask(self.space.distributions).params

  def _as_finished(self, record: Record) -> optuna.trial.FrozenTrial:
    done = record.reached >= self.max_epochs
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.PRUNED,
        value=record.errors[self.max_epochs] if done else None, params=record.frozen.params,
        distributions=record.frozen.distributions, intermediate_values=record.errors)

  def ask(self, records: Sequence[Record]) -> SearchTrial:
    """Records the next trial in the journal (enqueued with its draw, then asked)."""
    if not any(t.state == optuna.trial.TrialState.WAITING for t in self.study.get_trials(
        deepcopy=False)):
      self.study.enqueue_trial(self.draw(records))
    trial = self.study.ask(self.space.distributions)
    return _trial(trial.number, self.space.overrides(trial.params))

  def report(self) -> search_report.Report:
    return search_report.Report([_result(self, r) for r in self.records()], self.rungs,
                                self.settings.search, self.settings.early_stop,
                                self.settings.eta, self.budget)

  def first_wave(self) -> list[list[str]]:
    """The commands of the trials a fresh search starts first (--dry_run)."""
    wave = []
    for _ in range(min(self.settings.parallel, self.budget)):
      wave.append(self.command(self.ask(self.records()), self.rungs[0]))
    return wave

  def sync(self, record: Record) -> None:
    """Tells the journal what the trial's directory says: each epoch's validation error, and
    that it is complete when it reached the last epoch."""
    handle = self._handle(record)
    for epoch, error in record.errors.items():
      if epoch not in record.frozen.intermediate_values:
        handle.report(error, epoch)
    if record.reached >= self.max_epochs:
      self.study.tell(record.frozen.number, record.errors[self.max_epochs])
      trials.write_hparams(trials.collect(record.trial, self.workdir), self.workdir)

  def fail(self, record: Record, error: str) -> None:
    """Marks the trial failed: an attribute, not Optuna's FAIL, which no later run could undo
    (`retry`)."""
    self._handle(record).set_user_attr('error', error)

  def retry(self, record: Record) -> None:
    """A failed trial runs again (--retry_failed): it resumes from its checkpoints."""
    self._handle(record).set_user_attr('error', '')
    error_txt = launchers.error_path(os.path.join(self.workdir, record.trial.name))
    if os.path.exists(error_txt):
      os.remove(error_txt)

  def _handle(self, record: Record) -> optuna.trial.Trial:
    return optuna.trial.Trial(self.study, record.frozen._trial_id)

  def next_start(self, records: Sequence[Record], busy: set[str]
                 ) -> tuple[SearchTrial, int, str] | None:
    """(trial, epoch to train to, why) of the next start for a free slot: a trial short of its
    rung (it resumes), else ASHA's promotion, else a new trial while the budget lasts."""
    for r in records:
      if r.live and r.trial.name not in busy and r.reached < r.target:
        started = os.path.exists(os.path.join(self.workdir, r.trial.name, 'log.txt'))
        return r.trial, r.target, 'resumes' if started else 'starts'
    progress = {r.trial.number: asha.Progress(
        r.target, r.errors, r.live and r.trial.name not in busy and r.reached >= r.target)
        for r in records}
    promoted = asha.promotion(progress, self.rungs, self.settings.eta)
    if promoted:
      number, target = promoted
      record = next(r for r in records if r.trial.number == number)
      self._handle(record).set_user_attr('epochs', target)
      return record.trial, target, f'promoted to epoch {target}'
    if len(records) < self.budget:
      return self.ask(records), self.rungs[0], 'starts'
    return None


def journal(workdir: str, say: Callable[[str], None] = print) -> optuna.storages.JournalStorage:
  """The search's Optuna storage, `workdir/search_journal.log`, its damage dealt with first.
  Call it holding the directory's lock: nobody else writes the journal then."""
  path = os.path.join(workdir, JOURNAL)
  repair_journal(path, say)
  from optuna.storages.journal._file import LOCK_FILE_SUFFIX  # its name for the file lock
  if os.path.lexists(path + LOCK_FILE_SUFFIX):  # left by a killed controller: Optuna would wait
    os.remove(path + LOCK_FILE_SUFFIX)
  return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def repair_journal(path: str, say: Callable[[str], None]) -> None:
  """A record cut short at the end of the journal (a kill or a full disk mid-append) is dropped,
  with one line saying what it was: the trials' directories hold what it said, and the search
  writes it again (epochs, verdicts, promotions) or asks the trial again (same draw). A damaged
  record anywhere else is a ConfigError naming its line."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    data = f.read()
  lines = data.split(b'\n')
  torn = lines.pop()  # after the last newline: b'' unless the last append was cut short
  for number, line in enumerate(lines, 1):
    try:
      json.loads(line)
    except ValueError as e:
      raise ConfigError(f'{path} line {number} is damaged ({e}; it begins {line[:60]!r}): not '
                        f'the last record, so not a cut-short append; restore the file from a '
                        f'copy, or use a fresh --workdir.') from None
  if not torn:
    return
  try:
    json.loads(torn)
    with open(path, 'ab') as f:  # a whole record whose newline was lost: keep it
      f.write(b'\n')
    return
  except ValueError:
    pass
  from optuna.storages.journal._storage import JournalOperation  # the records' kinds
  op = re.search(rb'"op_code":\s*(\d+)', torn)
  kinds = {o.value: o.name.lower() for o in JournalOperation}
  what = kinds.get(int(op.group(1)), 'a record') if op else 'a record'
  with open(path, 'r+b') as f:
    f.truncate(len(data) - len(torn))
  say(f'warning: the last record of {path} was cut short (a kill or a full disk while it was '
      f'written) and is dropped: {what}, {len(torn)} bytes; the trials\' directories tell what '
      f'it said.')


def open_search(config: ml_collections.ConfigDict, config_path: str,
                base_overrides: Mapping[str, Any], sweep_path: str, workdir: str,
                settings: Settings, storage: optuna.storages.BaseStorage | None = None) -> Search:
  """The search of these flags, every check done (storage None: in memory, for a dry run)."""
  rung_epochs = check_settings(settings, config.train.num_epochs, config)
  space = make_space(trials.sweep_file_value(sweep_path), settings.search, sweep_path)
  check_space(config, space, sweep_path, config_path, base_overrides)
  return Search(space, settings, rung_epochs, config_path, workdir, base_overrides, storage)


def run(config: ml_collections.ConfigDict, config_path: str, base_overrides: Mapping[str, Any],
        sweep_path: str, workdir: str, settings: Settings, dry_run: bool = False,
        launcher: launchers.Launcher | None = None, log: Callable[[str], None] = print,
        poll_s: float = 0.5, retry_failed: bool = False) -> bool:
  """Runs (or continues) the search in `workdir` with `launcher` (default: local processes),
  then writes its report; with `dry_run` prints the first wave's commands instead. What it says
  also goes, time-stamped, to `workdir/search_log.txt`. Failed trials run again only with
  `retry_failed`. Returns whether it ended with every trial done or paused at its rung."""
  if dry_run:
    for args in open_search(config, config_path, base_overrides, sweep_path, workdir,
                            settings).first_wave():
      print(shlex.join(args))
    return True
  open_search(config, config_path, base_overrides, sweep_path, workdir, settings)  # the checks
  workdir_lib.check_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  launcher = launcher or launchers.Local(settings.parallel)

  def say(line: str) -> None:
    log(line)
    with open(os.path.join(workdir, 'search_log.txt'), 'a') as f:
      f.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {line}\n')

  # One controller per search directory (its lock); the relay from the start: a signal while the
  # directory is read is a stop like any other.
  with launchers.Relay(launcher) as signals, workdir_lib.Lock(workdir) as lock:
    if lock.acquire():
      say(f'A search controller in {workdir} ended without releasing it; continuing its search.')
    search = open_search(config, config_path, base_overrides, sweep_path, workdir, settings,
                         journal(workdir, say))
    records = search.records()
    trials.check_stored_configs([r.trial for r in records], config_path, workdir, base_overrides)
    failed = [r for r in records if r.failed]
    for record in failed if retry_failed else []:
      if record.frozen.state == optuna.trial.TrialState.FAIL:
        say(f'{record.trial.name} failed in a journal of an earlier version, which cannot undo '
            f'that; it stays failed.')
      else:
        search.retry(record)
        say(f'{record.trial.name} runs again (--retry_failed); it failed with: '
            f'{record.frozen.user_attrs["error"]}')
    retry = (f', {len(failed)} failed (--retry_failed runs them again)'
             if failed and not retry_failed else '')
    say(f'{settings.search} search in {workdir}: {len(records)} of {search.budget} trials drawn'
        f'{retry}; rungs at epochs {", ".join(map(str, search.rungs))}; {settings.parallel} at a time')
    stopped = control(search, launcher, settings.parallel, say, signals, poll_s)
    results = search_report.write(search.report(), workdir)
  counts = {s: sum(r.status == s for r in results) for s in search_report.STATUSES}
  say(', '.join(f'{n} {s}' for s, n in counts.items() if n) + f'; wrote '
      f'{os.path.join(workdir, "results.md")}, results.csv, search.png')
  if stopped:
    say('Stopped by a signal; ' + ('its SLURM jobs go on: run the same command to re-attach to '
                                   'them and continue the search.' if launcher.detached else
                                   'run the same command to continue the search.'))
  elif counts['interrupted'] or counts['unfinished']:
    say('Some trials were interrupted or stopped (results.md says why): run the same command to '
        'resume them.')
  return not stopped and counts['done'] + counts['paused'] == len(results)


def control(search: Search, launcher: launchers.Launcher, parallel: int,
            log: Callable[[str], None], signals: launchers.Relay, poll_s: float = 0.5) -> bool:
  """Starts, resumes and promotes trials, each start one task of `launcher`, `parallel` at a
  time, until no start is left; returns whether a signal stopped it. On a signal nothing more
  starts: local trials get it once (they save and exit); SLURM jobs go on, and the next
  controller finds them in the launcher's records. A local trial that a killed controller left
  running is adopted: it counts as running until it ends, and gets this controller's signals."""
  launched: dict[str, int] = {}  # trial -> the step it had logged when this controller started it
  held: set[str] = set()  # ended short of its rung by no fault of its config: left for a rerun
  elsewhere: set[str] = set()  # running from a start that nobody here knows (its lock is held)
  reasons: dict[str, str] = {}  # why a queued trial waits, as last said
  records = search.records()
  for name in sorted(launcher.adopt([search.task(r.trial, r.target) for r in records
                                     if r.live])):
    log(f'{name}: still running from an earlier controller; waiting for it')
  while True:
    signals.pass_on()
    statuses = launcher.poll()
    elsewhere = {n for n in elsewhere
                 if workdir_lib.is_locked(os.path.join(search.workdir, n))}
    busy = {n for n, s in statuses.items() if s.state in launchers.LIVE} | elsewhere
    for name, status in sorted(statuses.items()):
      reason = status.reason if status.state == 'queued' else ''
      if reason != reasons.get(name, ''):
        if reason:
          log(f'{name}: queued ({reason})')
        reasons[name] = reason
    records = search.records()
    for record in records:
      if record.live and record.trial.name not in busy:
        trial_dir = os.path.join(search.workdir, record.trial.name)
        _judge(search, record, statuses.get(record.trial.name) or launchers.finished(trial_dir),
               launched, held, log)
    if signals.received:
      if launcher.detached or not busy:
        return True
    else:
      while len(busy) < parallel:
        start = search.next_start(search.records(), busy | held)
        if start is None:
          break
        trial, target, why = start
        busy.add(trial.name)
        if workdir_lib.is_locked(os.path.join(search.workdir, trial.name)):
          log(f'{trial.name}: still running from an earlier controller; waiting for it')
          elsewhere.add(trial.name)
          continue
        log(f'{trial.name} {why}: {" ".join(f"{k}={v}" for k, v in trial.overrides.items())}'
            f'{f", to epoch {target}" if why == "starts" and target < search.max_epochs else ""}')
        launched[trial.name] = next((r.step for r in records if r.trial.name == trial.name), 0)
        launcher.submit([search.task(trial, target)])
      if not busy:
        return False
    time.sleep(poll_s)


def _judge(search: Search, record: Record, status: launchers.Status, launched: Mapping[str, int],
           held: set[str], log: Callable[[str], None]) -> None:
  """Reads a trial that is not running into the journal: its epochs, and that it finished or
  failed. A trial that exited 0 short of its rung with no step trained since this controller
  started it fails (it would start again and again); one interrupted (a cause outside its
  config), or stopped short of its rung with no progress (a signal, a cancelled job), is held:
  the next run of the search resumes it; one that made progress, paused at its rung or stopped
  part-way (pre-empted), waits for its next start."""
  name = record.trial.name
  trial_dir = os.path.join(search.workdir, name)
  stalled = record.reached < record.target and record.step <= launched.get(name, -1)
  if status.state == 'failed':
    error = status.error
  elif stalled and status.state == 'done':
    error = f'exit code 0 at step {record.step} with no progress, short of its rung'
    workdir_lib.write_atomic(launchers.error_path(trial_dir), error + '\n')
  else:
    # Interrupted under this controller: held for the next run of the command (an interruption
    # an earlier run recorded resumes now).
    if ((status.state == 'interrupted' and name in launched) or stalled) and name not in held:
      held.add(name)
      why = (f'interrupted ({status.error})' if status.state == 'interrupted' else
             f'ended with no progress, short of its rung ({status.state})')
      log(f'{name}: {why} at step {record.step}'
          f'{f"; SLURM log: {status.log}" if status.log else ""}; run the same command to '
          f'resume it')
    search.sync(record)
    if record.reached >= search.max_epochs:
      log(f'{name}: done, val top-1 error {100 * record.errors[search.max_epochs]:.2f}% after '
          f'{record.reached} epochs')
    return
  search.fail(record, error)
  log(f'{name}: FAILED, {error} (log: {status.log or os.path.join(trial_dir, "log.txt")})')


def _result(search: Search, record: Record) -> search_report.Result:
  """The report's view of a trial."""
  error = ''
  if record.failed:
    status, error = 'failed', record.frozen.user_attrs.get('error', '')
  elif record.reached >= search.max_epochs:
    status = 'done'
  elif record.reached >= record.target:
    status = 'paused'
  else:
    ended = launchers.finished(os.path.join(search.workdir, record.trial.name))
    status = 'interrupted' if ended.state == 'interrupted' else 'unfinished'
    error = ended.error if status == 'interrupted' else ''
  return search_report.Result(
      record.trial.name, record.trial.overrides, status, record.errors, record.top5, error,
      shlex.join(search.command(record.trial, search.max_epochs)))
