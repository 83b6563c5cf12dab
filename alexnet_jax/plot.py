"""Plots runs: `python -m alexnet_jax.plot DIR [DIR ...] [--out=FILE.png]`.

Training loss, validation top-1/top-5 error and the learning rate (plateau drops marked with
triangles) against epochs, from each DIR/metrics.jsonl, all runs overlaid. A sweep's directory
(`python -m alexnet_jax.sweep --workdir=DIR`) stands for its trials, each labelled by its name.
Writes `--out` (default: DIR/curves.png of the first DIR). `--workdir=DIR` names runs too.
"""

from __future__ import annotations

import os

from absl import flags

from alexnet_jax import cli, curves

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  flags.DEFINE_multi_string('workdir', [], 'Run directories (as the positional DIRs; repeatable).')
  flags.DEFINE_string('out', None, 'PNG to write; default DIR/curves.png of the first DIR.')


def main(args: list[str]) -> None:
  workdirs = FLAGS.workdir + args
  if not workdirs:
    raise cli.UsageError('give the run directories to plot')
  runs = curves.read_runs(workdirs)
  out = FLAGS.out or os.path.join(workdirs[0], 'curves.png')
  cli.check_output(out, '--out')
  curves.save(curves.plot_runs(runs), out)
  print(f'wrote {out}')


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.plot DIR [DIR ...] [--out=FILE.png]',
          num_args=(0, None))
