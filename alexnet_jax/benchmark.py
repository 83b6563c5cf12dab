"""Training throughput of the real `steps.train_step` on synthetic batches already on the devices.

    python -m alexnet_jax.benchmark --config=configs/benchmark.py --json=b.jsonl --markdown=b.md
    python experiments/gpu_report.py --rows=b.jsonl,torch.jsonl  # table + the goals' ratios

Each case (parallel wrapper, dtype, global batch, model implementation switches) builds its
experiment (`experiment.build`: the model and `steps.train_step` wrapped for the devices), puts
one random batch on the devices once and reuses it (uint8 pixels and lighting shifts, as the input
pipeline sends them: the step normalises them on the device); the first call (compilation) and a few warm-up
steps are excluded; then `repeats` blocks of `timed_steps` steps are timed up to
`jax.block_until_ready` and the median block gives img/s. Achieved TFLOP/s counts the model's
useful work: 3 x 2 x `models.forward_macs` per trained image (forward + backward ~ 3 forwards;
4.35 GFLOP for the paper model at 224), whatever an implementation executes on top (zeros of the
'block' kernels, LRN band matrices). Rows are printed and appended to `--json` as they are measured,
so an interrupted run keeps what it measured. No TensorFlow is imported on this path.

`benchmark.float_batch_baseline`: after the grid, the headline case once more on a float32 batch
already normalised (what the host sent before batches became uint8), so the table shows what the
device-side normalisation and lighting cost (experiments/gpu_report.py states it as a ratio).

`--traffic` times nothing: it compiles --config's own train step (its parallelism, model_parallel,
model.dtype, train.batch_size; the benchmark section is not read) and prints where the devices talk
(alexnet_jax/traffic.py), e.g. the paper's two towers on two CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m alexnet_jax.benchmark \
        --config=configs/imagenet.py --traffic --config.parallelism=jit --config.model_parallel=2 \
        --config.train.batch_size=128
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from alexnet_jax import cli, experiment, models, steps, traffic
from alexnet_jax.errors import ConfigError
from alexnet_jax.parallel import MODES, Parallel

# Dense bf16 tensor-core peak (TFLOP/s, NVIDIA spec sheets) by device name, most specific first.
# A dense bf16 matmul reaches ~790 of the 989 on an H100 SXM / H200.
PEAK_BF16_TFLOPS = (('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.4), ('H200', 989.4),
                    ('A100', 312.0))
IMPL_FIELDS = models.IMPLS
GRIDS = ('one_at_a_time', 'product')


def peak_bf16_tflops(device_name: str) -> float | None:
  """bf16 peak of one device called `device_name` (JAX device_kind, torch name); None: unknown."""
  return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def make_row(*, framework: str, wrapper: str, impl: str, dtype: str, batch_size: int,
             seconds_per_step: float, flop_per_image: float, compile_s: float, device: str,
             num_devices: int, **extra: Any) -> dict[str, Any]:
  """One result row (shared with experiments/torch_reference.py)."""
  images_per_s = batch_size / seconds_per_step
  tflops = images_per_s * flop_per_image / 1e12
  peak = peak_bf16_tflops(device)
  return {'framework': framework, 'wrapper': wrapper, 'impl': impl, 'dtype': dtype,
          'batch_size': batch_size, 'images_per_second': images_per_s,
          'ms_per_step': 1e3 * seconds_per_step, 'flop_per_image': flop_per_image, 'tflops': tflops,
          'peak_fraction': tflops / (peak * num_devices) if peak else None,
          'compile_s': compile_s, 'device': device, 'num_devices': num_devices, **extra}


COLUMNS = ('framework', 'wrapper', 'impl', 'dtype', 'batch', 'input', 'img/s', 'ms/step',
           'TFLOP/s', '% bf16 peak', 'compile s')


def format_row(row: dict[str, Any]) -> str:
  """A markdown table row (`COLUMNS`)."""
  if 'error' in row:
    cells = [row['framework'], row['wrapper'], row['impl'], row['dtype'], str(row['batch_size']),
             row.get('batch_dtype', 'float32'),
             'failed: ' + row['error'].replace('|', '/').replace('\n', ' '), '', '', '', '']
  else:
    frac = row['peak_fraction']
    cells = [row['framework'], row['wrapper'], row['impl'], row['dtype'], str(row['batch_size']),
             row.get('batch_dtype', 'float32'),  # rows of earlier versions and torch: float32
             f'{row["images_per_second"]:,.0f}', f'{row["ms_per_step"]:.2f}',
             f'{row["tflops"]:.1f}', 'n/a' if frac is None else f'{100 * frac:.1f}',
             f'{row["compile_s"]:.1f}']
  return '| ' + ' | '.join(cells) + ' |'


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  return '\n'.join(lines + [format_row(r) for r in rows])


def impl_name(impls: dict[str, str]) -> str:
  return ' '.join(f'{k.removesuffix("_impl")}={v}' for k, v in impls.items())


def _safe(read: Callable[[], Any]) -> str:
  """Metadata for a row; an API that moved in another JAX version must not lose the row."""
  try:
    return str(read())
  except Exception:  # noqa: BLE001
    return 'unknown'


def measure(config: ml_collections.ConfigDict, mode: str, dtype: str, batch_size: int,
            impls: dict[str, str], host_state: steps.TrainState,
            batch_dtype: str = 'uint8') -> dict[str, Any]:
  """Times `steps.train_step` for one case (see the module docstring)."""
  b = config.benchmark
  case = config.copy_and_resolve_references()
  case.parallelism = mode
  case.model.dtype = dtype
  case.model.update(impls)
  exp = experiment.build(case)
  image_size, parallel, step = exp.pre.image_size, exp.parallel, exp.train_step
  batch = parallel.put_batch(synthetic_batch(batch_size, image_size, exp.model.num_classes,
                                             batch_dtype))
  state = parallel.put_state(host_state)

  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(b.warmup_steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  blocks = []
  for _ in range(b.repeats):
    start = time.perf_counter()
    for _ in range(b.timed_steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    blocks.append((time.perf_counter() - start) / b.timed_steps)
  device = jax.devices()[0]
  return make_row(framework='jax', wrapper=mode, impl=impl_name(impls), dtype=dtype,
                  batch_size=batch_size, seconds_per_step=statistics.median(blocks),
                  flop_per_image=6.0 * models.forward_macs(exp.model, image_size),
                  compile_s=compile_s, device=device.device_kind if device.platform != 'cpu'
                  else 'cpu', num_devices=parallel.num_devices, jax_version=jax.__version__,
                  matmul_precision=_safe(lambda: jax.config.jax_default_matmul_precision),
                  image_size=image_size, batch_dtype=batch_dtype,
                  step_times_ms=[1e3 * t for t in blocks],
                  final_loss=float(parallel.get(metrics)['train_loss']))


def synthetic_batch(batch_size: int, image_size: int, num_classes: int,
                    batch_dtype: str = 'uint8') -> dict[str, np.ndarray]:
  """One random training batch as the input pipeline sends it (uint8 pixels and lighting
  shifts), or with float32 pixels as if normalised on the host."""
  rng = np.random.default_rng(0)
  shape = (batch_size, image_size, image_size, 3)
  return {'image': (rng.integers(0, 256, shape, dtype=np.uint8) if batch_dtype == 'uint8' else
                    rng.standard_normal(shape, dtype=np.float32)),
          'shift': rng.normal(0, 0.01, (batch_size, 3)).astype(np.float32),
          'label': rng.integers(0, num_classes, batch_size).astype(np.int32),
          'index': np.arange(batch_size, dtype=np.int32)}


def collectives(config: ml_collections.ConfigDict) -> tuple[list[traffic.Collective], str]:
  """The cross-device collectives of `config`'s train step (its parallelism, model_parallel,
  model and train.batch_size) as compiled for these devices, and a title saying which step;
  nothing runs but the compiler."""
  exp = experiment.build(config)
  parallel = exp.parallel
  parallel.check_batch_size(config.train.batch_size)
  batch = parallel.put_batch(synthetic_batch(config.train.batch_size, exp.pre.image_size,
                                             exp.model.num_classes))
  compiled = exp.train_step.lower(parallel.put_state(exp.init_state()), batch).compile()
  device = jax.devices()[0]
  title = (f'Train step: {config.model.variant}, width {config.model.width:g}, '
           f'{exp.pre.image_size}x{exp.pre.image_size}, {config.model.dtype}, global batch '
           f'{config.train.batch_size}, parallelism={config.parallelism}, {parallel.num_replicas} '
           f'replica{"s" * (parallel.num_replicas > 1)} x model_parallel={parallel.model_parallel} on {parallel.num_devices} '
           f'{device.device_kind if device.platform != "cpu" else "CPU"} devices')
  return traffic.collectives(compiled.as_text(), parallel.mesh.devices.shape), title


def parse_search(search: Sequence[str]) -> list[tuple[str, str]]:
  """'field=value' strings → pairs, checked against the model's implementation choices."""
  pairs = []
  for item in search:
    field, _, value = item.partition('=')
    if field not in IMPL_FIELDS or value not in IMPL_FIELDS[field]:
      raise ConfigError(f'benchmark.search item {item!r} is not FIELD=VALUE with FIELD in '
                       f'{sorted(IMPL_FIELDS)} and VALUE one of its choices: {IMPL_FIELDS}.')
    pairs.append((field, value))
  return pairs


