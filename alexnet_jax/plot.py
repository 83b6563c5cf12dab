"""Plots runs: `python -m alexnet_jax.plot --workdir=DIR [DIR ...] [--out=FILE.png]`.

Training loss, validation top-1/top-5 error and the learning rate (plateau drops marked with
triangles) against epochs, from each DIR/metrics.jsonl, all runs overlaid. Writes
`--out` (default: DIR/curves.png of the first DIR).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

from alexnet_jax import curves
from alexnet_jax.errors import ConfigError, parse_flags

_WORKDIR = flags.DEFINE_multi_string('workdir', None, 'Run directories (repeat the flag, or list '
                                     'more directories after the first).')
_OUT = flags.DEFINE_string('out', None, 'PNG to write; default DIR/curves.png of the first run.')
flags.mark_flags_as_required(['workdir'])


def main(argv: Sequence[str]) -> None:
  workdirs = _WORKDIR.value + list(argv[1:])
  try:
    runs = [curves.read_run(w) for w in workdirs]
  except ConfigError as e:
    sys.exit(f'error: {e}')
  out = _OUT.value or os.path.join(workdirs[0], 'curves.png')
  curves.save(curves.plot_runs(runs), out)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
