"""Orbax checkpoints of a run: `WORKDIR/checkpoints/<step>/`.

Each holds the whole train state (parameters, momentum, plateau state, step, RNG key). The last
`max_to_keep` are kept, plus the best by validation top-1 error. Orbax writes each checkpoint
under a temporary name and renames it when complete, so a crash or a full disk never damages the
previous one. A checkpoint damaged later (a truncated copy, a bad disk) is reported and skipped:
training resumes from the newest one that restores, and the damaged one is moved, whole, to
`WORKDIR/damaged_checkpoints/<step>/`, so the run can write that step again.

`restore_params` reads only the parameters of a checkpoint: what evaluation, prediction and
fine-tuning (`init.checkpoint`) need, whatever optimiser state the run kept beside them. Reading
never creates anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax.errors import ConfigError

DAMAGED = 'damaged_checkpoints'


def make_manager(workdir: str, max_to_keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The run's manager; `read_only` creates nothing (a missing directory has no steps)."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(max_to_keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_top1_error'], reverse=True,
                                    n=1, keep_checkpoints_without_metrics=False)])
  with quiet(logging.ERROR):  # a read-only manager warns that it is read-only
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        item_handlers=ocp.StandardCheckpointHandler(),  # metadata readable before any restore
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=False))


def all_steps(workdir: str) -> list[int]:
  """The steps of the workdir's checkpoints, oldest first (none if it has no checkpoints/)."""
  manager = make_manager(workdir, read_only=True)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None) -> None:
  """Writes `state` (global arrays, see Parallel.global_arrays; split or replicated, the files are
  the same) as checkpoint `step`; every process calls it, orbax coordinates who writes what."""
  with quiet():  # a failure is raised to the caller, who says it in one line
    manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, like: Any, shardings: Any, step: int) -> Any:
  """Checkpoint `step` in the structure of `like`, as arrays laid out by `shardings` (a tree of
  `like`'s structure, e.g. Parallel.shardings(like)): whichever layout wrote it."""
  abstract = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=sharding),
                          like, shardings)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def reason(error: BaseException) -> str:
  """What the one-line errors quote of a library failure: the first line of the innermost
  exception of the chain (tensorstore's own words, not orbax's wrapper), at most 200 characters."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= 200 else '...' + line[-200:]


@contextlib.contextmanager
def quiet(level: int = logging.CRITICAL) -> Iterator[None]:
  """Orbax logs failures with tracebacks (some from its threads) and read-only managers with
  warnings; within `with`, those stay off the terminal: the caller reports them in one line."""
  _hide_orbax_leftovers()
  loggers = [logging.getLogger(name) for name in ('absl', 'asyncio')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(level)
  try:
    yield
  finally:
    for logger, old in zip(loggers, levels):
      logger.setLevel(old)


def _is_orbax_leftover(exc: BaseException | None, obj: Any = None) -> bool:
  code = getattr(obj, 'cr_code', None)
  return (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed') or (
      code is not None and 'orbax' in code.co_filename)


class _NeverRetrieved(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


def _hide_orbax_leftovers() -> None:
  """A failed orbax restore or save leaves tasks, coroutines and tensorstore callbacks behind
  that print tracebacks from other threads, during the failure and whenever they are collected
  later, after the failure was reported in one line. Installed before the first orbax call, for
  the process: drops those (and only those)."""
  if getattr(sys.excepthook, 'hides_orbax_leftovers', False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, exc, tb):
    if not _is_orbax_leftover(exc):
      excepthook(kind, exc, tb)

  def quiet_unraisablehook(unraisable):
    if not _is_orbax_leftover(unraisable.exc_value, unraisable.object):
      unraisablehook(unraisable)

  quiet_excepthook.hides_orbax_leftovers = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
  logging.getLogger('asyncio').addFilter(_NeverRetrieved())


def restore_newest(manager: ocp.CheckpointManager, like: Any, shardings: Any,
                   say: Callable[[str], None]) -> tuple[Any | None, list[int]]:
  """(the newest checkpoint that restores, or None if there is none; the newer steps that did
  not). Each failure is one line through `say`; if every checkpoint fails, a ConfigError."""
  steps = sorted(manager.all_steps(), reverse=True)
  damaged: dict[int, str] = {}
  for step in steps:
    try:
      with quiet():
        return restore(manager, like, shardings, step), list(damaged)
    except Exception as e:  # tensorstore, orbax, msgpack and OS errors alike
      damaged[step] = reason(e)
      say(f'checkpoint {step} in {manager.directory} cannot be restored ({damaged[step]}); '
          f'trying an older one.')
  if damaged:
    newest = steps[0]
    raise ConfigError(
        f'none of the checkpoints in {manager.directory} can be restored (steps '
        f'{", ".join(map(str, sorted(damaged)))}; step {newest}: {damaged[newest]}); to start '
        f'over, use a fresh --workdir or move that checkpoints directory away.')
  return None, []


def set_aside(manager: ocp.CheckpointManager, workdir: str, steps: Sequence[int]) -> str:
  """Moves damaged checkpoints to WORKDIR/damaged_checkpoints/<step>/ (nothing is deleted);
  returns that directory. Call on process 0 only."""
  where = os.path.join(workdir, DAMAGED)
  os.makedirs(where, exist_ok=True)
  for step in steps:
    target = os.path.join(where, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(where, f'{step}.{suffix}')
      suffix += 1
    os.rename(os.path.join(str(manager.directory), str(step)), target)
  return where


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters as numpy arrays) of checkpoint `step` (None: the newest) of `workdir`."""
  manager = make_manager(workdir, read_only=True)
  try:
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
    try:
      like = {'params': jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          manager.item_metadata(step)['params'])}
      with quiet(), ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            os.path.join(manager.directory, str(step), 'default'),
            args=ocp.args.PyTreeRestore(like, ocp.checkpoint_utils.construct_restore_args(like),
                                        partial_restore=True))
    except Exception as e:  # a damaged checkpoint: say which, and what else there is
      others = ', '.join(map(str, sorted(set(steps) - {step})))
      raise ConfigError(f'checkpoint {step} of {workdir} cannot be read ({reason(e)}); '
                        f'{f"pick another step ({others})" if others else "it has no other"}.'
                        ) from None
  finally:
    manager.close()
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
