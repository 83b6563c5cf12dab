"""The training loop: resume, train, log, evaluate after every epoch, feed the plateau rule, save.

`train_and_evaluate` reads as the loop it runs; each of its steps is a named function below. The
pure per-device steps are in alexnet_jax/steps.py, built for the config by
alexnet_jax/experiment.py; what the run directory holds (lock, config.json, metrics, the stop
signal) is alexnet_jax/workdir.py's, checkpoints alexnet_jax/checkpoints.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from alexnet_jax import checkpoints, cluster, experiment, models, optim, steps
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.errors import STOPPED, ConfigError, Interrupted, TrainingStopped
from alexnet_jax.parallel import Parallel

if TYPE_CHECKING:
  from alexnet_jax import input_pipeline

Batches = Iterator[dict[str, np.ndarray]]
# (host batches, the step the first one is for) -> batches: how tests alter the stream.
BatchHook = Callable[[Batches, int], Batches]
NONFINITE = ('stop', 'skip')
PROCESS_READS = ('shard', 'all')  # dataset.process_reads


def check_config(config: ml_collections.ConfigDict) -> None:
  """The checks that need no data: fail in a second, before anything is compiled or written."""
  experiment.check(config)
  t, parallel = config.train, experiment.parallel_of(config)
  parallel.check_batch_size(t.batch_size)
  parallel.check_batch_size(t.eval_batch_size, 'train.eval_batch_size')
  if config.dataset.process_reads not in PROCESS_READS:
    raise ConfigError(f'dataset.process_reads={config.dataset.process_reads!r} is unknown; use '
                      f'one of {PROCESS_READS}.')
  if t.on_nonfinite not in NONFINITE:
    raise ConfigError(f'train.on_nonfinite={t.on_nonfinite!r} is unknown; use one of {NONFINITE}.')
  if t.profile_steps < 0:
    raise ConfigError(f'train.profile_steps={t.profile_steps} must be 0 (off) or a number of steps.')
  if t.pause_at_epoch < 0:
    raise ConfigError(f'train.pause_at_epoch={t.pause_at_epoch} must be 0 (off) or an epoch.')
  if t.log_every_steps <= 0:
    raise ConfigError(f'train.log_every_steps={t.log_every_steps} must be positive.')
  if t.checkpoint_every_steps < 0 or t.checkpoint_every_steps % t.log_every_steps:
    raise ConfigError(
        f'train.checkpoint_every_steps={t.checkpoint_every_steps} must be a multiple of '
        f'train.log_every_steps={t.log_every_steps} (0: checkpoint at epoch ends only), so a '
        f'resumed run logs exactly what an uninterrupted one does.')
  layers = models.layer_names(config.model.variant)
  for field in ('optimizer.frozen_layers', 'init.reinit'):
    unknown = [name for name in config[field] if name not in layers]
    if unknown:
      raise ConfigError(f'{field} names {unknown}, not layers of the {config.model.variant!r} '
                        f'model; use some of {layers}.')
  if config.init.reinit and not config.init.checkpoint:
    raise ConfigError(f'init.reinit={tuple(config.init.reinit)} re-initialises layers of '
                      f'init.checkpoint, which is not set; set it or clear init.reinit.')


def num_classes_of(config: ml_collections.ConfigDict, split: input_pipeline.Split) -> int:
  """`model.num_classes`, or the data's when it is -1; a mismatch is an error."""
  num_classes = config.model.num_classes
  if num_classes == -1:
    return split.num_classes
  if num_classes != split.num_classes:
    raise ConfigError(f'model.num_classes={num_classes} but {config.dataset.name} has '
                      f'{split.num_classes} classes; set it to -1 to follow the data.')
  return num_classes


def init_from_checkpoint(init: ml_collections.ConfigDict, params: Any) -> tuple[Any, int]:
  """`params` whose layers not in `init.reinit` come from `init.checkpoint`; and its step.

  The checkpoint must hold the same layers with the same shapes except those re-initialised
  (fine-tuning: `reinit=('fc8',)` gives fc8 the new number of classes).
  """
  step, source = checkpoints.restore_params(init.checkpoint, None if init.step < 0 else init.step)
  checkpoints.check_param_shapes(
      source, params, f'init.checkpoint={init.checkpoint!r} (step {step})',
      'add that layer to init.reinit to initialise it afresh, or set the model fields that run used',
      skip=init.reinit)
  return {layer: params[layer] if layer in init.reinit else source[layer] for layer in params}, step


