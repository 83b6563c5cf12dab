"""Runs a sweep: `python -m alexnet_jax.sweep --config=configs/default.py
--sweep=configs/sweeps/ablation.py --workdir=DIR [--parallel=N] [--seeds=K] [--dry_run]
[--launcher=slurm --slurm_partition=P --slurm_gpus=G ...]`.

Each trial runs as its own `python -m alexnet_jax.main` process in `DIR/<trial name>/`: a local
process, or (`--launcher=slurm`) a SLURM job, `--parallel` of them at a time, whose scripts, logs
and ids are kept in `DIR/slurm/` (a grid sweep is one job array). Running the command again skips
finished trials, re-attaches to trials still queued or running (SLURM jobs, or local trials a
killed controller left running) and resumes the others; failed trials run again only with
`--retry_failed`. One controller runs in a directory at a time (its `lock`). Ctrl-C, SIGTERM or
SIGHUP (a closed terminal) stops it: each local trial saves a checkpoint at its next log step.
`--config.x=y` overrides apply to every trial. Writes `DIR/results.csv`, `DIR/results.md` and
`DIR/sweep.png`; `--dry_run` prints the trial commands instead, one a line. Exits with status 1
unless every trial finished.

`--search=random|tpe --trials=N [--search_seed=S]` draws N trials from the sweep file's search
space, `--early_stop=asha [--min_epochs=R] [--reduction_factor=3]` pauses them at ASHA's rungs and
promotes the best (alexnet_jax/search.py; with SLURM, each start and promotion is a job);
`--dry_run` then prints the first wave's commands.
"""

from __future__ import annotations

import os
import shlex

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli, launchers, trials
from alexnet_jax.errors import ConfigError

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
  flags.DEFINE_boolean('retry_failed', False, 'Run failed trials again (they resume from their '
                       'checkpoints); without it a failed trial stays failed. Interrupted and '
                       'stopped trials always resume.')
  flags.DEFINE_string('search', 'grid', 'grid: every trial of the sweep file; random or tpe: '
                      '--trials draws from its search space (Optuna, seeded by --search_seed).')
  flags.DEFINE_integer('trials', 0, 'Trials a search draws (0 with --search=grid: all).')
  flags.DEFINE_integer('search_seed', 0, 'Seed of the draws: the same seed draws the same configs.')
  flags.DEFINE_string('early_stop', 'none', 'asha: pause trials at rungs of --min_epochs times '
                      'powers of --reduction_factor and promote the best of each rung.')
  flags.DEFINE_integer('min_epochs', 1, 'ASHA: the first rung, in epochs.')
  flags.DEFINE_integer('reduction_factor', 3, 'ASHA: η; the best 1/η of a rung go on.')
  flags.DEFINE_enum('launcher', 'local', ['local', 'slurm'], 'Where trials run: local '
                    'processes, or SLURM jobs (DIR/slurm/: a grid sweep is one job array, each '
                    "start or promotion of a search's trial one job).")
  flags.DEFINE_string('slurm_partition', None, 'SLURM partition of the trial jobs (default: the '
                      "cluster's default partition).")
  flags.DEFINE_integer('slurm_gpus', 0, 'GPUs per trial (each trial is one process on one node).')
  flags.DEFINE_integer('slurm_cpus', 4, 'CPUs per trial (input pipeline threads).')
  flags.DEFINE_float('slurm_mem_gb', 0, "Memory per trial in GB (0: the partition's default).")
  flags.DEFINE_integer('slurm_time', 24 * 60, 'Time limit per trial job in minutes; a trial '
                       'stopped by it resumes when the sweep command runs again.')
  flags.DEFINE_multi_string('slurm_option', [], "More sbatch options for every trial job, as on "
                            "sbatch's command line (--slurm_option=--qos=high); repeatable.")
  flags.DEFINE_float('slurm_retry_minutes', 5, "How long a SLURM command that fails in a way "
                     'that may pass (slurmctld restarting, a timeout, a submit limit) is tried '
                     'again, one line each; then one error line, and the jobs go on.')
  flags.mark_flags_as_required(['config', 'sweep', 'workdir'])


def make_launcher() -> launchers.Launcher:
  """The --launcher the flags ask for: local processes, or SLURM jobs kept in DIR/slurm/."""
  if FLAGS.launcher == 'local':
    return launchers.Local(FLAGS.parallel)
  return launchers.Slurm(os.path.join(FLAGS.workdir, 'slurm'), FLAGS.parallel,
                         launchers.SlurmResources(
                             FLAGS.slurm_partition, FLAGS.slurm_gpus, FLAGS.slurm_cpus,
                             FLAGS.slurm_mem_gb, FLAGS.slurm_time,
                             options=tuple(FLAGS.slurm_option),
                             retry_minutes=FLAGS.slurm_retry_minutes))


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  config_path = config_flags.get_config_filename(FLAGS['config'])
  base_overrides = config_flags.get_override_values(FLAGS['config'])
  if FLAGS.search != 'grid' or FLAGS.early_stop != 'none':
    if FLAGS.seeds != 1:
      raise ConfigError(f'--seeds={FLAGS.seeds} does not combine with a search; put seed in the '
                        f'search space (e.g. choice(0, 1, 2)) instead.')
    from alexnet_jax import search  # Optuna: imported only for searches
    settings = search.Settings(FLAGS.search, FLAGS.trials, FLAGS.search_seed, FLAGS.early_stop,
                               FLAGS.min_epochs, FLAGS.reduction_factor, FLAGS.parallel)
    if not search.run(FLAGS.config, config_path, base_overrides, FLAGS.sweep, FLAGS.workdir,
                      settings, FLAGS.dry_run, None if FLAGS.dry_run else make_launcher(),
                      retry_failed=FLAGS.retry_failed):
      raise SystemExit(1)
    return
  if FLAGS.trials:
    raise ConfigError(f'--trials={FLAGS.trials} needs --search=random or tpe (or --early_stop='
                      f'asha); a grid sweep runs all its trials.')
  trial_list = trials.expand(trials.load_sweep(FLAGS.sweep), FLAGS.seeds, FLAGS.config.seed)
  trials.check_keys(FLAGS.config, trial_list)
  trials.check_values(FLAGS.config, ((f'trial {t.name}', k, v) for t in trial_list
                                     for k, v in t.overrides.items()), config_path, base_overrides)
  if FLAGS.dry_run:
    for trial in trial_list:
      print(shlex.join(trials.command(trial, config_path, FLAGS.workdir, base_overrides)))
    return
  results = trials.run_sweep(trial_list, config_path, FLAGS.workdir, FLAGS.parallel,
                             base_overrides, launcher=make_launcher(),
                             retry_failed=FLAGS.retry_failed)
  if any(r.status != 'done' for r in results):
    raise SystemExit(1)  # the report is written; the status tells scripts that not all finished

if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.sweep --config=FILE --sweep=FILE '
          '--workdir=DIR [--parallel=N] [--seeds=K] [--dry_run] [--retry_failed] '
          '[--search=grid|random|tpe '
          '--trials=N --search_seed=S] [--early_stop=asha --min_epochs=R --reduction_factor=3] '
          '[--launcher=local|slurm --slurm_FLAG=VALUE ...]')
