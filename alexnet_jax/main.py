"""Entry point: `python -m alexnet_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line: `--config.train.batch_size=256`.
Running the same command again on the same workdir resumes from its newest checkpoint.
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from alexnet_jax import train  # imported late so --help stays fast
  from alexnet_jax.errors import ConfigError, TrainingStopped
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, TrainingStopped) as e:
    sys.exit(f'error: {e}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with a bad `--config.x=v` (unknown field, wrong type) as one line, not a trace."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: the override names no config field
    text = str(e).replace('\\', '')
    field = re.search(r"'(\w+)'", text)
    guess = re.search(r'Did you mean "(\w+)"', text)
    sys.exit(f'error: {field.group(1) if field else text!r} is not a config field'
             f'{f" (did you mean {guess.group(1)!r}?)" if guess else ""}; the fields and their '
             f'types are in the --config file.')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
