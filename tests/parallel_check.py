"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_train.py).

Trains the tiny model for a few steps from one state and one batch on 1 device, under pmap on 8
and under jit on 8, and prints the per-step losses and the largest parameter difference to the 1-device run as JSON.
"""

import functools
import json
import sys

import jax
import numpy as np

from alexnet_jax import optim, train
from alexnet_jax.parallel import Parallel
from conftest import tiny_config


def run(mode, devices, steps, config, batch):
  model = train.make_model(config, 10)
  tx = optim.make_optimizer(config.optimizer)
  state = train.create_train_state(model, tx, optim.make_plateau(config.optimizer),
                                   config.dataset.image_size, config.seed)
  parallel = Parallel(mode, devices)
  step = parallel.wrap(functools.partial(train.train_step, model=model, tx=tx), donate_state=True)
  state = parallel.put_state(state)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, parallel.put_batch(batch))
    losses.append(float(parallel.get(metrics)['train_loss']))
  params = parallel.get(state).params
  return losses, np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def main():
  steps = int(sys.argv[1])
  config = tiny_config('')
  config.optimizer.learning_rate = 0.002
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, 63, 63, 3)).astype(np.float32),
           'label': rng.integers(0, 10, size=16).astype(np.int32),
           'index': np.arange(100, 116, dtype=np.int32)}
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {name: run(mode, devs, steps, config, batch) for name, mode, devs in
             [('one', 'jit', devices[:1]), ('pmap8', 'pmap', devices),
              ('jit8', 'jit', devices)]}
  ref = results['one'][1]
  out = {name: {'losses': losses,
                'max_rel_param_diff': float(np.max(np.abs(p - ref)) / np.max(np.abs(ref)))}
         for name, (losses, p) in results.items()}
  # Dropout noise hides a few steps' progress; without it the loss on a fixed batch must fall.
  config.model.dropout_rate = 0.0
  out['one_no_dropout'] = {'losses': run('jit', devices[:1], steps, config, batch)[0]}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
