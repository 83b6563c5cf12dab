"""Training: the train state, the pure train/eval steps, and the epoch loop.

`train_step` and `eval_step` are pure functions of (state, batch shard); `parallel.Parallel` runs
them on every device under pmap or jit. Batches arrive as uint8 pixels (plus the lighting shift
the host drew); both steps start by normalising them on the device (`normalize`). The loop evaluates on the validation split after every
epoch, feeds the validation top-1 error to the plateau rule, logs, and checkpoints.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import tqdm

from alexnet_jax import checkpoints, models, optim
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.errors import ConfigError, TrainingStopped
from alexnet_jax.parallel import AXIS, Parallel

if TYPE_CHECKING:
  from alexnet_jax import input_pipeline


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any  # momentum (optax chain state)
  plateau_state: Any  # reduce-on-plateau counters and LR scale
  rng: jax.Array  # base key; step t uses fold_in(rng, t)


DTYPES = ('float32', 'bfloat16')


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> models.AlexNet:
  m = config.model
  if m.dtype not in DTYPES:
    raise ConfigError(f'model.dtype={m.dtype!r} is not supported; use one of {DTYPES}.')
  if m.variant == 'torchvision' and (m.lrn or m.groups != 1):
    raise ConfigError("model.variant='torchvision' has no LRN and no towers; set "
                      "--config.model.lrn=False --config.model.groups=1 (configs/torchvision.py).")
  return models.AlexNet(num_classes=num_classes, variant=m.variant, lrn=m.lrn,
                        overlapping_pool=m.overlapping_pool, groups=m.groups,
                        width=m.get('width', 1.0),  # config.json before model.width
                        dropout_rate=m.dropout_rate, bias_init=m.bias_init, init_std=m.init_std,
                        init_scheme=m.get('init', 'paper'),  # config.json before model.init
                        dtype=jnp.dtype(m.dtype), group_impl=m.group_impl,
                        lrn_impl=m.lrn_impl, pool_impl=m.pool_impl, conv1_impl=m.conv1_impl)


def num_classes_of(config: ml_collections.ConfigDict, split: input_pipeline.Split) -> int:
  """`model.num_classes`, or the data's when it is -1; a mismatch is an error."""
  num_classes = config.model.num_classes
  if num_classes == -1:
    return split.num_classes
  if num_classes != split.num_classes:
    raise ConfigError(f'model.num_classes={num_classes} but {config.dataset.name} has '
                      f'{split.num_classes} classes; set it to -1 to follow the data.')
  return num_classes


