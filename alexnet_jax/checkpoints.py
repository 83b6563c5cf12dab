"""What a workdir holds besides metrics: orbax checkpoints and the config of the run.

`WORKDIR/checkpoints/<step>/` — the whole train state (parameters, momentum, plateau state, step,
RNG key). The last `max_to_keep` are kept, plus the best by validation top-1 error. Orbax writes
each checkpoint under a temporary name and renames it when complete, so a crash or a full disk
never damages the previous one.
`WORKDIR/config.json` — the config of the first start; a later start with a different config is
refused (fields in RESUMABLE may change).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from alexnet_jax.errors import ConfigError

# Fields a resumed run may change: run length, logging, paths, and how devices share the work.
RESUMABLE = ('parallelism', 'dataset.data_dir', 'dataset.manual_dir', 'train.num_epochs',
             'train.num_train_steps', 'train.log_every_steps', 'train.checkpoint_every_steps',
             'train.checkpoint_max_to_keep', 'train.allow_config_change', 'train.on_nonfinite',
             'train.debug_nan_step', 'train.eval_batch_size')


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(max_to_keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_top1_error'], reverse=True,
                                    n=1, keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
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
