"""What a closed terminal or a dropped ssh (SIGHUP) leaves a process: standard output and error
on a terminal that is gone, where every write fails (EIO) and would end the process before it
saves or reports. Used by the run's and the controllers' signal handlers."""

from __future__ import annotations

import os
from typing import Sequence


def terminals() -> list[int]:
  """Standard output and error, those of them on a terminal. Ask before the hang-up: a terminal
  that has hung up no longer says it is one."""
  return [fd for fd in (1, 2) if os.isatty(fd)]


def leave(fds: Sequence[int]) -> None:
  """Points `fds` at /dev/null: what they would have shown goes nowhere."""
  if not fds:
    return
  null = os.open(os.devnull, os.O_WRONLY)
  for fd in fds:
    os.dup2(null, fd)
  os.close(null)
