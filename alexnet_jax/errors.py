"""Errors the user can act on. The CLIs print their one-line message and exit non-zero."""

import re
import sys

from absl import flags


class ConfigError(ValueError):
  """A bad input (config value, data set, workdir) detected before any long computation."""


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss with train.on_nonfinite='stop')."""


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing; a bad `--config.x=v` (unknown field, wrong type) is one line, not a trace."""
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
