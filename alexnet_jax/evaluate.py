"""Evaluates a checkpoint on the validation split: top-1 and top-5 error, 1 or 10 crops.

    python -m alexnet_jax.evaluate --workdir=runs/imagenet --crops=10

Restores the newest checkpoint of `WORKDIR/checkpoints` (or `--checkpoint=STEP`) into the model of
the run's own `WORKDIR/config.json`, scores `dataset.eval_split` with the center crop
(`--crops=1`, exactly what the training loop logs) or the paper's ten crops (`--crops=10`: four
corners and center of the 256 image and their mirrors, softmax averaged, §4.1), prints one line
and writes `WORKDIR/eval_<n>crop.json`, n the crops used.

Mirrors are scored only when the run trained with them (`dataset.flip`): `--crops=10` on a run
trained without flips (the digits demo) scores the five unmirrored crops, says so in the printed
line, and writes eval_5crop.json; every json lists its `crop_names` (and `crops_requested`).
`dataset.eval_resize='torchvision'` (configs/torchvision.py) evaluates torchvision's own center
crop (Resize(256), CenterCrop(224)) and has no ten crops.

A `--config` (with `--config.x=y` overrides) may point at the data elsewhere (`dataset.data_dir`,
`manual_dir`, `path`, `eval_split`) or batch it otherwise; one that would change the model or its
preprocessing is refused, and so is one whose `dataset.flip` differs from the run's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
import ml_collections
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing the functions defines no flags."""
  config_flags.DEFINE_config_file('config', None, "Config file (configs/*.py); default: the run's "
                                  'own config.json.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training directory holding checkpoints/.')
  flags.DEFINE_enum('crops', '1', ['1', '10'], "Center crop, or the paper's 10 crops.")
  flags.DEFINE_integer('checkpoint', None, 'Step to evaluate (default: the newest).')
  flags.mark_flags_as_required(['workdir'])


def evaluate_checkpoint(config: ml_collections.ConfigDict | None, workdir: str, crops: int = 1,
                        step: int | None = None) -> dict[str, Any]:
  """Scores checkpoint `step` (None: the newest) of `workdir`; writes eval_<crops>crop.json.

  `config` None: the run's own config.json; else it may only move the data and its batching
  (`experiment.EVAL_PINNED` says what it may not change).
  """
  import jax
  from alexnet_jax import experiment, steps, workdir as workdir_lib

  checkpoint = experiment.load(workdir, step, config)  # a wrong workdir or step fails before TF
  from alexnet_jax import input_pipeline  # TensorFlow
  exp, config = checkpoint.experiment, checkpoint.experiment.config
  trained_flip = workdir_lib.read_config(workdir).dataset.flip
  if config.dataset.flip != trained_flip:  # it decides whether the ten crops mirror
    raise ConfigError(f'--config has dataset.flip={config.dataset.flip} but {workdir} trained '
                      f'with {trained_flip}; drop the override (it decides the mirrored crops).')
  names = input_pipeline.eval_crop_names(crops, exp.pre)
  builder = input_pipeline.get_builder(config.dataset)
  split = input_pipeline.load_split(builder, config.dataset.eval_split, cache=False,
                                    shard=jax.process_index(), num_shards=jax.process_count())
  if split.num_classes != exp.model.num_classes:
    raise ConfigError(f'{config.dataset.eval_split} of {config.dataset.name} has '
                      f'{split.num_classes} classes but checkpoint {checkpoint.step} of {workdir} '
                      f'{exp.model.num_classes}; evaluate it on the data set it was trained on.')
  # Ten crops make every example ten images: keep a batch's images near eval_batch_size.
  parallel = exp.parallel
  batch_size = max(config.train.eval_batch_size // len(names) // parallel.num_devices, 1)
  batch_size *= parallel.num_devices
  result = steps.evaluate(exp.eval_step, parallel.put_state(checkpoint.params), split, exp.pre,
                          parallel.local_batch_size(batch_size), parallel, crops)
  result = {'step': int(checkpoint.step), 'crops': len(names), 'crops_requested': crops,
            'crop_names': list(names), 'eval_resize': exp.pre.eval_resize,
            'split': config.dataset.eval_split,
            'num_examples': builder.info.splits[config.dataset.eval_split].num_examples, **result}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{len(names)}crop.json'), 'w') as f:
      json.dump(result, f, indent=1)
  return result


def summary(r: dict[str, Any]) -> str:
  """The line the command prints for `evaluate_checkpoint`'s result."""
  unmirrored = (', not mirrored: the run trained without flips'
                if r['crops'] < r['crops_requested'] else '')
  return (f'step {r["step"]} {r["split"]} ({r["num_examples"]} images, {r["crops"]} crop'
          f'{"s" if r["crops"] > 1 else ""}{unmirrored}): top-1 error {r["val_top1_error"]:.4f} '
          f'top-5 error {r["val_top5_error"]:.4f} loss {r["val_loss"]:.4f}')


def main(args: list[str]) -> None:
  del args  # none: cli.run refuses them
  print(summary(evaluate_checkpoint(FLAGS.config, FLAGS.workdir, int(FLAGS.crops),
                                    FLAGS.checkpoint)), flush=True)


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.evaluate --workdir=DIR [--config=FILE] '
          '[--crops=1|10] [--checkpoint=STEP]')
