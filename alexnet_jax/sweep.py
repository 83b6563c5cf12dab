"""Runs a sweep: `python -m alexnet_jax.sweep --config=configs/default.py
--sweep=configs/sweeps/ablation.py --workdir=DIR [--parallel=N] [--seeds=K] [--dry_run]`.

Each trial runs as its own `python -m alexnet_jax.main` process in `DIR/<trial name>/`; running the
command again skips finished trials and resumes the others. `--config.x=y` overrides apply to every
trial. Writes `DIR/results.csv`, `DIR/results.md` and `DIR/sweep.png`; `--dry_run` prints the
trial commands instead, one a line (for a cluster job array). Exits with status 1 unless every trial
finished.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import trials
from alexnet_jax.errors import ConfigError, parse_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/*.py) with get_sweep().')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory holding one subdirectory per trial.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Trials run at the same time.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per trial; > 1 adds seed=0..K-1 (from the '
                              "config's seed) to every trial and averages over them.")
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Print the trial commands, one a line; run none.')
flags.mark_flags_as_required(['config', 'sweep', 'workdir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  base_overrides = config_flags.get_override_values(flags.FLAGS['config'])
  try:
    trial_list = trials.expand(trials.load_sweep(_SWEEP.value), _SEEDS.value, _CONFIG.value.seed)
    trials.check_keys(_CONFIG.value, trial_list)
    if _DRY_RUN.value:
      for trial in trial_list:
        print(shlex.join(trials.command(trial, config_path, _WORKDIR.value, base_overrides)))
      return
    results = trials.run_sweep(trial_list, config_path, _WORKDIR.value, _PARALLEL.value,
                               base_overrides)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  if any(r.status != 'done' for r in results):
    raise SystemExit(1)  # the report is written; the status tells scripts that not all finished


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