def create_train_state(model: models.AlexNet, tx: optax.GradientTransformation,
                       plateau: optax.GradientTransformation, image_size: int,
                       seed: int, params: Any = None) -> TrainState:
  """Initialises parameters (or takes `params`) and optimiser states, on the default device."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))

  @jax.jit
  def init(params):
    if params is None:
      params = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3)),
                          train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      plateau_state=plateau.init(params), rng=rng)

  return init(params)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              shift: jax.Array | None = None) -> jax.Array:
  """uint8 pixels [B, ..., 3] → ((pixels / 255 + shift) - mean) / std in float32, as one
  multiply-add; `shift` [B, 3] is each image's PCA lighting shift (§4.1), None for none.

  Floating-point images are taken as already normalised and returned as they are: the
  benchmark's float32-batch step, the baseline the cost of this function is measured against.
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  std = jnp.asarray(std, jnp.float32)
  offset = -jnp.asarray(mean, jnp.float32) / std
  if shift is not None:
    offset = offset + (shift / std).reshape(shift.shape[:1] + (1,) * (images.ndim - 2) + (3,))
  return images.astype(jnp.float32) * (1 / (255 * std)) + offset


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.AlexNet,
               tx: optax.GradientTransformation, mean: Sequence[float],
               std: Sequence[float]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's shard; gradients are averaged over the global batch.

  A step whose loss or gradients are not finite changes nothing (parameters and optimiser state
  are kept) and reports `nonfinite_steps` = 1; the loop decides whether to stop.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images = normalize(batch['image'], mean, std, batch['shift'])

  def loss_fn(params):
    logits = model.apply({'params': params}, images, train=True,
                         example_ids=batch['index'], rngs={'dropout': dropout_rng})
    return cross_entropy(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)  # equal shards: mean of means = global-batch mean
  loss = jax.lax.pmean(loss, AXIS)
  finite = jnp.isfinite(loss) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, optim.scale_updates(updates, state.plateau_state))
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)
  new_state = state.replace(step=state.step + 1,
                            params=jax.tree.map(keep_if_bad, params, state.params),
                            opt_state=jax.tree.map(keep_if_bad, opt_state, state.opt_state))
  metrics = {'train_loss': loss,
             'train_top1_error': jax.lax.pmean(
                 jnp.mean(jnp.argmax(logits, -1) != batch['label']), AXIS),
             'nonfinite_steps': 1 - finite.astype(jnp.int32)}
  return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: models.AlexNet,
              mean: Sequence[float], std: Sequence[float]) -> dict[str, jax.Array]:
  """Sums of errors and loss over the real (mask = 1) examples of the global batch.

  uint8 images [B, C, S, S, 3] are C crops per example, scored by their averaged softmax (§4.1).
  """
  images = normalize(batch['image'], mean, std)
  if images.ndim == 5:
    logits = model.apply({'params': params}, images.reshape((-1,) + images.shape[2:]),
                         train=False)
    log_probs = jax.nn.log_softmax(logits).reshape(images.shape[:2] + logits.shape[-1:])
    # log of the mean softmax; as logits, its softmax is that mean again.
    logits = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(images.shape[1])
  else:
    logits = model.apply({'params': params}, images, train=False)
  labels, mask = batch['label'], batch['mask']
  _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  correct1 = top[:, 0] == labels
  correct5 = jnp.any(top == labels[:, None], axis=-1)
  sums = {'top1_errors': jnp.sum(mask * ~correct1), 'top5_errors': jnp.sum(mask * ~correct5),
          'loss': jnp.sum(mask * cross_entropy(logits, labels)), 'count': jnp.sum(mask)}
  return jax.lax.psum(sums, AXIS)


def evaluate(p_eval_step, params: Any, split: input_pipeline.Split,
             pre: input_pipeline.Preprocess, batch_size: int, parallel: Parallel,
             crops: int = 1) -> dict[str, float]:
  """Top-1/top-5 error and mean loss over the whole split (center crops, or the 10 crops)."""
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  sums = [p_eval_step(params, b) for b in
          parallel.prefetch(input_pipeline.eval_batches(split, pre, batch_size, crops))]
  total = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get(sums))
  count = max(total['count'], 1.0)
  return {'val_top1_error': total['top1_errors'] / count,
          'val_top5_error': total['top5_errors'] / count, 'val_loss': total['loss'] / count}


def check_train_config(config: ml_collections.ConfigDict, parallel: Parallel) -> None:
  """The checks that need no data: fail in a second, before anything is compiled or written."""
  t = config.train
  parallel.check_batch_size(t.batch_size)
  parallel.check_batch_size(t.eval_batch_size, 'train.eval_batch_size')
  if t.on_nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r} is unknown; use 'stop' or 'skip'.")
  if t.profile_steps < 0:
    raise ConfigError(f'train.profile_steps={t.profile_steps} must be 0 (off) or a number of steps.')
  if t.log_every_steps <= 0:
    raise ConfigError(f'train.log_every_steps={t.log_every_steps} must be positive.')
  if t.checkpoint_every_steps < 0 or t.checkpoint_every_steps % t.log_every_steps:
    raise ConfigError(
        f'train.checkpoint_every_steps={t.checkpoint_every_steps} must be a multiple of '
        f'train.log_every_steps={t.log_every_steps} (0: checkpoint at epoch ends only), so a '
        f'resumed run logs exactly what an uninterrupted one does.')
  optim.make_optimizer(config.optimizer)  # validates weight_decay_mode
  make_model(config, num_classes=2)  # validates the model fields
  layers = models.layer_names(config.model.variant)
  for field in ('optimizer.frozen_layers', 'init.reinit'):
    unknown = [name for name in config[field] if name not in layers]
    if unknown:
      raise ConfigError(f'{field} names {unknown}, not layers of the {config.model.variant!r} '
                        f'model; use some of {layers}.')
  if config.init.reinit and not config.init.checkpoint:
    raise ConfigError(f'init.reinit={tuple(config.init.reinit)} re-initialises layers of '
                      f'init.checkpoint, which is not set; set it or clear init.reinit.')


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


