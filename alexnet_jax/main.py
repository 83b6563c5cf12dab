"""Entry point: `python -m alexnet_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line: `--config.train.batch_size=256`.
Running the same command again on the same workdir resumes from its newest checkpoint. SIGINT,
SIGTERM and SIGHUP stop the run (alexnet_jax/workdir.py's StopSignal): at its next log step with
a checkpoint once training has started, else at once; either way it says so and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax.errors import STOPPED

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
  from alexnet_jax import workdir  # light (no JAX yet): the signals are handled from here on
  with workdir.StopSignal() as signals:
    try:
      # Imported late so --help stays fast; TensorFlow (input_pipeline) too, so that a signal
      # held until these imports are over stops the run here.
      from alexnet_jax import cluster, input_pipeline, train  # noqa: F401
      signals.check()
      cluster.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                    FLAGS.distributed, FLAGS.initialization_timeout, FLAGS.heartbeat_timeout)
      try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, signals=signals)
      except Exception:
        cluster.check_peers()  # another process gone: its line instead (this error came of it)
        raise
    except BaseException:  # a Stopped, or what code it interrupted made of it
      if signals.early is None:
        raise
      # Whatever the run had taken (lock, files) was released on the way here.
      print(f'{STOPPED}{signal.Signals(signals.early).name} before training started; run the '
            f'same command to start.', flush=True)
      sys.stderr.flush()
      # Leave now: tearing down a TensorFlow or XLA stopped half-way through starting can crash
      # (SIGSEGV at exit, seen in experiments/soak_search.py), and nothing is left to save.
      os._exit(0)


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.main --config=FILE --workdir=DIR '
          '[--config.FIELD=VALUE ...]')
