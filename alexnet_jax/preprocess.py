"""What a config says images become: the host's crops and lighting draw, the device's arithmetic.

`Preprocess` is read once from `config.dataset` and shared by both sides: the input pipeline
(alexnet_jax/input_pipeline.py, TensorFlow on the host) crops, flips and draws the PCA lighting
shift as uint8 batches; the train and eval steps start with `normalize` on the device. No
TensorFlow here, so the benchmark and the GPU path build a step without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from alexnet_jax.errors import ConfigError

TRAIN_CROPS = ('paper', 'inception')
# How evaluation resizes: 'paper' (the R×R central square of §2, then its center S crop) or
# 'torchvision' (its Resize(R) and CenterCrop(S): the longer side truncated, offsets rounded).
EVAL_RESIZES = ('paper', 'torchvision')


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Everything the per-example maps and the device normalisation need."""

  image_size: int
  flip: bool
  lighting_std: float  # 0 turns PCA lighting off
  eigval: tuple[float, ...]
  eigvec: tuple[tuple[float, ...], ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_crop: str = 'paper'
  eval_resize: str = 'paper'

  @property
  def resize_size(self) -> int:
    return round(self.image_size * 256 / 224)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Preprocess':
    """`config.dataset`; a `pca_stats` file replaces the eigval/eigvec/mean/std fields."""
    if config.train_crop not in TRAIN_CROPS:
      raise ConfigError(f'dataset.train_crop={config.train_crop!r} is unknown; use one of '
                        f'{TRAIN_CROPS}.')
    eval_resize = config.eval_resize
    if eval_resize not in EVAL_RESIZES:
      raise ConfigError(f'dataset.eval_resize={eval_resize!r} is unknown; use one of '
                        f'{EVAL_RESIZES}.')
    stats = (load_statistics(config.pca_stats) if config.pca_stats else
             {k: config[k] for k in ('eigval', 'eigvec', 'mean', 'std')})
    return cls(image_size=config.image_size, flip=config.flip,
               lighting_std=config.lighting_std if config.lighting else 0.0,
               eigval=tuple(stats['eigval']), eigvec=tuple(map(tuple, stats['eigvec'])),
               mean=tuple(stats['mean']), std=tuple(stats['std']), train_crop=config.train_crop,
               eval_resize=eval_resize)


def load_statistics(path: str) -> dict[str, Any]:
  """The eigval/eigvec/mean/std a `python -m alexnet_jax.pca_stats` JSON file holds."""
  if not os.path.exists(path):
    raise ConfigError(f'dataset.pca_stats={path!r} does not exist; write it with '
                      f'`python -m alexnet_jax.pca_stats --output={path}` or unset it.')
  with open(path) as f:
    stats = json.load(f)
  missing = {'eigval', 'eigvec', 'mean', 'std'} - set(stats)
  if missing:
    raise ConfigError(f'dataset.pca_stats={path!r} lacks {sorted(missing)}; regenerate it with '
                      f'python -m alexnet_jax.pca_stats.')
  return stats


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              shift: jax.Array | None = None) -> jax.Array:
  """uint8 pixels [B, ..., 3] → ((pixels / 255 + shift) - mean) / std in float32, as one
  multiply-add; `shift` [B, 3] is each image's PCA lighting shift (§4.1), None for none.

  Floating-point images are taken as already normalised and returned as they are: the
  benchmark's float32-batch step, the baseline the cost of this function is measured against.
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  std = jnp.asarray(std, jnp.float32)
  offset = -jnp.asarray(mean, jnp.float32) / std
  if shift is not None:
    offset = offset + (shift / std).reshape(shift.shape[:1] + (1,) * (images.ndim - 2) + (3,))
  return images.astype(jnp.float32) * (1 / (255 * std)) + offset
