"""Trains the tiny model a few steps from one state and one global batch; prints JSON.

    parallel_check.py STEPS                       # 1 device, pmap on 8, jit on 8, jit on 4x2 and
                                                  # 1x2 model parallel, 2x4 with 4 towers (needs 8
                                                  # devices)
    parallel_check.py STEPS MODE PID NPROC PORT [MODEL_PARALLEL]  # one process of a multi-process
                                                  # run

See tests/test_train.py for how they are started.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from alexnet_jax import checkpoints, experiment
from conftest import tiny_config


def run(mode, devices, steps, config, batch, model_parallel=1, keep=None):
  """(losses, the parameters flattened); `keep` (a dict) receives the experiment and the state."""
  config.parallelism, config.model_parallel = mode, model_parallel
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
  if keep is not None:
    keep.update(exp=exp, state=state)
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


def split_fractions(state):
  """{parameter: [the fractions of it each device holds], whether each model replica's devices
  hold different parts}: the model-parallel layout, read from the arrays' shardings."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    parts = x.sharding.devices_indices_map(x.shape)
    out[jax.tree_util.keystr(path)] = {
        'fractions': sorted({s.data.size / x.size for s in x.addressable_shards}),
        'disjoint': all(len({str(parts[d]) for d in replica}) == len(replica)
                        for replica in x.sharding.mesh.devices)}
  return out


def cross_restore(split, replicated):
  """A checkpoint of each run restored into the other's layout: whether the states are equal, and
  the layout they came back in (the fraction of fc6's kernel on a device)."""
  out = {}
  for name, source, target in (('4x2->8', split, replicated), ('8->4x2', replicated, split)):
    with tempfile.TemporaryDirectory() as workdir:
      manager = checkpoints.make_manager(workdir)
      checkpoints.save(manager, 5, source['exp'].parallel.checkpointable(source['state']))
      parallel = target['exp'].parallel
      like = parallel.get(target['state'])
      restored = checkpoints.restore(manager, like, parallel.shardings(like), 5)
      manager.close()
    a, b = source['exp'].parallel.get(source['state']), parallel.get(restored)
    kernel = restored.params['fc6']['kernel']
    out[name] = {'equal': all(np.array_equal(x, y)
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
                 'fc6_kernel_fraction': kernel.addressable_shards[0].data.size / kernel.size}
  return out


def main():
  steps = int(sys.argv[1])
  config, batch = setup()
  if len(sys.argv) > 2:  # one process of a multi-process run
    mode, pid, nproc, port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    model_parallel = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    jax.distributed.initialize(f'localhost:{port}', num_processes=nproc, process_id=pid)
    losses, params = run(mode, jax.devices(), steps, config, batch, model_parallel)
    print(json.dumps({'devices': len(jax.devices()), 'losses': losses,
                      'param_sum': float(np.sum(params, dtype=np.float64)),
                      'param_head': params[:1000:7].tolist()}))
    return
  devices = jax.devices()
  assert len(devices) == 8, devices
  jit8, jit4x2 = {}, {}
  results = {name: run(mode, devs, steps, config, batch, *more) for name, mode, devs, *more in
             [('one', 'jit', devices[:1]), ('pmap8', 'pmap', devices),
              ('jit8', 'jit', devices, 1, jit8), ('jit4x2', 'jit', devices, 2, jit4x2),
              ('jit1x2', 'jit', devices[:2], 2)]}
  out = summary(results, results['one'][1])
  # Four towers on four devices (fc8's 10 classes do not split over 4: it runs whole on each).
  config.model.groups = 4
  towers4 = {name: run('jit', devs, steps, config, batch, model_parallel)
             for name, devs, model_parallel in (('one', devices[:1], 1), ('jit2x4', devices, 4))}
  out['jit2x4_groups4'] = summary(towers4, towers4['one'][1])['jit2x4']
  out['jit2x4_groups4']['one_losses'] = towers4['one'][0]
  config.model.groups = 2
  out['jit4x2']['split'] = split_fractions(jit4x2['state'])
  out['jit4x2']['vs_jit8'] = summary(results, results['jit8'][1])['jit4x2']['max_rel_param_diff']
  out['checkpoints'] = cross_restore(jit4x2, jit8)
  out['one']['param_head'] = results['one'][1][:1000:7].tolist()
  # Dropout noise hides a few steps' progress; without it the loss on a fixed batch must fall.
  config.model.dropout_rate = 0.0
  out['one_no_dropout'] = {'losses': run('jit', devices[:1], steps, config, batch)[0]}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