def check(config: ml_collections.ConfigDict) -> None:
  """Fails on a bad benchmark section before anything compiles."""
  b = config.benchmark
  for name, values, choices in (('modes', b.modes, MODES), ('dtypes', b.dtypes, models.DTYPES)):
    if not values or any(v not in choices for v in values):
      raise ConfigError(f'benchmark.{name}={values!r}: use a non-empty tuple of {choices}.')
  if b.grid not in GRIDS:
    raise ConfigError(f'benchmark.grid={b.grid!r} is unknown; use one of {GRIDS}.')
  if not b.batch_sizes:
    raise ConfigError('benchmark.batch_sizes is empty; give at least one batch size.')
  for mode in b.modes:
    for batch_size in b.batch_sizes:
      Parallel(mode).check_batch_size(batch_size, f'benchmark.batch_sizes entry {batch_size}')
  parse_search(b.search)
  experiment.build(config)


def grid(b: ml_collections.ConfigDict) -> list[tuple[str, str, int]]:
  """(mode, dtype, batch) cases; the headline (first of each axis) comes first."""
  head = (b.modes[0], b.dtypes[0], b.batch_sizes[0])
  if b.grid == 'product':
    cases = [(m, d, n) for m in b.modes for d in b.dtypes for n in b.batch_sizes]
  else:
    cases = ([head] + [(m, head[1], head[2]) for m in b.modes[1:]]
             + [(head[0], d, head[2]) for d in b.dtypes[1:]]
             + [(head[0], head[1], n) for n in b.batch_sizes[1:]])
  return [head] + [c for c in cases if c != head]


