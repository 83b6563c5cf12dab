"""Trains the tiny model a few steps from one state and one global batch; prints JSON.

    parallel_check.py STEPS                       # 1 device, pmap on 8, jit on 8 (needs 8 devices)
    parallel_check.py STEPS MODE PID NPROC PORT   # one process of a multi-process run

See tests/test_train.py for how they are started.
"""

import json
import sys

import jax
import numpy as np

from alexnet_jax import experiment
from conftest import tiny_config


def run(mode, devices, steps, config, batch):
  config.parallelism = mode
  exp = experiment.build(config, 10, devices)
  parallel = exp.parallel
  state = parallel.put_state(exp.init_state())
  rows = parallel.local_batch_size(len(batch['label']))  # this process feeds its rows only
  first = jax.process_index() * rows
  local = {k: v[first:first + rows] for k, v in batch.items()}
  losses = []
  for _ in range(steps):
    state, metrics = exp.train_step(state, parallel.put_batch(local))
    losses.append(float(parallel.get(metrics)['train_loss']))
  params = parallel.get(state).params
  return losses, np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def setup():
  config = tiny_config('')
  config.optimizer.learning_rate = 0.002
  config.model.init = 'he'  # at width 0.25, N(0, 0.03²) weights barely move the loss in 3 steps
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, size=(16, 63, 63, 3), dtype=np.uint8),
           'shift': rng.normal(0, 0.01, size=(16, 3)).astype(np.float32),
           'label': rng.integers(0, 10, size=16).astype(np.int32),
           'index': np.arange(100, 116, dtype=np.int32)}
  return config, batch


def summary(results, ref):
  return {name: {'losses': losses,
                 'max_rel_param_diff': float(np.max(np.abs(p - ref)) / np.max(np.abs(ref))),
                 'param_sum': float(np.sum(p, dtype=np.float64))}
          for name, (losses, p) in results.items()}


def main():
  steps = int(sys.argv[1])
  config, batch = setup()
  if len(sys.argv) > 2:  # one process of a multi-process run
    mode, pid, nproc, port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    jax.distributed.initialize(f'localhost:{port}', num_processes=nproc, process_id=pid)
    losses, params = run(mode, jax.devices(), steps, config, batch)
    print(json.dumps({'devices': len(jax.devices()), 'losses': losses,
                      'param_sum': float(np.sum(params, dtype=np.float64)),
                      'param_head': params[:1000:7].tolist()}))
    return
  devices = jax.devices()
  assert len(devices) == 8, devices
  results = {name: run(mode, devs, steps, config, batch) for name, mode, devs in
             [('one', 'jit', devices[:1]), ('pmap8', 'pmap', devices), ('jit8', 'jit', devices)]}
  out = summary(results, results['one'][1])
  out['one']['param_head'] = results['one'][1][:1000:7].tolist()
  # Dropout noise hides a few steps' progress; without it the loss on a fixed batch must fall.
  config.model.dropout_rate = 0.0
  out['one_no_dropout'] = {'losses': run('jit', devices[:1], steps, config, batch)[0]}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
