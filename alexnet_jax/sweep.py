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

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli, trials

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/*.py) with get_sweep().')
  flags.DEFINE_string('workdir', None, 'Directory holding one subdirectory per trial.')
  flags.DEFINE_integer('parallel', 1, 'Trials run at the same time.')
  flags.DEFINE_integer('seeds', 1, 'Seeds per trial; > 1 adds seed=0..K-1 (from the '
                       "config's seed) to every trial and averages over them.")
  flags.DEFINE_boolean('dry_run', False, 'Print the trial commands, one a line; run none.')
  flags.mark_flags_as_required(['config', 'sweep', 'workdir'])


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  config_path = config_flags.get_config_filename(FLAGS['config'])
  base_overrides = config_flags.get_override_values(FLAGS['config'])
  trial_list = trials.expand(trials.load_sweep(FLAGS.sweep), FLAGS.seeds, FLAGS.config.seed)
  trials.check_keys(FLAGS.config, trial_list)
  if FLAGS.dry_run:
    for trial in trial_list:
      print(shlex.join(trials.command(trial, config_path, FLAGS.workdir, base_overrides)))
    return
  results = trials.run_sweep(trial_list, config_path, FLAGS.workdir, FLAGS.parallel,
                             base_overrides)
  if any(r.status != 'done' for r in results):
    raise SystemExit(1)  # the report is written; the status tells scripts that not all finished


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.sweep --config=FILE --sweep=FILE '
          '--workdir=DIR [--parallel=N] [--seeds=K] [--dry_run]')