def poison(batches: Iterator[dict[str, np.ndarray]], first_step: int,
           nan_step: int) -> Iterator[dict[str, np.ndarray]]:
  """Test hook (`train.debug_nan_step`): the batch of step `nan_step` becomes NaN (through its
  lighting shift, as uint8 pixels cannot be)."""
  for step, batch in enumerate(batches, first_step):
    if step == nan_step:
      batch = {**batch, 'shift': np.full_like(batch['shift'], np.nan)}
    yield batch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last eval.

  Every check (config, data, model, `init.checkpoint`) runs before anything is written to
  `workdir`; then the run takes the workdir's lock for its whole life.
  """
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  parallel = Parallel(config.parallelism)
  check_train_config(config, parallel)
  workdir_lib.check_dir(workdir)
  workdir_lib.check_config(workdir, config)

  builder = input_pipeline.get_builder(config.dataset)
  shard = dict(shard=jax.process_index(), num_shards=jax.process_count())
  train_split = input_pipeline.load_split(builder, config.dataset.train_split, config.dataset.cache,
                                          drop_remainder=True, **shard)
  eval_split = input_pipeline.load_split(builder, config.dataset.eval_split, config.dataset.cache,
                                         **shard)
  batch_size = parallel.local_batch_size(config.train.batch_size)  # this process's rows
  steps_per_epoch = input_pipeline.steps_per_epoch(train_split, batch_size)
  if not eval_split.num_examples:
    raise ConfigError(f'dataset.eval_split={config.dataset.eval_split!r} has no examples'
                      f'{" in this process" if jax.process_count() > 1 else ""}; pick a split '
                      f'that has some.')
  model = make_model(config, num_classes_of(config, train_split))
  pre = input_pipeline.Preprocess.from_config(config.dataset)
  if pre.image_size < models.min_image_size(model):
    raise ConfigError(f'dataset.image_size={pre.image_size} is too small for this model; use at '
                      f'least {models.min_image_size(model)}.')
  tx = optim.make_optimizer(config.optimizer)
  plateau = optim.make_plateau(config.optimizer)
  state = jax.device_get(create_train_state(model, tx, plateau, pre.image_size, config.seed))
  news = []
  if config.init.checkpoint and not checkpoints.all_steps(workdir):
    # A fresh start from another run's (or imported) parameters: read and checked before any write.
    params, source_step = init_from_checkpoint(config.init, state.params)
    state = state.replace(params=params)
    news.append('; '.join([f'Initialised from {config.init.checkpoint} (step {source_step})'] +
                          [f'{what} {", ".join(layers)}' for what, layers in
                           (('re-initialised', config.init.reinit),
                            ('frozen', config.optimizer.frozen_layers)) if layers]))

  with workdir_lib.Lock(workdir) as lock:
    note = lock.acquire()
    workdir_lib.write_config(workdir, config)
    workdir_lib.write_class_names(workdir, train_split.class_names)
    manager = checkpoints.make_manager(workdir, config.train.checkpoint_max_to_keep)
    try:
      return _train(config, workdir, parallel, model, tx, plateau, pre, state, train_split,
                    eval_split, steps_per_epoch, manager, ([note] if note else []) + news)
    finally:
      manager.close()


def _resume(manager, state: TrainState, parallel: Parallel, workdir: str,
            say: Callable[[str], None]) -> TrainState:
  """The newest checkpoint that restores (damaged newer ones set aside), else `state`."""
  restored, damaged = checkpoints.restore_newest(manager, state, parallel.replicated_sharding, say)
  if damaged:
    if jax.process_index() == 0:
      where = checkpoints.set_aside(manager, workdir, damaged)
      say(f'Moved damaged checkpoint{"s" if len(damaged) > 1 else ""} '
          f'{", ".join(map(str, damaged))} to {where}.')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
    manager.reload()
  return state if restored is None else parallel.get(restored)


def _train(config: ml_collections.ConfigDict, workdir: str, parallel: Parallel,
           model: models.AlexNet, tx: optax.GradientTransformation,
           plateau: optax.GradientTransformation, pre: input_pipeline.Preprocess,
           state: TrainState, train_split: input_pipeline.Split, eval_split: input_pipeline.Split,
           steps_per_epoch: int, manager: Any, news: list[str]) -> dict[str, float]:
  """The epoch loop, in a workdir this run holds: resume, train, log, evaluate, save, stop."""
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  is_main = jax.process_index() == 0
  say = tqdm.tqdm.write if is_main else lambda text: None
  state = _resume(manager, state, parallel, workdir, say)
  start_step = int(state.step)
  batch_size = parallel.local_batch_size(config.train.batch_size)
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.num_train_steps > 0:
    total_steps = min(total_steps, config.train.num_train_steps)
  every, every_log = config.train.checkpoint_every_steps, config.train.log_every_steps

  logger = workdir_lib.MetricLogger(workdir, start_step, enabled=is_main)
  p_train_step = parallel.wrap(
      functools.partial(train_step, model=model, tx=tx, mean=pre.mean, std=pre.std),
      donate_state=True)
  p_eval_step = parallel.wrap(functools.partial(eval_step, model=model, mean=pre.mean,
                                                std=pre.std))
  state = parallel.put_state(state)
  batches = input_pipeline.train_batches(
      train_split, pre, batch_size, seed=config.seed, start_step=start_step,
      shuffle_buffer=config.dataset.shuffle_buffer)
  batches = parallel.prefetch(poison(batches, start_step + 1, config.train.debug_nan_step))

  bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not is_main, unit='step',
                  dynamic_ncols=True)
  if start_step:
    say(f'Resuming from step {start_step} (epoch {start_step / steps_per_epoch:.2f}) in {workdir}')
  for line in news:
    say(line)
  pending: list[dict[str, jax.Array]] = []
  last_eval: dict[str, float] = {}
  tick, tick_step = time.perf_counter(), start_step
  waited = 0.0  # seconds spent waiting for the next batch since the last log line
  announced = False  # a stop signal was acknowledged
  profiler = _Profiler(os.path.join(workdir, 'tensorboard'), start_step + 2,
                       config.train.profile_steps if is_main else 0, say)
  with workdir_lib.StopSignal() as stop, profiler:
    for step in range(start_step + 1, total_steps + 1):
      profiler.step(step, state)
      t = time.perf_counter()
      batch = next(batches)
      waited += time.perf_counter() - t
      state, metrics = p_train_step(state, batch)
      epoch_end = step % steps_per_epoch == 0 or step == total_steps
      log_now = step % every_log == 0 or epoch_end
      # Read once: a signal landing later in this step (during a metrics fetch, an evaluation
      # or a save) is acted on at the next step, never half-way. The run stops where it logs
      # anyway, so the resumed run logs exactly what an uninterrupted one does; a second
      # signal stops it at once.
      signals = stop.count
      stopping = stop.received if signals and (log_now or signals > 1) else None
      if signals and not announced and not stopping:
        announced = True
        at = min(step - step % every_log + every_log,
                 step - step % steps_per_epoch + steps_per_epoch, total_steps)
        say(f'{signal.Signals(stop.received).name} received: stopping at step {at} (the next '
            f'log step) with a checkpoint; signal again to stop at once.')
      pending.append(metrics)  # stays on device until the next log line
      bar.update(1)
      save_now = epoch_end or (every and step % every == 0) or stopping
      if log_now or save_now:
        host = parallel.get(pending)
        bad = [step - len(host) + 1 + i for i, m in enumerate(host) if m['nonfinite_steps']]
        if bad and config.train.on_nonfinite == 'stop':
          last = manager.latest_step()
          raise TrainingStopped(
              f'non-finite loss or gradient at step {bad[0]} (the update was not applied); '
              f'stopped. Last good checkpoint: '
              f'{f"step {last} in {manager.directory}" if last is not None else "none yet"}. '
              f'Lower optimizer.learning_rate or set --config.train.on_nonfinite=skip.')
        train = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        train['nonfinite_steps'] = len(bad)
        pending = []
        now = time.perf_counter()
        images_per_s = (step - tick_step) * config.train.batch_size / (now - tick)
        input_wait = waited / (now - tick)
        tick, tick_step, waited = now, step, 0.0
        lr = float(optim.learning_rate(config.optimizer, parallel.get(state.plateau_state), step))
        logger.write(step, epoch=step / steps_per_epoch, learning_rate=lr,
                     images_per_second=images_per_s, input_wait_fraction=input_wait, **train)
        bar.set_postfix(loss=f'{train["train_loss"]:.4f}', img_s=f'{images_per_s:.0f}',
                        input_wait=f'{input_wait:.0%}')
      if save_now:
        host_state = parallel.get(state)
        if epoch_end:
          last_eval = evaluate(p_eval_step, state.params, eval_split, pre,
                               parallel.local_batch_size(config.train.eval_batch_size), parallel)
          host_state = host_state.replace(plateau_state=optim.update_plateau(
              plateau, host_state.plateau_state, last_eval['val_top1_error']))
          lr = float(optim.learning_rate(config.optimizer, host_state.plateau_state, step))
          logger.write(step, epoch=step / steps_per_epoch, learning_rate=lr, **last_eval)
          say(f'step {step} epoch {step / steps_per_epoch:.2f}: '
              f'val top-1 {last_eval["val_top1_error"]:.4f} '
              f'top-5 {last_eval["val_top5_error"]:.4f} lr {lr:.3g}')
          state = parallel.put_state(host_state)
        _save(manager, step, parallel.replicated(host_state), last_eval if epoch_end else None)
      if stopping:  # the save above has returned
        say(f'Stopped by {signal.Signals(stopping).name} at step {step} (epoch '
            f'{step / steps_per_epoch:.2f}); checkpoint {step} saved in {manager.directory}. '
            f'Run the same command to resume.')
        break
  bar.close()
  logger.close()
  return last_eval


class _Profiler:
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
      self._stop(state)

  def _stop(self, state: Any) -> None:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    self.say(f'Wrote a profile of steps {self.first}-{self.last} to '
             f'{os.path.join(self.logdir, "plugins", "profile")} (TensorBoard\'s profile tab).')

  def __enter__(self) -> '_Profiler':
    return self

  def __exit__(self, *exc) -> None:
    if self.active:  # the run ended inside the window: keep what was traced
      jax.profiler.stop_trace()
      self.active = False


def _save(manager, step: int, state: TrainState, metrics: dict[str, float] | None) -> None:
  try:
    checkpoints.save(manager, step, state, metrics)
  except Exception as e:  # OSError, or tensorstore's ValueError naming the os error
    last = manager.latest_step()
    raise TrainingStopped(
        f'could not write checkpoint {step} to {manager.directory} ({checkpoints.reason(e)}); '
        f'the previous checkpoint ({f"step {last}" if last is not None else "none"}) is intact. '
        f'Free disk space and run the same command to resume.') from e
