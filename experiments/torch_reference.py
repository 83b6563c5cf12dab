"""The PyTorch side of the speed comparison: the paper's AlexNet, one SGD-momentum step, timed.

    PYTHONPATH=. python experiments/torch_reference.py \
        --cases=eager:float32:256,eager:bfloat16:256,compile:bfloat16:256 --json=torch.jsonl

The same network as `alexnet_jax.models.PAPER` (grouped conv2/4/5, `nn.LocalResponseNorm(5,
alpha=5e-4, beta=0.75, k=2)`, which is the paper's formula since PyTorch divides alpha by n,
overlapping 3x3/2 pooling, dropout 0.5 before fc7 and fc8, conv1 padded by 2 so 224 gives 55),
and the same step: cross-entropy, backward, `torch.optim.SGD(lr=0.01, momentum=0.9,
weight_decay=5e-4)`; channels-last tensors; `bfloat16` is `torch.autocast` (float32 parameters).
`compile` wraps the model in `torch.compile` (default mode). One random batch stays on the device;
the first steps (compilation) are excluded; rows are printed in `alexnet_jax.benchmark`'s table
format and appended to `--json`, so `python experiments/gpu_report.py --rows=...` merges them
with the JAX rows. TF32: PyTorch's defaults are kept (cuDNN convolutions may use TF32, float32
matmuls do not) and recorded in each row; `cudnn.benchmark` is on (XLA autotunes too).
`TorchvisionAlexNet` is torchvision's layout, module for module: what the weight-import tests
and the README's conversion example save and convert.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Sequence

import torch
from absl import app, flags
from torch import nn

from alexnet_jax.benchmark import format_row, format_table, make_row

IMPL = 'nn.Conv2d(groups=2), nn.LocalResponseNorm'

CASES = flags.DEFINE_list('cases', ['eager:float32:256', 'eager:bfloat16:256',
                                    'compile:bfloat16:256'],
                          'MODE:DTYPE:BATCH, MODE in eager/compile, DTYPE in float32/bfloat16.')
IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Input side.')
NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Size of fc8.')
WARMUP = flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps after the first (compiling) one.')
TIMED = flags.DEFINE_integer('timed_steps', 20, 'Steps per timed block.')
REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed blocks; the median gives img/s.')
JSON = flags.DEFINE_string('json', None, 'Append one JSON object per row here.')
CUDNN_BENCHMARK = flags.DEFINE_bool('cudnn_benchmark', True, 'Let cuDNN time its convolution '
                                    'algorithms for these fixed shapes (as XLA autotunes).')


def paper_alexnet(num_classes: int = 1000, image_size: int = 224) -> nn.Module:
  """The paper's AlexNet (§3.5) in PyTorch: 60,965,224 parameters with 1000 classes."""
  lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
  pool = lambda: nn.MaxPool2d(3, 2)
  features = nn.Sequential(
      nn.Conv2d(3, 96, 11, stride=4, padding=2), nn.ReLU(inplace=True), lrn(), pool(),
      nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), lrn(), pool(),
      nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True), pool())
  with torch.no_grad():
    flat = features(torch.zeros(1, 3, image_size, image_size)).numel()
  return nn.Sequential(
      features, nn.Flatten(),
      nn.Linear(flat, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
      nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
      nn.Linear(4096, num_classes))


class TorchvisionAlexNet(nn.Module):
  """torchvision.models.AlexNet, module for module (the same state_dict keys and shapes), for
  tests and examples that have torch but not torchvision: 61,100,840 parameters."""

  def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    self.classifier = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def sync(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def measure(mode: str, dtype: str, batch_size: int, device: torch.device) -> dict[str, Any]:
  torch.manual_seed(0)
  model = paper_alexnet(NUM_CLASSES.value, IMAGE_SIZE.value).to(device)
  model = model.to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  forward = torch.compile(model) if mode == 'compile' else model
  images = torch.randn(batch_size, 3, IMAGE_SIZE.value, IMAGE_SIZE.value, device=device)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, NUM_CLASSES.value, (batch_size,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = nn.functional.cross_entropy(forward(images), labels)
    loss.backward()
    opt.step()
    return loss

  start = time.perf_counter()
  step()
  sync(device)
  compile_s = time.perf_counter() - start
  for _ in range(WARMUP.value):
    step()
  sync(device)
  blocks = []
  for _ in range(REPEATS.value):
    start = time.perf_counter()
    for _ in range(TIMED.value):
      loss = step()
    sync(device)
    blocks.append((time.perf_counter() - start) / TIMED.value)
  macs = forward_macs(model, IMAGE_SIZE.value, device)
  name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
  return make_row(framework='torch', wrapper=mode, impl=IMPL,
                  dtype=dtype, batch_size=batch_size, seconds_per_step=statistics.median(blocks),
                  flop_per_image=6.0 * macs, compile_s=compile_s, device=name, num_devices=1,
                  torch_version=torch.__version__,
                  cudnn_benchmark=torch.backends.cudnn.benchmark,
                  cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                  matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                  image_size=IMAGE_SIZE.value, step_times_ms=[1e3 * t for t in blocks],
                  final_loss=float(loss.detach()))


def forward_macs(model: nn.Module, image_size: int, device: torch.device) -> int:
  """Multiply-adds of one image through the convolutions and linear layers (as the JAX side)."""
  macs = []

  def hook(module, _, output):
    weights = module.weight.numel()
    macs.append(weights * (output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1))

  layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
  handles = [m.register_forward_hook(hook) for m in layers]
  with torch.no_grad():
    model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
  model.train()
  for h in handles:
    h.remove()
  return sum(macs)


def main(argv: Sequence[str]) -> None:
  del argv
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = CUDNN_BENCHMARK.value
  cases = []
  for case in CASES.value:
    mode, dtype, batch = (case.split(':') + ['', '', ''])[:3]
    if (mode not in ('eager', 'compile') or dtype not in ('float32', 'bfloat16')
        or not batch.isdigit()):
      raise app.UsageError(f'--cases entry {case!r} is not MODE:DTYPE:BATCH with MODE eager or '
                           f'compile and DTYPE float32 or bfloat16 (e.g. compile:bfloat16:256).')
    cases.append((mode, dtype, int(batch)))
  print(format_table([]), flush=True)
  for mode, dtype, batch in cases:
    try:
      row = measure(mode, dtype, batch, device)
    except Exception as e:  # e.g. a compiler failure: report it, go on with the other cases
      row = {'framework': 'torch', 'wrapper': mode, 'impl': IMPL, 'dtype': dtype,
             'batch_size': batch, 'error': f'{type(e).__name__}: {str(e)[:200]}'}
    print(format_row(row), flush=True)
    if JSON.value:
      with open(JSON.value, 'a') as f:
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  app.run(main)
