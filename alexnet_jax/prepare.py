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

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_integer('chunk_size', 1024, 'Images per restart unit: a killed preparation redoes '
                       'at most one chunk.')
  flags.DEFINE_integer('debug_kill_after_chunks', 0, 'Test hook: SIGKILL this process after '
                       'writing this many chunks.')
  flags.mark_flags_as_required(['config'])


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  if FLAGS.chunk_size <= 0:
    raise ConfigError(f'--chunk_size={FLAGS.chunk_size} must be positive.')
  from alexnet_jax import input_pipeline
  from alexnet_jax.datasets import prepared
  config = FLAGS.config.dataset
  config.prepared = True
  builder = input_pipeline.get_builder(config, chunk_size=FLAGS.chunk_size,
                                       kill_after_chunks=FLAGS.debug_kill_after_chunks)
  print(f'Ready: {builder.builder_config.name}, {prepared.disk_bytes(builder) / 2**20:.1f} MiB in '
        f'{builder.data_dir}; train on it with the same config and --config.dataset.prepared=True.')


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.prepare --config=FILE [--chunk_size=N] '
          '[--config.FIELD=VALUE ...]')
