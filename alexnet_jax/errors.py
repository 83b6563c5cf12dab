"""Errors the user can act on. The CLIs print their one-line message and exit non-zero."""

import os
import re
import sys

from absl import flags


class ConfigError(ValueError):
  """A bad input (config value, data set, workdir) detected before any long computation."""


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss with train.on_nonfinite='stop')."""


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing; a bad `--config.x=v` (unknown field, wrong type) or a `--config` file that
  cannot be loaded is one line, not a trace."""
  try:
    rest = flags.FLAGS(argv)
    _check_config_file()
    return rest
  except OSError:  # a --config.x override of a --config file that failed to load
    paths = [arg.split('=', 1)[1] for arg in argv if arg.startswith('--config=')]
    if paths and not os.path.isfile(paths[-1]):
      _missing_config(paths[-1])
    raise
  except SyntaxError as e:  # raised while the --config file is imported
    sys.exit(f'error: --config file {e.filename}, line {e.lineno}: {e.msg}; fix that file.')
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: the override names no config field
    text = str(e).replace('\\', '')
    field = re.search(r"'(\w+)'", text)
    guess = re.search(r'Did you mean "(\w+)"', text)
    sys.exit(f'error: {field.group(1) if field else text!r} is not a config field'
             f'{f" (did you mean {guess.group(1)!r}?)" if guess else ""}; the fields and their '
             f'types are in the --config file.')


def _check_config_file() -> None:
  """ml_collections defers a --config file's load error to the first use of the config."""
  if 'config' not in flags.FLAGS or not flags.FLAGS['config'].present:
    return
  from ml_collections import config_flags
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  if not os.path.isfile(path):
    _missing_config(path)
  try:
    flags.FLAGS['config'].value.get('seed')  # a config that failed to load raises here
  except Exception as e:  # the file's own error, whatever it is
    cause = e.__cause__ or e
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    sys.exit(f'error: --config={path} cannot be loaded ({type(cause).__name__}: {lines[-1]}).')


def _missing_config(path: str) -> None:
  sys.exit(f'error: --config={path} is not a file; pass a config such as configs/default.py.')
