"""Data and model parallelism: one pure step, run under `jax.pmap` or `jax.jit` + `shard_map`.

Both modes give the step the same view: its shard of the global batch, the whole state, and a
named axis `AXIS` for `lax.pmean`/`psum`. They differ only in how arrays are laid out:
  pmap — state carries a leading local-device axis; batches are (local devices, per device, ...);
  jit  — devices form a (`AXIS`, `MODEL_AXIS`) `Mesh` of model replicas × `model_parallel` devices
         each; the state is global arrays, every layer's kernel and bias split on its last axis
         (output channels, neurons) over `MODEL_AXIS` (replicated when `model_parallel` is 1), the
         rest replicated (`shardings`); batches are sharded on their leading axis over `AXIS`.
         The step is manual over both axes: with `model_parallel` > 1 each device runs one tower
         of the model (models.AlexNet.tower_axis), whose own collectives are the only exchanges
         between a replica's devices (README.md, "The paper's two GPUs").
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
MODEL_AXIS = 'model'
SPLIT = ('kernel', 'bias')  # the leaves split over MODEL_AXIS, in params and in momentum alike
MODES = ('pmap', 'jit')


class Parallel:
  """Places state and batches on every device and wraps steps for one parallel mode."""

  def __init__(self, mode: str, devices: Sequence[jax.Device] | None = None,
               model_parallel: int = 1):
    """`devices`: all of them by default (every process's, in multi-host runs);
    `model_parallel`: devices per model replica, each running one of the model's towers
    (models.check_model_parallel)."""
    if mode not in MODES:
      raise ConfigError(f'parallelism={mode!r} is unknown; use one of {MODES}.')
    if model_parallel < 1:
      raise ConfigError(f'model_parallel={model_parallel} must be 1 (data parallel) or more.')
    if model_parallel > 1 and mode == 'pmap':
      raise ConfigError(f"model_parallel={model_parallel} needs --config.parallelism=jit: pmap "
                        f"maps one axis (the batch) and cannot split a layer over devices.")
    self.mode, self.model_parallel = mode, model_parallel
    devices = list(devices or jax.devices())
    if len(devices) % model_parallel:
      raise ConfigError(f'model_parallel={model_parallel} does not divide the {len(devices)} '
                        f'devices; use a divisor of {len(devices)}.')
    grid = np.array(devices).reshape(-1, model_parallel)
    if any(len({d.process_index for d in replica}) > 1 for replica in grid):
      raise ConfigError(f'model_parallel={model_parallel} would split a model replica across '
                        f'processes; use a divisor of the devices each process has.')
    self.mesh = Mesh(grid, (AXIS, MODEL_AXIS))
    self._local_devices = [d for d in devices if d.process_index == jax.process_index()]
    self._local_mesh = Mesh(np.array(self._local_devices), (AXIS,))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def num_replicas(self) -> int:
    """Model replicas: the data-parallel width, over which batches are split and averaged."""
    return self.mesh.shape[AXIS]

  @property
  def num_local_devices(self) -> int:
    return len(self._local_devices)

  def wrap(self, step: Callable[[Any, Any], Any], updates_state: bool = False) -> Callable:
    """`step(state, batch_shard) -> outputs`, run on all devices; the first argument (a state or
    parameters) comes in the mode's layout, the outputs are replicated; with `updates_state` they
    are (the new state, replicated metrics), the new state in the old one's layout and buffers."""
    donate = (0,) if updates_state else ()
    if self.mode == 'pmap':
      return jax.pmap(step, axis_name=AXIS, donate_argnums=donate,
                      devices=list(self.mesh.devices.flat))

    def laid_out(state, batch):
      # Manual over both axes: each device sees its part of every split leaf (its tower's kernels
      # and neurons), and exchanges only what the step's own collectives say. check_vma=False keeps
      # pmap's autodiff semantics: gradients stay per device until the step's explicit pmean (with
      # it, JAX would psum the replicated parameters' gradients implicitly).
      specs = self.specs(state)
      return jax.shard_map(step, mesh=self.mesh, in_specs=(specs, P(AXIS)),
                           out_specs=(specs, P()) if updates_state else P(),
                           check_vma=False)(state, batch)

    return jax.jit(laid_out, donate_argnums=donate)

  def put_state(self, state: Any) -> Any:
    """Host state (the same in every process) → on every device, in the mode's layout."""
    if self.mode == 'pmap':
      n = len(self._local_devices)
      return jax.device_put(jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), state),
                            NamedSharding(self._local_mesh, P(AXIS)))
    return self.global_arrays(state)

  def specs(self, tree: Any) -> Any:
    """The global layout of a state-like tree (state, params, metrics; arrays or shapes), as
    PartitionSpecs: each `SPLIT` leaf split on its last axis over MODEL_AXIS when model_parallel
    divides it (the towers' kernels and neurons, one tower per device: models.AlexNet.splits), every
    other leaf replicated."""
    def spec(path, x):
      name = getattr(path[-1], 'key', None) if path else None
      split = (self.model_parallel > 1 and name in SPLIT and np.ndim(x) > 0
               and np.shape(x)[-1] % self.model_parallel == 0)
      return P(*[None] * (np.ndim(x) - 1), MODEL_AXIS) if split else P()
    return jax.tree_util.tree_map_with_path(spec, tree)

  def shardings(self, tree: Any) -> Any:
    """`specs` as NamedShardings: the layout checkpoints are written from and read into."""
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.specs(tree),
                        is_leaf=lambda x: isinstance(x, P))

  def global_arrays(self, tree: Any) -> Any:
    """Host arrays (the same in every process) → global arrays laid out by `shardings`: jit's
    state layout, and the layout checkpoints are written and read in, whatever the mode."""
    return jax.tree.map(lambda x, sharding: jax.make_array_from_callback(
        np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree, self.shardings(tree))

  def checkpointable(self, state: Any) -> Any:
    """Device state → the global arrays checkpoints are written from: jit's state already is;
    pmap's per-device copies go through this process's host copy."""
    return state if self.mode == 'jit' else self.global_arrays(self.get(state))

  def get(self, tree: Any) -> Any:
    """Device values (state, metrics; pmap or jit layout) → this process's whole copy, as numpy
    arrays; a split array is gathered from this process's shards (a model replica never spans
    processes, so they cover it)."""
    def local_copy(x):
      spec = getattr(x.sharding, 'spec', ())
      if spec and spec[0] == AXIS:  # pmap layout: (1, ...) shards
        return np.asarray(x.addressable_data(0))[0]
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      whole = np.empty(x.shape, x.dtype)
      for shard in x.addressable_shards:
        whole[shard.index] = np.asarray(shard.data)
      return whole
    return jax.tree.map(local_copy, tree)

  @property
  def num_processes(self) -> int:
    return len({d.process_index for d in self.mesh.devices.flat})

  def check_batch_size(self, global_batch_size: int, what: str = 'train.batch_size') -> None:
    """Fails before any compilation when the global batch does not split evenly."""
    if global_batch_size <= 0:
      raise ConfigError(f'{what}={global_batch_size} must be positive.')
    if global_batch_size % self.num_replicas:
      over = (f'{self.num_devices} devices' if self.model_parallel == 1 else
              f'{self.num_replicas} model replicas ({self.num_devices} devices, model_parallel='
              f'{self.model_parallel})')
      raise ConfigError(f'{what}={global_batch_size} does not divide evenly over {over}; use a '
                        f'multiple of {self.num_replicas}.')

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
