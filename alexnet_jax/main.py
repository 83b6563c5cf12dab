"""Entry point: `python -m alexnet_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line: `--config.train.batch_size=256`.
Running the same command again on the same workdir resumes from its newest checkpoint.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])
# Multi-host: either all three by hand, or --distributed for JAX's cluster auto-detection.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-host runs started by hand).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'jax.distributed.initialize() from the cluster environment (SLURM, '
    'Open MPI, Kubernetes...); not needed with --coordinator_address.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _COORDINATOR.value or _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from alexnet_jax import train  # imported late so --help stays fast
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (errors.ConfigError, errors.TrainingStopped) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)
