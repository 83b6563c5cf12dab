import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alexnet_jax import optim


def opt_config(mode, warmup_steps=0, **plateau):
  return ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, weight_decay=0.5, weight_decay_mode=mode, frozen_layers=(),
      warmup_steps=warmup_steps, plateau=dict(factor=0.1, patience=3, rtol=1e-4, atol=0.0, cooldown=0, min_scale=1e-3,
                   **plateau)))


def two_steps(mode):
  tx = optim.make_optimizer(opt_config(mode))
  w = {'w': jnp.array(2.0)}
  state = tx.init(w)
  for g in (1.0, 3.0):
    updates, state = tx.update({'w': jnp.array(g)}, state, w)
    w = optax.apply_updates(w, updates)
  return float(w['w'])


def test_coupled_weight_decay_by_hand():
  # v1 = g1 + wd*w0 = 1 + 1 = 2;           w1 = 2 - 0.1*2 = 1.8
  # v2 = 0.9*2 + 3 + 0.5*1.8 = 5.7;        w2 = 1.8 - 0.57 = 1.23
  assert two_steps('coupled') == pytest.approx(1.23, abs=1e-6)


def test_decoupled_weight_decay_by_hand():
  # v1 = 1;   w1 = 2 - 0.1*(1 + 0.5*2) = 1.8
  # v2 = 0.9*1 + 3 = 3.9;   w2 = 1.8 - 0.1*(3.9 + 0.5*1.8) = 1.32
  assert two_steps('decoupled') == pytest.approx(1.32, abs=1e-6)


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match='weight_decay_mode'):
    optim.make_optimizer(opt_config('adamw'))


def test_plateau_drops_after_exactly_patience_bad_evals():
  config = opt_config('decoupled')
  plateau = optim.make_plateau(config)
  state = plateau.init({'w': jnp.zeros(())})
  lrs = []
  for err in [0.5, 0.4, 0.4, 0.41, 0.45, 0.42, 0.42, 0.42]:
    state = optim.update_plateau(plateau, state, err)
    lrs.append(float(optim.learning_rate(config, state, step=0)))
  # Improvements at evals 1 and 2; evals 3, 4, 5 do not improve -> drop after the 5th.
  np.testing.assert_allclose(lrs, [0.1] * 4 + [0.01] * 3 + [0.001], rtol=1e-6)


def test_plateau_scale_multiplies_updates():
  plateau = optim.make_plateau(opt_config('decoupled'))
  state = plateau.init({'w': jnp.zeros(())})._replace(scale=jnp.array(0.01))
  out = optim.scale_updates({'w': jnp.array(3.0)}, state)
  assert float(out['w']) == pytest.approx(0.03)


def test_warmup_ramps_the_rate_linearly_then_holds_it():
  config = opt_config('decoupled', warmup_steps=4)
  config.momentum, config.weight_decay = 0.0, 0.0
  tx = optim.make_optimizer(config)
  plateau_state = optim.make_plateau(config).init({'w': jnp.zeros(())})
  w = {'w': jnp.array(0.0)}
  state = tx.init(w)
  for step, rate in enumerate([0.0, 0.025, 0.05, 0.075, 0.1, 0.1]):
    assert float(optim.learning_rate(config, plateau_state, step)) == pytest.approx(rate)
    updates, state = tx.update({'w': jnp.array(1.0)}, state, w)  # the update of step + 1
    assert float(updates['w']) == pytest.approx(-rate), step


def test_no_warmup_keeps_the_plain_chain():
  # The configs without a warm-up keep their optimiser state (and checkpoints) as they were.
  config = opt_config('decoupled')
  state = optim.make_optimizer(config).init({'w': jnp.zeros(())})
  plain = optax.chain(optax.trace(0.9), optax.add_decayed_weights(0.5), optax.scale(-0.1))
  assert jax.tree.structure(state) == jax.tree.structure(plain.init({'w': jnp.zeros(())}))
  plateau_state = optim.make_plateau(config).init({'w': jnp.zeros(())})
  assert float(optim.learning_rate(config, plateau_state, 0)) == pytest.approx(0.1)


def test_negative_warmup_is_refused():
  with pytest.raises(ValueError, match=r'^optimizer.warmup_steps=-1 must be 0'):
    optim.make_optimizer(opt_config('decoupled', warmup_steps=-1))
