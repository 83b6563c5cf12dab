"""The paper's optimiser (§5) as optax: momentum SGD, weight decay, LR ÷10 on validation plateaus.

Two pieces, because they are driven by different clocks:
  * `make_optimizer` — the per-step update, an optax chain (momentum, weight decay, learning rate,
    and an optional linear warm-up of the learning rate over the first `warmup_steps` steps);
  * `make_plateau` — `optax.contrib.reduce_on_plateau`, fed once per evaluation with the validation
    top-1 error (`update_plateau`); its `scale` multiplies every step's update (`scale_updates`).
Both states live in the train state, so a checkpoint carries momentum and plateau counters.

Weight decay modes, with v the momentum buffer, g the gradient, lr the current learning rate:
  coupled   (paper):  v <- m*v + g + wd*w;  w <- w - lr*v        (decay accumulated in momentum)
  decoupled (default): v <- m*v + g;        w <- w - lr*(v + wd*w) (decay applied after momentum)
The paper folds lr into v (v <- m*v - lr*(g + wd*w)); that differs from the coupled form above only
for the few steps after an LR drop, when the paper's v still carries the old learning rate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from alexnet_jax.errors import ConfigError

WEIGHT_DECAY_MODES = ('decoupled', 'coupled')


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Per-step update from `config.optimizer` (learning_rate, momentum, weight_decay, mode), zero
  for the top-level parameter groups (layers) named in `frozen_layers`."""
  mode = config.weight_decay_mode
  if mode not in WEIGHT_DECAY_MODES:
    raise ConfigError(f'optimizer.weight_decay_mode={mode!r} is unknown; use one of '
                     f'{WEIGHT_DECAY_MODES}.')
  if config.warmup_steps < 0:
    raise ConfigError(f'optimizer.warmup_steps={config.warmup_steps} must be 0 (no warm-up) or '
                      f'more.')
  decay = optax.add_decayed_weights(config.weight_decay)
  momentum = optax.trace(decay=config.momentum, nesterov=False)
  steps = [decay, momentum] if mode == 'coupled' else [momentum, decay]
  # Without a warm-up the chain (and so the optimiser state in checkpoints) stays a plain scale.
  lr = (optax.scale_by_schedule(lambda count: -lr_schedule(config)(count)) if config.warmup_steps
        else optax.scale(-config.learning_rate))
  tx = optax.chain(*steps, lr)
  frozen = tuple(config.frozen_layers)
  if not frozen:
    return tx
  # Frozen layers get a zero update: no momentum buffer, no weight decay; their values never move.
  def labels(params):
    return {layer: jax.tree.map(lambda _: 'frozen' if layer in frozen else 'trained', sub)
            for layer, sub in params.items()}
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate by step, before the plateau scale: rising linearly from 0 to `learning_rate`
  over the first `warmup_steps` (Goyal et al. 2017), then constant. A warm-up keeps the first
  updates small while a freshly initialised network's gradients are at their largest."""
  if not config.warmup_steps:
    return optax.constant_schedule(config.learning_rate)
  return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """LR × factor after `patience` evaluations without a (relative `rtol`) improvement."""
  p = config.plateau
  return optax.contrib.reduce_on_plateau(
      factor=p.factor, patience=p.patience, rtol=p.rtol, atol=p.atol, cooldown=p.cooldown,
      min_scale=p.min_scale)


def update_plateau(
    plateau: optax.GradientTransformationExtraArgs, state: Any, val_error: float
) -> Any:
  """Feeds one evaluation's validation error to the plateau rule; returns its new state."""
  _, state = plateau.update(updates=(), state=state, value=jnp.asarray(val_error))
  return state


def scale_updates(updates: Any, plateau_state: Any) -> Any:
  """Applies the plateau rule's current LR scale to one step's updates."""
  return jax.tree.map(lambda u: u * plateau_state.scale.astype(u.dtype), updates)


def learning_rate(config: ml_collections.ConfigDict, plateau_state: Any, step: int) -> jax.Array:
  """The learning rate in force after `step` steps: the (warmed-up) rate times the plateau scale."""
  return lr_schedule(config)(step) * plateau_state.scale
