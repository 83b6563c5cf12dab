"""Entry point: `python -m alexnet_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line: `--config.train.batch_size=256`.
Running the same command again on the same workdir resumes from its newest checkpoint.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
  flags.mark_flags_as_required(['config', 'workdir'])
  # Multi-host: either all three by hand, or --distributed for JAX's cluster auto-detection.
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 (multi-host runs started by hand).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')
  flags.DEFINE_bool(
      'distributed', False, 'jax.distributed.initialize() from the cluster environment (SLURM, '
      'Open MPI, Kubernetes...); not needed with --coordinator_address.')
  flags.DEFINE_integer('initialization_timeout', 300, 'Multi-host: seconds to wait for every '
                       'process to join before giving up.')
  flags.DEFINE_integer('heartbeat_timeout', 100, 'Multi-host: seconds without a heartbeat after '
                       'which a process counts as dead and the run ends.')


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  from alexnet_jax import cluster, train  # imported late so --help stays fast
  cluster.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                FLAGS.distributed, FLAGS.initialization_timeout, FLAGS.heartbeat_timeout)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Exception:
    cluster.check_peers()  # another process gone: its line instead (this error came of it)
    raise


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.main --config=FILE --workdir=DIR '
          '[--config.FIELD=VALUE ...]')
