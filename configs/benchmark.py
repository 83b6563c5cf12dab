"""Training-throughput benchmark: the paper model, 224x224, 1000 classes, synthetic data on device.

    python -m alexnet_jax.benchmark --config=configs/benchmark.py --json=bench.jsonl

The model, optimiser and seed are those of configs/imagenet.py; `model.dtype`, `parallelism` and
`train.batch_size` are replaced by each case's. Cases: with `benchmark.grid='one_at_a_time'`, the
headline (the first entry of `modes`, `dtypes` and `batch_sizes`: jit, bfloat16, 256) and then one
axis varied at a time (pmap; float32; batch 128, 512); `'product'` runs every combination.
Batches are uint8 pixels, normalised and lit on the device as in training; then the headline on a
float32 batch normalised on the host (`benchmark.float_batch_baseline`) shows what that costs.

Before the grid, at the headline, `benchmark.search` tries each `FIELD=VALUE` in turn on top of the
fastest implementation so far and keeps it when it is faster (greedy), so the table shows what
each change gave; the grid then runs with the winner. `--config.benchmark.search="()"` skips it.
All implementations give the same forward output (tests/test_models.py). A CPU smoke run:
    python -m alexnet_jax.benchmark --config=configs/benchmark.py --config.dataset.image_size=63 \
        --config.benchmark.batch_sizes="(8,)" --config.benchmark.search="()" \
        --config.benchmark.timed_steps=2
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  c = imagenet.get_config()
  c.dataset.image_size = 224
  # The search starts from the plain layers (imagenet.py already uses the measured winners).
  c.model.group_impl = 'towers'
  c.model.lrn_impl = 'reduce_window'
  c.model.pool_impl = 'reduce_window'
  c.model.conv1_impl = 'plain'

  c.benchmark = ml_collections.ConfigDict()
  c.benchmark.modes = ('jit', 'pmap')  # parallel.Parallel modes
  c.benchmark.dtypes = ('bfloat16', 'float32')  # model.dtype per case
  c.benchmark.batch_sizes = (256, 128, 512)  # global batch per case
  c.benchmark.grid = 'one_at_a_time'  # or 'product'
  # Ordered by the expected gain on a GPU (see README "Benchmarks").
  c.benchmark.search = ('group_impl=grouped', 'lrn_impl=shifted', 'pool_impl=slices',
                        'conv1_impl=space_to_depth', 'lrn_impl=banded', 'group_impl=block')
  c.benchmark.warmup_steps = 3  # after the first (compiling) step
  c.benchmark.timed_steps = 20  # per timed block
  c.benchmark.repeats = 3  # timed blocks; the median gives img/s
  # The headline once more on a float32 batch normalised on the host: the cost of the uint8
  # batches' device-side normalisation and lighting (the last ratio line).
  c.benchmark.float_batch_baseline = True
  return c
