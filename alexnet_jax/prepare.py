"""Prepares a config's data set once in the paper's stored form (§2): every image as the central
R×R square after scaling its shorter side to R = round(S·256/224) (alexnet_jax/datasets/prepared.py).

    python -m alexnet_jax.prepare --config=configs/imagenet.py \
        --config.dataset.manual_dir=/data/ilsvrc2012 --config.dataset.data_dir=/data/tfds
    python -m alexnet_jax.prepare --config=configs/folder.py --config.dataset.path=DIR \
        --config.dataset.prepared_format=raw

Training with `--config.dataset.prepared=True` (configs/imagenet.py's default) does the same on
first use; this command does it ahead of time, on every core, with a progress bar, and prints
where the set is and its size. Killed, it restarts where it stopped when run again.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_CHUNK = flags.DEFINE_integer('chunk_size', 1024, 'Images per restart unit: a killed preparation '
                              'redoes at most one chunk.')
_KILL = flags.DEFINE_integer('debug_kill_after_chunks', 0, 'Test hook: SIGKILL this process after '
                             'writing this many chunks.')
flags.mark_flags_as_required(['config'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if _CHUNK.value <= 0:
    sys.exit(f'error: --chunk_size={_CHUNK.value} must be positive.')
  from alexnet_jax import input_pipeline
  from alexnet_jax.datasets import prepared
  config = _CONFIG.value.dataset
  try:
    config.prepared = True
    builder = input_pipeline.get_builder(config, chunk_size=_CHUNK.value,
                                         kill_after_chunks=_KILL.value)
  except errors.ConfigError as e:
    sys.exit(f'error: {e}')
  print(f'Ready: {builder.builder_config.name}, {prepared.disk_bytes(builder) / 2**20:.1f} MiB in '
        f'{builder.data_dir}; train on it with the same config and --config.dataset.prepared=True.')


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)
