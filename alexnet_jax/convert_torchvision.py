"""Imports a torchvision AlexNet state_dict (e.g. its ImageNet weights) as a workdir of our model.

    python -m alexnet_jax.convert_torchvision alexnet-owt-7be5be79.pth runs/torchvision

reads PATH (`.pth`/`.pt` with `torch.load(weights_only=True)`, or `.safetensors`) and writes OUTDIR
as a run of `--config` (default `configs/torchvision.py`, `model.num_classes` set to the weights')
stopped at step 0: `OUTDIR/checkpoints/0/` (the train state: these parameters, zero momentum),
`config.json` and, for 1000 classes, ImageNet's synsets in `class_names.txt`. So `evaluate`,
`predict`, fine-tuning (`--config.init.checkpoint=OUTDIR`) and resumed training all read it.

The layouts differ in three ways, each handled explicitly in `convert_state_dict`:
  conv weights   torch (out, in, kh, kw) -> ours (kh, kw, in, out)   (OIHW -> HWIO)
  linear weights torch (out, in)         -> ours (in, out)
  fc6's inputs   torch flattens conv5's 6x6x256 map as (C, H, W), we as (H, W, C): fc6's rows
                 are permuted accordingly.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from absl import flags
import ml_collections
import numpy as np
from ml_collections import config_flags

from alexnet_jax import cli, models, predict
from alexnet_jax.errors import ConfigError

# Our layer -> torchvision's module (AlexNet.features / AlexNet.classifier indices).
TORCH_MODULES = {'conv1': 'features.0', 'conv2': 'features.3', 'conv3': 'features.6',
                 'conv4': 'features.8', 'conv5': 'features.10', 'fc6': 'classifier.1',
                 'fc7': 'classifier.4', 'fc8': 'classifier.6'}


def torch_shape(layer: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of our parameter `layer.name` of `shape`."""
  if name == 'bias':
    return shape
  if layer.startswith('conv'):
    kh, kw, cin, cout = shape
    return cout, cin, kh, kw
  return shape[::-1]


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """torchvision AlexNet state_dict (tensors or arrays) -> our `model.variant='torchvision'`
  parameters (float32 numpy), for as many classes as its last layer has."""
  arrays = {k: _numpy(v) for k, v in state_dict.items()}
  if arrays and all(k.startswith('module.') for k in arrays):  # saved from nn.DataParallel
    arrays = {k[len('module.'):]: v for k, v in arrays.items()}
  fc8 = f'{TORCH_MODULES["fc8"]}.weight'
  if fc8 not in arrays or arrays[fc8].ndim != 2:
    raise ConfigError(f'the state_dict has no 2-D {fc8!r} (fc8\'s weight); it is not a '
                      f'torchvision AlexNet.')
  num_classes = arrays[fc8].shape[0]
  model = models.AlexNet(num_classes=num_classes, variant='torchvision', lrn=False, groups=1)
  ours = models.abstract_params(model, models.min_image_size(model))  # any side: 6x6 pool
  expected = {f'{TORCH_MODULES[layer]}.{"weight" if name == "kernel" else name}':
              (layer, name, torch_shape(layer, name, p.shape))
              for layer, group in ours.items() for name, p in group.items()}
  for key in arrays:
    if key not in expected:
      raise ConfigError(f'the state_dict has an unexpected key {key!r}; a torchvision AlexNet '
                        f'has exactly {sorted(expected)}.')
  params: dict[str, dict[str, np.ndarray]] = {}
  for key, (layer, name, shape) in expected.items():
    if key not in arrays:
      raise ConfigError(f'the state_dict lacks {key!r} ({layer}\'s {name}); it is not a complete '
                        f'torchvision AlexNet.')
    value = arrays[key]
    if value.shape != shape:
      raise ConfigError(f'{key!r} has shape {value.shape}, but torchvision\'s AlexNet {layer} '
                        f'{name} is {shape}.')
    params.setdefault(layer, {})[name] = _to_ours(layer, name, value)
  return params


def _to_ours(layer: str, name: str, value: np.ndarray) -> np.ndarray:
  if name == 'bias':
    return value
  if layer.startswith('conv'):
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if layer == 'fc6':  # inputs (C, H, W) -> (H, W, C), then (out, in) -> (in, out)
    side = models.TORCHVISION_POOL
    value = value.reshape(value.shape[0], -1, side, side).transpose(0, 2, 3, 1)
    value = value.reshape(value.shape[0], -1)
  return value.T


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor (float16/bfloat16 have no numpy view)
    value = value.detach().cpu().float().numpy()
  return np.ascontiguousarray(value, dtype=np.float32)