def run(config: ml_collections.ConfigDict, emit: Callable[[dict[str, Any]], None]
        ) -> list[dict[str, Any]]:
  """Greedy implementation search at the headline case, then the grid with the winner."""
  check(config)
  b = config.benchmark
  rows = []
  host_state = experiment.build(config).init_state()  # the same for every dtype and implementation

  def attempt(mode, dtype, batch_size, impls, stage, batch_dtype='uint8'):
    try:
      row = measure(config, mode, dtype, batch_size, impls, host_state, batch_dtype)
    except Exception as e:  # e.g. out of memory at one batch size: report it, go on
      row = {'framework': 'jax', 'wrapper': mode, 'impl': impl_name(impls), 'dtype': dtype,
             'batch_size': batch_size, 'error': f'{type(e).__name__}: {str(e)[:200]}'}
    row['stage'] = stage
    rows.append(row)
    emit(row)
    return row

  cases = grid(b)
  impls = {field: config.model[field] for field in IMPL_FIELDS}
  best = attempt(*cases[0], impls, 'baseline')
  for field, value in parse_search(b.search):
    if impls[field] == value:
      continue
    trial = attempt(*cases[0], {**impls, field: value}, f'search {field}={value}')
    if 'error' not in trial and ('error' in best or
                                 trial['images_per_second'] > best['images_per_second']):
      best, impls = trial, {**impls, field: value}
  for case in cases[1:]:
    attempt(*case, impls, 'grid')
  if b.get('float_batch_baseline', False):
    attempt(*cases[0], impls, 'float32 batch', 'float32')
  return rows


def summary(rows: Sequence[dict[str, Any]]) -> str:
  """The devices, then the table of all rows (experiments/gpu_report.py adds the ratios)."""
  devices = sorted({f'{r["device"]} x{r["num_devices"]}' for r in rows if 'device' in r})
  return '\n'.join([f'Device: {", ".join(devices) or "unknown"}', '', format_table(rows)])


def define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'configs/benchmark.py')
  flags.DEFINE_string('json', None, 'Append one JSON object per measured row here.')
  flags.DEFINE_string('markdown', None, 'Write the final table here.')
  flags.DEFINE_bool('traffic', False, "Time nothing: print the collectives of --config's compiled "
                    'train step (its parallelism, model_parallel, train.batch_size), with the '
                    "bytes each sends, next to the paper's pattern (--json: one line each).")
  flags.mark_flags_as_required(['config'])


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  from absl import flags
  json_path, markdown = flags.FLAGS.json, flags.FLAGS.markdown
  for path, flag in ((json_path, '--json'), (markdown, '--markdown')):
    if path:
      cli.check_output(path, flag)

  def save(row):
    if json_path:
      with open(json_path, 'a') as f:
        f.write(json.dumps(row) + '\n')

  if flags.FLAGS.traffic:
    found, title = collectives(flags.FLAGS.config)
    for c in found:
      save(dataclasses.asdict(c))
    text = traffic.format_report(found, title)
  else:
    print(format_table([]), flush=True)

    def emit(row):
      print(format_row(row), flush=True)
      save(row)

    text = summary(run(flags.FLAGS.config, emit))
  print('\n' + text, flush=True)
  if markdown:
    with open(markdown, 'w') as f:
      f.write(text + '\n')

if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.benchmark --config=configs/benchmark.py '
          '[--traffic] [--json=FILE] [--markdown=FILE] [--config.FIELD=VALUE ...]')
