"""Asynchronous successive halving (ASHA, Li et al. 2020) with promotion: rungs and who goes on.

A trial trains to the first rung (r epochs) and pauses there; whenever a slot is free, the best
1/η of a rung's results (by validation error at that rung) that have not gone on yet are promoted
to the next rung: they resume from their checkpoints and train to it. Rungs are r, rη, rη², ...
below the run's last epoch, then the last epoch. Pure functions of the trials' state; the
controller that starts and pauses trials is alexnet_jax/search.py.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from alexnet_jax.errors import ConfigError


def rungs(min_epochs: int, eta: int, max_epochs: int) -> list[int]:
  """The epochs a trial pauses at: [r, rη, rη², ... (< max), max]."""
  if eta < 2:
    raise ConfigError(f'--reduction_factor={eta}; it must be at least 2 (3 keeps the best third '
                      f'of each rung).')
  if not 1 <= min_epochs <= max_epochs:
    raise ConfigError(f'--min_epochs={min_epochs}; it must be between 1 and train.num_epochs='
                      f'{max_epochs}.')
  out = [min_epochs]
  while out[-1] * eta < max_epochs:
    out.append(out[-1] * eta)
  return out + [max_epochs] if out[-1] < max_epochs else out


@dataclasses.dataclass(frozen=True)
class Progress:
  """What ASHA needs of a trial: the epoch it may train to, its validation error at every epoch it
  has evaluated, and whether it is paused there (not running, not failed, not finished)."""
  target: int
  errors: Mapping[int, float]
  paused: bool


def promotion(trials: Mapping[int, Progress], rung_epochs: Sequence[int], eta: int
              ) -> tuple[int, int] | None:
  """(trial, its next rung) for the highest rung that has a trial to promote, else None.

  A rung's results are the trials that reached it (paused there or gone on); its best
  floor(n/η) by error there (ties: lower trial number) are promoted, each once: those among them
  still paused at it are the candidates. A failed trial's results count, as a finished one's.
  """
  for i in reversed(range(len(rung_epochs) - 1)):
    epoch = rung_epochs[i]
    results = sorted((p.errors[epoch], n) for n, p in trials.items() if epoch in p.errors)
    for _, n in results[:len(results) // eta]:
      if trials[n].paused and trials[n].target == epoch:
        return n, rung_epochs[i + 1]
  return None

