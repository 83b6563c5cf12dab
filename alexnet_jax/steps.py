"""The train state and the pure per-device steps: train, evaluate, feed the plateau rule.

Each step is a pure function of (state, this device's shard of a batch); `parallel.Parallel.wrap`
runs it on every device under pmap or jit, with the named axis `AXIS` for the cross-device means
and sums. Batches arrive as uint8 pixels (plus the lighting shift the host drew); the steps start
by normalising them on the device (`preprocess.normalize`). alexnet_jax/experiment.py wraps them
for a config; alexnet_jax/train.py's loop calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alexnet_jax import models, optim
from alexnet_jax.parallel import AXIS
from alexnet_jax.preprocess import Preprocess, normalize

if TYPE_CHECKING:
  from alexnet_jax import input_pipeline
  from alexnet_jax.parallel import Parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any  # momentum (optax chain state)
  plateau_state: Any  # reduce-on-plateau counters and LR scale
  rng: jax.Array  # base key; step t uses fold_in(rng, t)


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
  if model.tower_axis:  # each device holds its tower's gradients: all keep or skip the step
    with jax.named_scope('gradients_finite'):  # the name alexnet_jax/traffic.py reports
      finite = jax.lax.pmin(finite.astype(jnp.int32), model.tower_axis) == 1
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


def plateau_step(state: TrainState, batch: dict[str, jax.Array], *,
                 plateau: optax.GradientTransformationExtraArgs) -> tuple[TrainState, dict]:
  """Feeds one evaluation's validation error (`batch['val_error']`, the same on every device) to
  the plateau rule, on the device state: no copy of the state leaves the devices."""
  return state.replace(plateau_state=optim.update_plateau(
      plateau, state.plateau_state, batch['val_error'][0])), {}


def evaluate(p_eval_step, params: Any, split: input_pipeline.Split, pre: Preprocess,
             batch_size: int, parallel: Parallel, crops: int = 1) -> dict[str, float]:
  """Top-1/top-5 error and mean loss over the whole split (center crops, or the 10 crops)."""
  from alexnet_jax import input_pipeline  # TensorFlow: imported only where data is read
  sums = [p_eval_step(params, b) for b in
          parallel.prefetch(input_pipeline.eval_batches(split, pre, batch_size, crops))]
  total = jax.tree.map(lambda *xs: float(np.sum(xs)), *parallel.get(sums))
  count = max(total['count'], 1.0)
  return {'val_top1_error': total['top1_errors'] / count,
          'val_top5_error': total['top5_errors'] / count, 'val_loss': total['loss'] / count}
