import math

import pytest

from alexnet_jax import trials
from configs.sweeps import ablation as ablation_sweep
from experiments import ablation


def group(name, top1_errors):
  results = [trials.Result(trials.Trial({'seed': s}, name), 'done', final_val_top1_error=e)
             for s, e in enumerate(top1_errors)]
  return trials.Group(name, results)


def test_change_against_full_model_with_its_standard_error():
  full = group('base', [0.02, 0.03, 0.04])  # mean 3%, std 1%
  no_lrn = group('model.lrn=False', [0.05, 0.07, 0.09])  # mean 7%, std 2%
  change, stderr = ablation.difference(no_lrn, full, 'final_val_top1_error')
  assert change == pytest.approx(4.0)
  assert stderr == pytest.approx(math.sqrt(2 ** 2 / 3 + 1 ** 2 / 3))
  assert ablation.verdict(change, stderr, 1.4) == 'holds'
  assert ablation.verdict(-change, stderr, 1.4) == 'reversed'
  assert ablation.verdict(0.5, stderr, 1.4) == 'not resolved (within 2 SE)'
  assert ablation.verdict(change, stderr, None) == 'hurts'


def test_ablation_sweep_has_the_papers_rows():
  assert list(ablation_sweep.ABLATIONS) == list(ablation.PAPER)
  assert ablation_sweep.get_sweep() == [
      {}, {'model.lrn': False}, {'model.overlapping_pool': False}, {'dataset.lighting': False},
      {'model.dropout_rate': 0.0}, {'model.groups': 1}]
