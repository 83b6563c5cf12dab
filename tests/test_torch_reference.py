"""The PyTorch side of the speed comparison must be the same network as ours."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch

from alexnet_jax import layers, models
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import torch_reference  # noqa: E402


def test_same_parameters_and_multiply_adds_as_the_jax_model():
  net = torch_reference.paper_alexnet()
  assert sum(p.numel() for p in net.parameters()) == 60_965_224
  assert torch_reference.forward_macs(net, 224, torch.device('cpu')) == (
      models.forward_macs(models.AlexNet(), 224))


def test_torch_lrn_constants_are_the_papers_formula():
  a = np.random.default_rng(0).normal(scale=30.0, size=(2, 5, 6, 16)).astype(np.float32)
  ours = layers.local_response_norm(jnp.asarray(a))
  theirs = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(
      torch.from_numpy(a).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


def test_cli_times_a_step(tmp_path):
  rows = tmp_path / 'rows.jsonl'
  out = subprocess.run(
      [sys.executable, 'experiments/torch_reference.py', '--image_size=63', '--num_classes=10',
       '--cases=eager:float32:2', '--warmup_steps=0', '--timed_steps=1', '--repeats=1',
       f'--json={rows}'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  (row,) = [json.loads(line) for line in open(rows)]
  assert (row['framework'], row['wrapper'], row['dtype'], row['batch_size']) == (
      'torch', 'eager', 'float32', 2)
  assert row['images_per_second'] > 0 and np.isfinite(row['final_loss'])
  assert '| torch | eager |' in out.stdout
