"""What a workdir holds besides metrics: orbax checkpoints and the config of the run.

`WORKDIR/checkpoints/<step>/` — the whole train state (parameters, momentum, plateau state, step,
RNG key). The last `max_to_keep` are kept, plus the best by validation top-1 error. Orbax writes
each checkpoint under a temporary name and renames it when complete, so a crash or a full disk
never damages the previous one.
`WORKDIR/config.json` — the config of the first start; a later start with a different config is
refused (fields in RESUMABLE may change).
`WORKDIR/class_names.txt` — the data set's class names, one a line in label order (for `predict`).

`restore_params` reads only the parameters of a checkpoint: what evaluation, prediction and
fine-tuning (`init.checkpoint`) need, whatever optimiser state the run kept beside them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax.errors import ConfigError

# Fields a resumed run may change: run length, logging, paths, and how devices share the work.
RESUMABLE = ('parallelism', 'dataset.data_dir', 'dataset.manual_dir', 'train.num_epochs',
             'train.num_train_steps', 'train.log_every_steps', 'train.checkpoint_every_steps',
             'train.checkpoint_max_to_keep', 'train.allow_config_change', 'train.on_nonfinite',
             'train.debug_nan_step', 'train.eval_batch_size')
CLASS_NAMES = 'class_names.txt'


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(max_to_keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_top1_error'], reverse=True,
                                    n=1, keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      item_handlers=ocp.StandardCheckpointHandler(),  # so metadata is readable before any restore
      options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None) -> None:
  """Writes `state` (global arrays, see Parallel.replicated) as checkpoint `step`; every
  process calls it, orbax coordinates who writes what."""
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, like: Any, sharding: jax.sharding.Sharding,
            step: int | None = None) -> Any | None:
  """Checkpoint `step` (default: the newest) in the structure of `like`, as arrays with
  `sharding`; None if there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters as numpy arrays) of checkpoint `step` (None: the newest) of `workdir`."""
  manager = make_manager(workdir)
  steps = manager.all_steps()
  if not steps:
    raise ConfigError(f'{workdir} has no checkpoints; train there first (python -m '
                      f'alexnet_jax.main) or import weights (python -m '
                      f'alexnet_jax.convert_torchvision PATH.pth {workdir}).')
  step = max(steps) if step is None else step
  if step not in steps:
    raise ConfigError(f'checkpoint {step} is not in {workdir}/checkpoints (it has '
                      f'{sorted(steps)}); pick one of those.')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  like = {'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                 manager.item_metadata(step)['params'])}
  manager.close()
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(manager.directory, str(step), 'default'),
      args=ocp.args.PyTreeRestore(like, ocp.checkpoint_utils.construct_restore_args(like),
                                  partial_restore=True))
  return step, jax.device_get(restored['params'])


def check_param_shapes(found: Any, expected: Any, where: str, fix: str,
                       skip: Sequence[str] = ()) -> None:
  """Raises a one-line error at the first layer whose parameters differ in name or shape
  (layers in `skip` are not compared); `expected` may hold arrays or ShapeDtypeStructs."""
  flat = lambda tree: {k: tuple(np.shape(v)) for k, v in
                       flax.traverse_util.flatten_dict(tree, sep='.').items()
                       if k.split('.')[0] not in skip}
  found, expected = flat(found), flat(expected)
  for key in sorted(set(found) | set(expected)):
    if found.get(key) != expected.get(key):
      there = found.get(key, 'missing')
      raise ConfigError(f'{where} does not fit this model: {key} is {there} there but '
                        f'{expected.get(key, "absent")} here; {fix}.')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained (or imported) with."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{workdir} has no config.json: not a training workdir nor the output of '
                      f'python -m alexnet_jax.convert_torchvision.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def write_class_names(workdir: str, names: Sequence[str]) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CLASS_NAMES), 'w') as f:
      f.writelines(f'{name}\n' for name in names)


def read_class_names(workdir: str) -> list[str] | None:
  """The class names written beside the checkpoints, or None if the workdir has none."""
  path = os.path.join(workdir, CLASS_NAMES)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().splitlines()


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    flat.update(_flatten(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return flat


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose run used another config (see `RESUMABLE`)."""
  path = os.path.join(workdir, 'config.json')
  current = _flatten(json.loads(config.to_json_best_effort()))
  if os.path.exists(path):
    with open(path) as f:
      stored = _flatten(json.load(f))
    changed = sorted(k for k in set(stored) | set(current)
                     if k not in RESUMABLE and stored.get(k) != current.get(k))
    if changed and not config.train.allow_config_change:
      diff = ', '.join(f'{k}: {stored.get(k)!r} -> {current.get(k)!r}' for k in changed[:3])
      raise ConfigError(
          f'workdir {workdir} holds a run with a different config ({diff}'
          f'{", ..." if len(changed) > 3 else ""}); use a fresh --workdir, or pass '
          f'--config.train.allow_config_change=True to continue it with the new config.')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config of the run (once all checks passed); the next start compares to it."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
