"""Data parallelism: one pure step, run under `jax.pmap` or `jax.jit` + `shard_map`, all devices.

Both modes give the step the same view: its shard of the global batch, the replicated state, and a
named axis `AXIS` for `lax.pmean`/`psum`. They differ only in how arrays are laid out:
  pmap — state carries a leading local-device axis; batches are (local devices, per device, ...);
  jit  — state is one global array replicated over a `Mesh`; batches are global arrays sharded on
         their leading axis (`NamedSharding(mesh, P(AXIS))`).
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alexnet_jax.errors import ConfigError

AXIS = 'batch'
MODES = ('pmap', 'jit')


class Parallel:
  """Places state and batches on every device and wraps steps for one parallel mode."""

  def __init__(self, mode: str, devices: Sequence[jax.Device] | None = None):
    """`devices`: all of them by default (every process's, in multi-host runs)."""
    if mode not in MODES:
      raise ConfigError(f'parallelism={mode!r} is unknown; use one of {MODES}.')
    self.mode = mode
    devices = list(devices or jax.devices())
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self._local_devices = [d for d in devices if d.process_index == jax.process_index()]
    self._local_mesh = Mesh(np.array(self._local_devices), (AXIS,))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def num_local_devices(self) -> int:
    return len(self._local_devices)

  def wrap(self, step: Callable[[Any, Any], Any], donate_state: bool = False) -> Callable:
    """`step(state, batch_shard) -> outputs`, run on all devices; outputs must be replicated."""
    donate = (0,) if donate_state else ()
    if self.mode == 'pmap':
      return jax.pmap(step, axis_name=AXIS, donate_argnums=donate,
                      devices=self.mesh.devices.tolist())
    # check_vma=False keeps pmap's autodiff semantics: gradients of the replicated parameters stay
    # per shard until the step's explicit pmean (with it, JAX would psum them implicitly).
    sharded = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=donate)

  def put_state(self, state: Any) -> Any:
    """Host state (the same in every process) → replicated on every device."""
    if self.mode == 'pmap':
      n = len(self._local_devices)
      return jax.device_put(jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), state),
                            NamedSharding(self._local_mesh, P(AXIS)))
    return self.replicated(state)

  @property
  def replicated_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def replicated(self, tree: Any) -> Any:
    """Host arrays (the same in every process) → global arrays replicated over the mesh: jit's
    state layout, and the layout checkpoints are written and read in, whatever the mode."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), self.replicated_sharding, lambda index: np.asarray(x)[index]), tree)

  def checkpointable(self, state: Any) -> Any:
    """Device state → the replicated global arrays checkpoints are written from: jit's state
    already is; pmap's per-device copies go through this process's host copy."""
    return state if self.mode == 'jit' else self.replicated(self.get(state))

  def get(self, tree: Any) -> Any:
    """Replicated device values (state, metrics; pmap or replicated layout) → this process's
    copy, as numpy arrays."""
    def local_copy(x):
      shard = np.asarray(x.addressable_data(0))
      spec = getattr(x.sharding, 'spec', ())
      return shard[0] if spec and spec[0] is not None else shard  # pmap layout: (1, ...) shards
    return jax.tree.map(local_copy, tree)

  @property
  def num_processes(self) -> int:
    return len({d.process_index for d in self.mesh.devices.flat})

  def check_batch_size(self, global_batch_size: int, what: str = 'train.batch_size') -> None:
    """Fails before any compilation when the global batch does not split evenly."""
    if global_batch_size <= 0:
      raise ConfigError(f'{what}={global_batch_size} must be positive.')
    if global_batch_size % self.num_devices:
      raise ConfigError(
          f'{what}={global_batch_size} does not divide evenly over {self.num_devices} devices; '
          f'use a multiple of {self.num_devices}.')

  def local_batch_size(self, global_batch_size: int) -> int:
    """The rows of each global batch that this process reads and feeds."""
    return global_batch_size // self.num_processes

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the global batch → arrays sharded over all devices."""
    if self.mode == 'pmap':
      n = len(self._local_devices)
      sharding = NamedSharding(self._local_mesh, P(AXIS))
      return {k: jax.device_put(v.reshape((n, -1) + v.shape[1:]), sharding)
              for k, v in batch.items()}
    sharding = NamedSharding(self.mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  def prefetch(self, batches: Iterable[dict[str, np.ndarray]], size: int = 2
               ) -> Iterator[dict[str, jax.Array]]:
    """Keeps `size` batches already on the devices ahead of the step."""
    batches = iter(batches)
    queue = collections.deque(self.put_batch(b) for b in itertools.islice(batches, size))
    while queue:
      yield queue.popleft()
      queue.extend(self.put_batch(b) for b in itertools.islice(batches, 1))
