"""Runs a sweep: `python -m alexnet_jax.sweep --config=configs/default.py
--sweep=configs/sweeps/ablation.py --workdir=DIR [--parallel=N] [--seeds=K] [--dry_run]
[--launcher=slurm --slurm_partition=P --slurm_gpus=G ...]`.

Each trial runs as its own `python -m alexnet_jax.main` process in `DIR/<trial name>/`: a local
process, or (`--launcher=slurm`) a job of one SLURM job array per sweep, `--parallel` of them at a
time, whose scripts, logs and ids are kept in `DIR/slurm/`. Running the command again skips
finished trials, re-attaches to trials still queued or running on SLURM and resumes the others.
`--config.x=y` overrides apply to every trial. Writes `DIR/results.csv`, `DIR/results.md` and
`DIR/sweep.png`; `--dry_run` prints the trial commands instead, one a line. Exits with status 1
unless every trial finished.
"""

from __future__ import annotations

import os
import shlex

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli, launchers, trials

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
  flags.DEFINE_enum('launcher', 'local', ['local', 'slurm'], 'Where trials run: local '
                    'processes, or SLURM jobs (one job array per sweep, DIR/slurm/).')
  flags.DEFINE_string('slurm_partition', None, 'SLURM partition of the trial jobs (default: the '
                      "cluster's default partition).")
  flags.DEFINE_integer('slurm_gpus', 0, 'GPUs per trial (each trial is one process on one node).')
  flags.DEFINE_integer('slurm_cpus', 4, 'CPUs per trial (input pipeline threads).')
  flags.DEFINE_float('slurm_mem_gb', 0, "Memory per trial in GB (0: the partition's default).")
  flags.DEFINE_integer('slurm_time', 24 * 60, 'Time limit per trial job in minutes; a trial '
                       'stopped by it resumes when the sweep command runs again.')
  flags.DEFINE_multi_string('slurm_option', [], "More sbatch options for every trial job, as on "
                            "sbatch's command line (--slurm_option=--qos=high); repeatable.")
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
  launcher = None  # local processes
  if FLAGS.launcher == 'slurm':
    launcher = launchers.Slurm(os.path.join(FLAGS.workdir, 'slurm'), FLAGS.parallel,
                               launchers.SlurmResources(
                                   FLAGS.slurm_partition, FLAGS.slurm_gpus, FLAGS.slurm_cpus,
                                   FLAGS.slurm_mem_gb, FLAGS.slurm_time,
                                   options=tuple(FLAGS.slurm_option)))
  results = trials.run_sweep(trial_list, config_path, FLAGS.workdir, FLAGS.parallel,
                             base_overrides, launcher=launcher)
  if any(r.status != 'done' for r in results):
    raise SystemExit(1)  # the report is written; the status tells scripts that not all finished


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.sweep --config=FILE --sweep=FILE '
          '--workdir=DIR [--parallel=N] [--seeds=K] [--dry_run] [--launcher=local|slurm '
          '--slurm_FLAG=VALUE ...]')