def load_state_dict(path: str) -> Mapping[str, Any]:
  """A state_dict from `.safetensors` or a torch file (`torch.load(weights_only=True)`)."""
  if not os.path.isfile(path):
    raise ConfigError(f'{path} does not exist; pass a torchvision AlexNet state_dict (.pth or '
                      f'.safetensors).')
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file
      loaded = load_file(path)
    else:
      import torch
      loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # corrupt files, or objects weights_only refuses to unpickle
    reason = str(e).strip().splitlines()[0][:200]
    raise ConfigError(f'cannot read {path} as a state_dict ({reason}); save one with '
                      f'torch.save(model.state_dict(), path).') from None
  others = ([k for k, v in loaded.items() if not hasattr(v, 'shape')]
            if isinstance(loaded, Mapping) else [type(loaded).__name__])
  if others:
    raise ConfigError(f'{path} is not a state_dict (it holds {others[0]!r}, not a tensor); save '
                      f'the model\'s weights alone with torch.save(model.state_dict(), path).')
  return loaded


def write_workdir(params: Mapping[str, Any], outdir: str, config: ml_collections.ConfigDict,
                  class_names: Sequence[str] | None = None) -> None:
  """Writes `params` as step 0 of a run of `config` in `outdir` (see the module docstring)."""
  from alexnet_jax import checkpoints, experiment, workdir as workdir_lib
  workdir_lib.check_dir(outdir, 'OUTDIR')
  if os.path.isdir(os.path.join(outdir, 'checkpoints')) and os.listdir(
      os.path.join(outdir, 'checkpoints')):
    raise ConfigError(f'{outdir} already holds checkpoints; convert into a new directory.')
  if config.model.variant != 'torchvision':
    raise ConfigError(f'--config has model.variant={config.model.variant!r}; torchvision weights '
                      f'need model.variant=torchvision (configs/torchvision.py).')
  num_classes = params['fc8']['bias'].shape[0]
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.model.num_classes = num_classes
  exp = experiment.build(config)
  if class_names is not None and len(class_names) != num_classes:
    raise ConfigError(f'{len(class_names)} class names for {num_classes} classes; give one name '
                      f'per class, in label order.')
  checkpoints.check_param_shapes(params, models.abstract_params(exp.model, exp.pre.image_size),
                                 'the converted weights', 'convert a torchvision AlexNet state_dict')
  state = exp.init_state(params=dict(params))
  workdir_lib.write_config(outdir, config)
  if class_names is not None:
    workdir_lib.write_class_names(outdir, class_names)
  manager = checkpoints.make_manager(outdir)
  checkpoints.save(manager, 0, state)
  manager.close()


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing the functions defines no flags."""
  config_flags.DEFINE_config_file('config', 'configs/torchvision.py',
                                  'Config the written workdir is a run of.', lock_config=True)
  flags.DEFINE_string('class_names', None, 'A file with one class name a line, in label order '
                      '(default: ImageNet synsets when there are 1000 classes).')


def main(args: list[str]) -> None:
  path, outdir = args
  names = None
  if FLAGS.class_names:  # read before the weights: a wrong path fails at once
    try:
      with open(FLAGS.class_names) as f:
        names = f.read().splitlines()
    except OSError as e:
      raise ConfigError(f'--class_names={FLAGS.class_names} cannot be read ({e.strerror}); pass a '
                        f'file with one class name a line.') from None
  params = convert_state_dict(load_state_dict(path))
  num_classes = params['fc8']['bias'].shape[0]
  if names is None and num_classes == 1000:
    names = list(predict.imagenet_classes())  # ImageNet's synsets, in label order
  write_workdir(params, outdir, FLAGS.config, names)
  print(f'{path}: torchvision AlexNet, {num_classes} classes, '
        f'{models.count_params(params):,} parameters -> {outdir} (step 0)'
        f'{"" if names else "; no class names (pass --class_names=FILE)"}')


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.convert_torchvision PATH OUTDIR '
          '[--config=configs/torchvision.py] [--class_names=FILE]', num_args=(2, 2))
