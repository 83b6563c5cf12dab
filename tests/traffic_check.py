"""The model axis's exchanges in the tiny model's compiled train step on 2 devices (one replica of
the two towers), for the paper's table with one change each; prints JSON
{change: [[kind, where, stage, count], ...]}.

    traffic_check.py   # needs 2 devices

Changes: conv4 reads both towers (an exchange added), conv3 reads only its own (one removed).
See tests/test_traffic.py.
"""

import dataclasses
import json

from alexnet_jax import benchmark, models, traffic
from conftest import tiny_config

CHANGES = {'conv4_reads_both': ('conv4', False), 'conv3_own_tower': ('conv3', True)}


def main():
  config = tiny_config('')
  config.parallelism, config.model_parallel, config.model.num_classes = 'jit', 2, 10
  paper = models.VARIANTS['paper']
  out = {}
  for change, (layer, grouped) in CHANGES.items():
    models.VARIANTS['paper'] = tuple(dataclasses.replace(row, grouped=grouped)
                                     if row.name == layer else row for row in paper)
    found, _ = benchmark.collectives(config)
    out[change] = [[*key, n] for key, n in sorted(traffic.model_axis_exchanges(found).items())]
  models.VARIANTS['paper'] = paper
  print(json.dumps(out))


if __name__ == '__main__':
  main()
