"""Training: the train state, the pure train/eval steps, and the epoch loop.

`train_step` and `eval_step` are pure functions of (state, batch shard); `parallel.Parallel` runs
them on every device under pmap or jit. The loop evaluates on the validation split after every
epoch, feeds the validation top-1 error to the plateau rule, logs, and checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from alexnet_jax import checkpoints, models, optim
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


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> models.AlexNet:
  m = config.model
  return models.AlexNet(num_classes=num_classes, variant=m.variant, lrn=m.lrn,
                        overlapping_pool=m.overlapping_pool, groups=m.groups,
                        dropout_rate=m.dropout_rate, bias_init=m.bias_init, init_std=m.init_std,
                        dtype=jnp.dtype(m.dtype), group_impl=m.group_impl)


def create_train_state(model: models.AlexNet, tx: optax.GradientTransformation,
                       plateau: optax.GradientTransformation, image_size: int,
                       seed: int) -> TrainState:
  """Initialises parameters (on the default device) and optimiser states."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))

  @jax.jit
  def init():
    params = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3)),
                        train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      plateau_state=plateau.init(params), rng=rng)

  return init()


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.AlexNet,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's shard; gradients are averaged over the global batch."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         example_ids=batch['index'], rngs={'dropout': dropout_rng})
    return cross_entropy(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)  # equal shards: mean of means = global-batch mean
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, optim.scale_updates(updates, state.plateau_state))
  metrics = {'train_loss': loss,
             'train_top1_error': jnp.mean(jnp.argmax(logits, -1) != batch['label'])}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, jax.lax.pmean(metrics, AXIS)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              model: models.AlexNet) -> dict[str, jax.Array]:
  """Sums of errors and loss over the real (mask = 1) examples of the global batch."""
  logits = model.apply({'params': state.params}, batch['image'], train=False)
  labels, mask = batch['label'], batch['mask']
  _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  correct1 = top[:, 0] == labels
  correct5 = jnp.any(top == labels[:, None], axis=-1)
  sums = {'top1_errors': jnp.sum(mask * ~correct1), 'top5_errors': jnp.sum(mask * ~correct5),
          'loss': jnp.sum(mask * cross_entropy(logits, labels)), 'count': jnp.sum(mask)}
  return jax.lax.psum(sums, AXIS)


class MetricLogger:
  """Writes metrics to `WORKDIR/metrics.jsonl` (one object a line) and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, **scalars: float) -> None:
    if not self.enabled:
      return
    scalars = {k: (v if isinstance(v, int) else float(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def evaluate(p_eval_step, state: Any, split: input_pipeline.Split,
             pre: input_pipeline.Preprocess, batch_size: int, parallel: Parallel) -> dict[str, float]:
  """Top-1/top-5 error and mean loss over the whole split (center crops)."""
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  sums = [p_eval_step(state, b) for b in
          parallel.prefetch(input_pipeline.eval_batches(split, pre, batch_size))]
  total = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get(sums))
  count = max(total['count'], 1.0)
  return {'val_top1_error': total['top1_errors'] / count,
          'val_top5_error': total['top5_errors'] / count, 'val_loss': total['loss'] / count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last eval."""
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  parallel = Parallel(config.parallelism)
  parallel.check_batch_size(config.train.batch_size)
  parallel.check_batch_size(config.train.eval_batch_size, 'train.eval_batch_size')
  os.makedirs(workdir, exist_ok=True)

  builder = input_pipeline.get_builder(config.dataset)
  train_split = input_pipeline.load_split(builder, config.dataset.train_split, config.dataset.cache)
  eval_split = input_pipeline.load_split(builder, config.dataset.eval_split, config.dataset.cache)
  num_classes = config.model.num_classes
  if num_classes == -1:
    num_classes = train_split.num_classes
  elif num_classes != train_split.num_classes:
    raise ValueError(f'model.num_classes={num_classes} but {config.dataset.name} has '
                     f'{train_split.num_classes} classes; set it to -1 to follow the data.')
  model = make_model(config, num_classes)
  pre = input_pipeline.Preprocess.from_config(config.dataset)
  if pre.image_size < models.min_image_size(model):
    raise ValueError(f'dataset.image_size={pre.image_size} is too small for this model; use at '
                     f'least {models.min_image_size(model)}.')

  tx = optim.make_optimizer(config.optimizer)
  plateau = optim.make_plateau(config.optimizer)
  state = create_train_state(model, tx, plateau, pre.image_size, config.seed)
  manager = checkpoints.make_manager(workdir, config.train.checkpoint_max_to_keep)
  restored = checkpoints.restore_latest(manager, jax.device_get(state))
  if restored is not None:
    state = restored
  start_step = int(state.step)

  steps_per_epoch = train_split.num_examples // config.train.batch_size
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.num_train_steps > 0:
    total_steps = min(total_steps, config.train.num_train_steps)

  is_main = jax.process_index() == 0
  logger = MetricLogger(workdir, enabled=is_main)
  p_train_step = parallel.wrap(functools.partial(train_step, model=model, tx=tx),
                               donate_state=True)
  p_eval_step = parallel.wrap(functools.partial(eval_step, model=model))
  state = parallel.put_state(state)
  batches = parallel.prefetch(input_pipeline.train_batches(
      train_split, pre, config.train.batch_size, seed=config.seed, start_step=start_step,
      shuffle_buffer=config.dataset.shuffle_buffer))

  if is_main and start_step:
    print(f'Resuming from step {start_step} (epoch {start_step / steps_per_epoch:.2f}) '
          f'in {workdir}', flush=True)
  bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not is_main, unit='step',
                  dynamic_ncols=True)
  pending: list[dict[str, jax.Array]] = []
  last_eval: dict[str, float] = {}
  tick, tick_step = time.perf_counter(), start_step
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = p_train_step(state, next(batches))
    pending.append(metrics)  # stays on device until the next log line
    bar.update(1)
    if step % config.train.log_every_steps == 0 or step == total_steps:
      host = parallel.get(pending)
      train = jax.tree.map(lambda *xs: float(np.mean(xs)), *host)
      pending = []
      now = time.perf_counter()
      images_per_s = (step - tick_step) * config.train.batch_size / (now - tick)
      tick, tick_step = now, step
      lr = float(optim.learning_rate(config.optimizer, parallel.get(state.plateau_state)))
      logger.write(step, epoch=step / steps_per_epoch, learning_rate=lr,
                   images_per_second=images_per_s, **train)
      bar.set_postfix(loss=f'{train["train_loss"]:.4f}', img_s=f'{images_per_s:.0f}')
    if step % steps_per_epoch == 0 or step == total_steps:
      last_eval = evaluate(p_eval_step, state, eval_split, pre, config.train.eval_batch_size,
                           parallel)
      host_state = parallel.get(state)
      host_state = host_state.replace(plateau_state=optim.update_plateau(
          plateau, host_state.plateau_state, last_eval['val_top1_error']))
      lr = float(optim.learning_rate(config.optimizer, host_state.plateau_state))
      logger.write(step, epoch=step / steps_per_epoch, learning_rate=lr, **last_eval)
      bar.write(f'step {step} epoch {step / steps_per_epoch:.2f}: '
                f'val top-1 {last_eval["val_top1_error"]:.4f} '
                f'top-5 {last_eval["val_top5_error"]:.4f} lr {lr:.3g}')
      checkpoints.save(manager, step, host_state)
      state = parallel.put_state(host_state)
  bar.close()
  logger.close()
  manager.close()
  return last_eval
