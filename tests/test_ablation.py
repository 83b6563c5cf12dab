import math

import pytest

from alexnet_jax import trials
from configs.sweeps import ablation as ablation_sweep
from experiments import ablation


def group(name, top1_errors):
  results = [trials.Result(trials.Trial({'seed': s}, name), 'done', final_val_top1_error=e)
             for s, e in enumerate(top1_errors)]
  return trials.Group(name, results)


def test_change_against_full_model_paired_by_seed():
  full = group('base', [0.02, 0.03, 0.10])
  no_lrn = group('model.lrn=False', [0.03, 0.05, 0.13])  # per-seed differences 1, 2, 3 points
  change, stderr = ablation.difference(no_lrn, full, 'final_val_top1_error')
  assert change == pytest.approx(2.0)
  assert stderr == pytest.approx(1.0 / math.sqrt(3))  # std of (1, 2, 3) is 1
  unpaired = group('x', [0.05, 0.07])  # other seeds: difference of means, SEs combined
  change, stderr = ablation.difference(unpaired, group('base', [0.02, 0.04, 0.03]),
                                       'final_val_top1_error')
  assert change == pytest.approx(3.0)
  assert stderr == pytest.approx(math.sqrt(2 / 2 + 1 / 3))  # variances 2 and 1 (points²)
  assert ablation.verdict(2.0, 0.5, 1.4) == 'holds'
  assert ablation.verdict(-2.0, 0.5, 1.4) == 'reversed'
  assert ablation.verdict(0.5, 0.5, 1.4) == 'not resolved (within 2 SE)'
  assert ablation.verdict(2.0, 0.5, None) == 'hurts'


def test_ablation_sweep_has_the_papers_rows():
  assert list(ablation_sweep.ABLATIONS) == list(ablation.PAPER)
  assert ablation_sweep.get_sweep() == [
      {}, {'model.lrn': False}, {'model.overlapping_pool': False}, {'dataset.lighting': False},
      {'model.dropout_rate': 0.0}, {'model.variant': 'paper_one_gpu', 'model.groups': 1},
      {'model.groups': 1}]
  assert ablation.PAPER['one GPU (half the kernels)'][:2] == (1.7, 1.2)  # §3.2