@dataclasses.dataclass
class Run:
  """A run checked and ready to start: its experiment, data and first state (on the host)."""

  config: ml_collections.ConfigDict
  workdir: str
  experiment: experiment.Experiment
  train_split: input_pipeline.Split
  eval_split: input_pipeline.Split
  steps_per_epoch: int
  state: steps.TrainState
  news: list[str]  # lines to print when the loop starts

  @property
  def total_steps(self) -> int:
    total = self.config.train.num_epochs * self.steps_per_epoch
    cap = self.config.train.num_train_steps
    return min(total, cap) if cap > 0 else total

  @property
  def last_step(self) -> int:
    """Where this start ends: the run's end, or the end of epoch `train.pause_at_epoch` if that
    comes first (the run is paused there; nothing else depends on it)."""
    pause = self.config.train.pause_at_epoch * self.steps_per_epoch
    return min(self.total_steps, pause) if pause > 0 else self.total_steps

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

  def next_log_step(self, step: int) -> int:
    """The first step >= `step` where the loop logs: a log step, an epoch end or the last step
    (a signal stops the run there, so the resumed run logs what an uninterrupted one does)."""
    up = lambda every: -(-step // every) * every
    return min(up(self.config.train.log_every_steps), up(self.steps_per_epoch), self.total_steps)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Every check and read a run needs (config, data, model, `init.checkpoint`); writes nothing."""
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  check_config(config)
  workdir_lib.check_dir(workdir)
  workdir_lib.check_config(workdir, config)
  builder = input_pipeline.get_builder(config.dataset)
  shard = dict(shard=jax.process_index(), num_shards=jax.process_count())
  train_split = input_pipeline.load_split(builder, config.dataset.train_split, config.dataset.cache,
                                          drop_remainder=True, **shard,
                                          read_all=config.dataset.process_reads == 'all')
  eval_split = input_pipeline.load_split(builder, config.dataset.eval_split, config.dataset.cache,
                                         **shard)
  if not eval_split.num_examples:
    raise ConfigError(f'dataset.eval_split={config.dataset.eval_split!r} has no examples'
                      f'{" in this process" if jax.process_count() > 1 else ""}; pick a split '
                      f'that has some.')
  exp = experiment.build(config, num_classes_of(config, train_split))
  spe = input_pipeline.steps_per_epoch(train_split, exp.parallel.local_batch_size(
      config.train.batch_size))
  state, news = exp.init_state(), []
  if config.init.checkpoint and not checkpoints.all_steps(workdir):
    # A fresh start from another run's (or imported) parameters: read and checked before any write.
    params, source_step = init_from_checkpoint(config.init, state.params)
    state = state.replace(params=params)
    news.append('; '.join([f'Initialised from {config.init.checkpoint} (step {source_step})'] +
                          [f'{what} {", ".join(layers)}' for what, layers in
                           (('re-initialised', config.init.reinit),
                            ('frozen', config.optimizer.frozen_layers)) if layers]))
  return Run(config, workdir, exp, train_split, eval_split, spe, state, news)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       batch_hook: BatchHook | None = None,
                       signals: workdir_lib.StopSignal | None = None) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last eval.

  Every check runs before anything is written to `workdir`; then the run takes the workdir's lock
  for its whole life. `signals`: the stop signals' handler, installed by the caller (main) or
  else here; one before the loop raises `workdir.Stopped` once all that was taken is released.
  `batch_hook` (tests) may alter the host batches.
  """
  if signals is None:
    with workdir_lib.StopSignal() as signals:
      return train_and_evaluate(config, workdir, batch_hook, signals)
  run = prepare(config, workdir)
  with workdir_lib.Lock(workdir) as lock:
    note = lock.acquire()
    workdir_lib.write_config(workdir, config)
    workdir_lib.write_class_names(workdir, run.train_split.class_names)
    with contextlib.closing(checkpoints.make_manager(
        workdir, config.train.checkpoint_max_to_keep)) as manager, Loop(run, manager) as loop:
      with signals.held():  # orbax would take an exception inside its restore for damage
        state = resume(manager, run.state, run.experiment.parallel, workdir, loop.say)
      start, last_eval = int(state.step), {}
      batches = loop.start(start, batch_hook, [note] if note else [])
      state = run.experiment.parallel.put_state(state)
      signals.looping()
      logging.info('Process %d trains steps %d-%d; a stop signal stops it at a log step now.',
                   jax.process_index(), start + 1, run.last_step)
      with cluster.Stop(signals, run.next_log_step, loop.say) as stop:
        for step in range(start + 1, run.last_step + 1):
          state = loop.train_step(step, state, batches)
          epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
          log_now = step % config.train.log_every_steps == 0 or epoch_end
          stopping = stop.at(step)  # every process gets the same answer
          every = config.train.checkpoint_every_steps
          save_now = epoch_end or (every and step % every == 0) or stopping
          if log_now or save_now:
            loop.log_train(step, state)
          if epoch_end:
            state, last_eval = loop.end_of_epoch(step, state)
          if save_now:
            save(manager, step, run.experiment.parallel.checkpointable(state),
                 last_eval if epoch_end else None)
          if stopping:  # the save above has returned
            loop.say(f'{STOPPED}{signal.Signals(stopping).name} at step {step} (epoch '
                     f'{run.epoch(step):.2f}); checkpoint {step} saved in {manager.directory}. '
                     f'Run the same command to resume.')
            break
        else:
          if run.last_step < run.total_steps:
            pause = config.train.pause_at_epoch
            loop.say((f'Paused at epoch {pause} (train.pause_at_epoch) with checkpoint '
                      f'{run.last_step}' if start < run.last_step else
                      f'Checkpoint {start} is at or past epoch {pause} (train.pause_at_epoch)') +
                     '; run again with a later pause epoch, or 0, to continue.')
  return last_eval


class Loop:
  """What the loop keeps between steps (metrics writer, progress bar, profiler, the train metrics
  and timings since the last log line) and the named pieces of its body."""

  def __init__(self, run: Run, manager: Any):
    self.run, self.manager = run, manager
    self.parallel = run.experiment.parallel
    self.is_main = jax.process_index() == 0
    self.say: Callable[[str], None] = tqdm.tqdm.write if self.is_main else lambda text: None

  def __enter__(self) -> 'Loop':
    return self

  def start(self, start: int, batch_hook: BatchHook | None, news: list[str]) -> Iterator:
    """Opens the metrics writer, bar and profiler at step `start`; returns the device batches."""
    from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
    run, train = self.run, self.run.config.train
    self.logger = workdir_lib.MetricLogger(run.workdir, start, enabled=self.is_main)
    self.bar = tqdm.tqdm(total=run.total_steps, initial=start, disable=not self.is_main,
                         unit='step', dynamic_ncols=True)
    self.profiler = Profiler(os.path.join(run.workdir, 'tensorboard'), start + 2,
                             train.profile_steps if self.is_main else 0, self.say)
    self.pending: list[dict[str, jax.Array]] = []  # train metrics, on device until a log line
    self.tick, self.tick_step, self.waited = time.perf_counter(), start, 0.0
    for line in ([f'Resuming from step {start} (epoch {run.epoch(start):.2f}) in {run.workdir}']
                 if start else []) + news + run.news:
      self.say(line)
    batches = input_pipeline.train_batches(
        run.train_split, run.experiment.pre, self.parallel.local_batch_size(train.batch_size),
        seed=run.config.seed, start_step=start, shuffle_buffer=run.config.dataset.shuffle_buffer)
    return self.parallel.prefetch(batch_hook(batches, start + 1) if batch_hook else batches)

  def train_step(self, step: int, state: steps.TrainState, batches: Iterator) -> steps.TrainState:
    """Runs `step`, timing the wait for its batch; its metrics stay on the devices."""
    self.profiler.step(step, state)
    t = time.perf_counter()
    batch = next(batches)
    self.waited += time.perf_counter() - t
    state, metrics = self.run.experiment.train_step(state, batch)
    self.pending.append(metrics)
    self.bar.update(1)
    return state

  def log_train(self, step: int, state: steps.TrainState) -> None:
    """Writes the mean train metrics since the last log line, the throughput and the share of
    time spent waiting for input; a non-finite step stops the run (`train.on_nonfinite`)."""
    host, self.pending = self.parallel.get(self.pending), []
    bad = [step - len(host) + 1 + i for i, m in enumerate(host) if m['nonfinite_steps']]
    if bad and self.run.config.train.on_nonfinite == 'stop':
      last = self.manager.latest_step()
      raise TrainingStopped(
          f'non-finite loss or gradient at step {bad[0]} (the update was not applied); '
          f'stopped. Last good checkpoint: '
          f'{f"step {last} in {self.manager.directory}" if last is not None else "none yet"}. '
          f'Lower optimizer.learning_rate or set --config.train.on_nonfinite=skip.')
    train = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    train['nonfinite_steps'] = len(bad)
    now = time.perf_counter()
    images_per_s = (step - self.tick_step) * self.run.config.train.batch_size / (now - self.tick)
    input_wait = self.waited / (now - self.tick)
    self.tick, self.tick_step, self.waited = now, step, 0.0
    self.logger.write(step, epoch=self.run.epoch(step), learning_rate=self.learning_rate(
        step, state), images_per_second=images_per_s, input_wait_fraction=input_wait, **train)
    self.bar.set_postfix(loss=f'{train["train_loss"]:.4f}', img_s=f'{images_per_s:.0f}',
                         input_wait=f'{input_wait:.0%}')

  def end_of_epoch(self, step: int, state: steps.TrainState
                   ) -> tuple[steps.TrainState, dict[str, float]]:
    """Evaluates on the validation split, feeds its top-1 error to the plateau rule (on the
    devices) and logs it."""
    run, parallel = self.run, self.parallel
    result = steps.evaluate(run.experiment.eval_step, state.params, run.eval_split,
                            run.experiment.pre,
                            parallel.local_batch_size(run.config.train.eval_batch_size), parallel)
    error = np.full(parallel.num_local_devices, result['val_top1_error'], np.float32)
    state, _ = run.experiment.plateau_step(state, parallel.put_batch({'val_error': error}))
    lr = self.learning_rate(step, state)
    self.logger.write(step, epoch=run.epoch(step), learning_rate=lr, **result)
    self.say(f'step {step} epoch {run.epoch(step):.2f}: val top-1 {result["val_top1_error"]:.4f} '
             f'top-5 {result["val_top5_error"]:.4f} lr {lr:.3g}')
    return state, result

  def learning_rate(self, step: int, state: steps.TrainState) -> float:
    return float(optim.learning_rate(self.run.config.optimizer,
                                     self.parallel.get(state.plateau_state), step))

  def __exit__(self, *exc) -> None:
    for part in ('profiler', 'bar', 'logger'):  # those `start` opened
      if hasattr(self, part):
        getattr(self, part).close()


def resume(manager: Any, state: steps.TrainState, parallel: Parallel, workdir: str,
           say: Callable[[str], None]) -> steps.TrainState:
  """The newest checkpoint that restores (damaged newer ones set aside), else `state`."""
  restored, damaged = checkpoints.restore_newest(manager, state, parallel.shardings(state), say)
  if damaged:
    if jax.process_index() == 0:
      where = checkpoints.set_aside(manager, workdir, damaged)
      say(f'Moved damaged checkpoint{"s" if len(damaged) > 1 else ""} '
          f'{", ".join(map(str, damaged))} to {where}.')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
    manager.reload()
  return state if restored is None else parallel.get(restored)


class Profiler:
  """`train.profile_steps` > 0: a jax.profiler trace of that many steps from `first` (the step
  after compilation) into `logdir`/plugins/profile/, TensorBoard's profile tab."""

  def __init__(self, logdir: str, first: int, num_steps: int, say: Callable[[str], None]):
    self.logdir, self.first, self.last, self.say = logdir, first, first + num_steps - 1, say
    self.active = False
    self.enabled = num_steps > 0

  def step(self, step: int, state: Any) -> None:
    """Called before `step` runs; `state` is the one the previous step returned."""
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and step == self.last + 1:
      jax.block_until_ready(state)
      self.close()
      self.say(f'Wrote a profile of steps {self.first}-{self.last} to '
               f'{os.path.join(self.logdir, "plugins", "profile")} (TensorBoard\'s profile tab).')

  def close(self) -> None:
    """Stops the trace if one is running (the run may end inside the window: keep what was
    traced)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def save(manager: Any, step: int, state: steps.TrainState,
         metrics: dict[str, float] | None) -> None:
  """Checkpoint `step`; a failure (a full disk) interrupts the run in one line, the last one
  intact."""
  try:
    checkpoints.save(manager, step, state, metrics)
  except Exception as e:  # OSError, or tensorstore's ValueError naming the os error
    last = manager.latest_step()
    raise Interrupted(
        f'could not write checkpoint {step} to {manager.directory} ({checkpoints.reason(e)}); '
        f'the previous checkpoint ({f"step {last}" if last is not None else "none"}) is intact. '
        f'Free disk space and run the same command to resume.') from e
