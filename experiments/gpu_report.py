"""The GPU benchmark's table with the ratios its goals are stated in, from saved rows.

    python experiments/gpu_report.py --rows=jax.jsonl,torch.jsonl --markdown=table.md

Rows are what `python -m alexnet_jax.benchmark --json=...` and `experiments/torch_reference.py
--json=...` append; experiments/gpu_benchmark.sh runs all three. The goals (JAX bfloat16 >= 2x
torch.compile, JAX float32 >= 1.5x eager PyTorch float32, device-side normalisation <= 2% of the
step) are the project's, so they live here and not in the library. No TensorFlow is imported.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax.benchmark import summary  # noqa: E402  (after the path)
from alexnet_jax.parallel import MODES  # noqa: E402
from experiments.report_out import emit  # noqa: E402

_ROWS = flags.DEFINE_list('rows', None, 'JSON-lines files of measured rows (JAX and torch).')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Also write the table and ratios here.')


def read_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
  rows = []
  for path in paths:
    if not os.path.exists(path):
      raise app.UsageError(f'--rows: {path} does not exist.')
    with open(path) as f:
      rows.extend(json.loads(line) for line in f if line.strip())
  return rows


def ratios(rows: Sequence[dict[str, Any]], batch_size: int = 256) -> list[str]:
  """The goals' ratios from measured rows; a missing side says 'not measured'."""
  ok = [r for r in rows if 'error' not in r and r['batch_size'] == batch_size]

  def best(framework, dtype, wrapper=None):
    found = [r for r in ok if r['framework'] == framework and r['dtype'] == dtype
             and wrapper in (None, r['wrapper'])]
    return max(found, key=lambda r: r['images_per_second'], default=None)

  def line(what, num, den, den_name, target):
    if num is None or den is None:
      missing = [name for name, row in (('JAX', num), (den_name, den)) if row is None]
      return f'{what}: not measured (no {" and no ".join(missing)} row)'
    ratio = num['images_per_second'] / den['images_per_second']
    return (f'{what}: JAX {num["images_per_second"]:,.0f} img/s ({num["wrapper"]}, {num["impl"]}) '
            f'/ {den_name} {den["images_per_second"]:,.0f} img/s = {ratio:.2f}x (target >= '
            f'{target}x)')

  compiled = best('torch', 'bfloat16', 'compile')
  eager32 = best('torch', 'float32', 'eager')
  out = [line(f'bfloat16 batch {batch_size}, best JAX', best('jax', 'bfloat16'), compiled,
              'torch.compile', 2.0)]
  for wrapper in MODES:
    out.append(line(f'bfloat16 batch {batch_size}, {wrapper}', best('jax', 'bfloat16', wrapper),
                    compiled, 'torch.compile', 2.0))
  out.append(line(f'float32 batch {batch_size}, best JAX', best('jax', 'float32'), eager32,
                  'torch eager float32', 1.5))
  return out + [normalisation_cost(r, rows) for r in rows
                if r.get('stage') == 'float32 batch' and 'error' not in r]


def normalisation_cost(baseline: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
  """What the device-side normalisation and lighting of uint8 batches cost, against the same
  case on an already-normalised float32 batch."""
  key = lambda r: (r['framework'], r['wrapper'], r['impl'], r['dtype'], r['batch_size'])
  same = [r for r in rows if r.get('batch_dtype') == 'uint8' and 'error' not in r
          and key(r) == key(baseline)]
  what = (f'uint8 batch normalised and lit on the device ({baseline["wrapper"]}, '
          f'{baseline["dtype"]}, batch {baseline["batch_size"]})')
  if not same:
    return f'{what}: not measured (no uint8 row of that case)'
  u, f = same[-1]['images_per_second'], baseline['images_per_second']
  return (f'{what}: {u:,.0f} img/s vs {f:,.0f} img/s on a float32 batch normalised on the host: '
          f'{100 * (f - u) / f:.1f}% of the step (goal <= 2%)')


def report(rows: Sequence[dict[str, Any]]) -> str:
  """The devices and table of all rows, then the goals' ratios."""
  return '\n'.join([summary(rows), '', *ratios(rows)])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; give the files as --rows=A,B.')
  if not _ROWS.value:
    raise app.UsageError('give --rows=FILE[,FILE...] (JSON-lines rows of the benchmarks).')
  emit(report(read_rows(_ROWS.value)), _MARKDOWN.value)


if __name__ == '__main__':
  app.run(main)
