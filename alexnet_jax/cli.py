"""The one shape of every `python -m alexnet_jax.X` command.

A CLI module defines `define_flags()` (called only when it runs as a program, so that importing
the module defines no flags) and `main(args)`, which receives the positional arguments, and ends
with `cli.run(main, define_flags, usage)`. Every mistake a user can fix is one line on stderr,
`error: <what is wrong and how to fix it>`, and exit status 1; never a traceback, never absl's
help dump: an ill-typed flag value, a `--config` file that cannot be loaded, a `--config.x`
naming no field or a tuple field given as `a,b`, a `ConfigError` or `TrainingStopped` raised by
`main` (an `Interrupted` is the same line with exit status 75: alexnet_jax/errors.py; a Ctrl-C
before `main` handles signals itself, a `Stopped by SIGINT` line and 130); a command line of the
wrong shape (an unknown flag, a required one missing, the wrong number of positional arguments,
a `UsageError` from `main`) adds `; usage: <usage>`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags, logging

from alexnet_jax.errors import (EXIT_INTERRUPTED, STOPPED, ConfigError, Interrupted,
                                TrainingStopped)


class UsageError(ConfigError):
  """The command line does not have the command's shape; printed with the usage line."""


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None], usage: str,
        num_args: tuple[int, int | None] = (0, 0)) -> None:
  """Runs `main(positional arguments)` as the program. `usage` is the one-line synopsis
  (`python -m alexnet_jax.X --flag=VALUE ARG...`); `num_args` the fewest and most positional
  arguments (None: no limit)."""
  # Before anything imports TensorFlow: its INFO lines while running are not for the user (those
  # it prints at start-up, whatever this says, alexnet_jax/quiet_tf.py drops); its warnings and
  # errors still show.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

  def parse(argv: list[str]) -> list[str]:
    args = parse_flags(argv, usage, define_flags)[1:]
    low, high = num_args
    if high is not None and len(args) > high:
      _usage_error(f'unexpected argument{"s" if len(args) - high > 1 else ""} '
                   f'{" ".join(args[high:])}', usage)
    if len(args) < low:
      _usage_error(f'{len(args) or "no"} argument{"" if len(args) == 1 else "s"} given, '
                   f'{low if low == high else f"at least {low}"} needed', usage)
    return argv[:1] + args

  def program(argv: list[str]) -> None:
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      main(argv[1:])
    except UsageError as e:
      _usage_error(str(e), usage)
    except (ConfigError, TrainingStopped) as e:
      sys.exit(f'error: {e}')
    except Interrupted as e:  # not the config's fault: the same command resumes (errors.py)
      print(f'error: {e}', file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # Ctrl-C before the command handles signals itself: nothing begun
      print(f'{STOPPED}SIGINT before it began; run the same command to start.', file=sys.stderr)
      sys.exit(130)  # the shell's status for a command that SIGINT ended

  app.run(program, flags_parser=parse)


def check_output(path: str, flag: str) -> None:
  """A file the command writes when its work is done: a folder that does not exist fails now."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ConfigError(f'{flag}={path}: there is no directory {folder}; create it first.')


def _usage_error(what: str, usage: str) -> NoReturn:
  sys.exit(f'error: {what.rstrip(".")}; usage: {usage}')


def parse_flags(argv: list[str], usage: str, define_flags: Callable[[], None]) -> list[str]:
  """Defines the flags and parses `argv`; a bad flag, a bad `--config.x=v` (unknown field, wrong
  type) or a `--config` file that cannot be loaded is one line, not a trace. (ml_collections
  applies `--config.x` overrides of a default --config file while the flag is defined.)"""
  try:
    define_flags()
    rest = flags.FLAGS(argv)
    _check_config_file()
    _check_tuples(argv)
    return rest
  except OSError:  # a --config.x override of a --config file that failed to load
    paths = [arg.split('=', 1)[1] for arg in argv if arg.startswith('--config=')]
    if paths and not os.path.isfile(paths[-1]):
      _missing_config(paths[-1])
    raise
  except SyntaxError as e:  # raised while the --config file is imported
    sys.exit(f'error: --config file {e.filename}, line {e.lineno}: {e.msg}; fix that file.')
  except flags.Error as e:  # the usage line for the command's shape; a bad value is enough alone
    required = re.fullmatch(r'flag --(\w+)=None: Flag --\1 must have a value other than None\.',
                            str(e))
    if required:
      _usage_error(f'--{required.group(1)} is required', usage)
    if isinstance(e, flags.UnrecognizedFlagError):
      _usage_error(str(e), usage)
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: the override names no config field
    text = str(e).replace('\\', '')
    field = re.search(r"'(\w+)'", text)
    guess = re.search(r'Did you mean "(\w+)"', text)
    sys.exit(f'error: {field.group(1) if field else text!r} is not a config field'
             f'{f" (did you mean {guess.group(1)!r}?)" if guess else ""}; the fields and their '
             f'types are in the --config file.')


def _has_config() -> bool:
  """Whether there is a --config flag with a file: given, or its default."""
  return 'config' in flags.FLAGS and (flags.FLAGS['config'].present or
                                      flags.FLAGS['config'].default is not None)


def _check_config_file() -> None:
  """ml_collections defers a --config file's load error to the first use of the config."""
  if not _has_config():
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


def _check_tuples(argv: list[str]) -> None:
  """`--config.x=a,b` on a tuple field is not a tuple literal: ml_collections makes it the
  one-string tuple ('a,b',), which fails far from the command line, or not at all."""
  if not _has_config():
    return
  from ml_collections import config_flags
  for path, value in config_flags.get_override_values(flags.FLAGS['config']).items():
    given = [arg.split('=', 1)[1] for arg in argv if arg.startswith(f'--config.{path}=')]
    if given and ',' in given[-1] and value == (given[-1],):
      items = [repr(item.strip()) for item in given[-1].split(',') if item.strip()]
      sys.exit(f'error: --config.{path}={given[-1]} is one string, not a tuple; write the tuple '
               f'as --config.{path}="({",".join(items)}{"," if len(items) == 1 else ""})".')


def _missing_config(path: str) -> NoReturn:
  sys.exit(f'error: --config={path} is not a file; pass a config such as configs/default.py.')
