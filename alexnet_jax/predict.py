"""Top-5 classes of images from a checkpoint: a training workdir or convert_torchvision's output.

    python -m alexnet_jax.predict --checkpoint=runs/torchvision photo.jpg more/*.png

The workdir's `config.json` gives the model and the evaluation preprocessing of its run (shorter
side to round(S·256/224), center S crop, the config's mean/std: torchvision's for imported
weights), `class_names.txt` the names (ImageNet synsets are shown with their words, e.g.
`tench (n01440764)`; a folder data set's are its folder names). Prints, per image, the top
`--top_k` classes with their softmax probabilities.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags, logging
import numpy as np

from alexnet_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program, so that importing the functions defines no flags."""
  flags.DEFINE_string('checkpoint', None, "A workdir: training's, or convert_torchvision's.")
  flags.DEFINE_integer('step', None, 'Its checkpoint to use (default: the newest).')
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')
  flags.mark_flags_as_required(['checkpoint'])


def imagenet_classes() -> dict[str, str]:
  """The 1000 ILSVRC-2012 synsets in label order (TFDS imagenet2012's, torchvision's) and
  their words (torchvision's names)."""
  with open(os.path.join(os.path.dirname(__file__), 'imagenet_classes.tsv')) as f:
    return dict(line.rstrip('\n').split('\t') for line in f)


def readable(names: Sequence[str]) -> list[str]:
  """ImageNet synsets become 'words (synset)'; other names stay as they are."""
  words = imagenet_classes()
  return [f'{words[n]} ({n})' if n in words else n for n in names]


def predict(workdir: str, paths: Sequence[str], step: int | None = None, top_k: int = 5
            ) -> list[list[tuple[str, float]] | str]:
  """For each image, its `top_k` (class name, probability) pairs, most probable first; or, for
  an image that cannot be read or decoded, the one-line reason (the others are still scored)."""
  import jax
  from alexnet_jax import experiment
  from alexnet_jax.preprocess import normalize

  checkpoint = experiment.load(workdir, step, flag='--checkpoint')  # fails before TF when wrong
  from alexnet_jax import input_pipeline  # TensorFlow
  from alexnet_jax.quiet_tf import tf
  model, pre = checkpoint.experiment.model, checkpoint.experiment.pre
  names = checkpoint.class_names
  if names is None or len(names) != model.num_classes:
    logging.warning('%s has no class names for its %d classes; printing class indices.', workdir,
                    model.num_classes)
    names = [f'class {i}' for i in range(model.num_classes)]
  names = readable(names)

  results: list[list[tuple[str, float]] | str] = []
  images = {}
  for i, path in enumerate(paths):
    try:
      with open(path, 'rb') as f:
        images[i] = input_pipeline.eval_image(tf.constant(f.read()), pre).numpy()
      results.append([])
    except OSError as e:
      results.append(f'cannot read image {path}: {e.strerror}.')
    except tf.errors.InvalidArgumentError:
      results.append(f'cannot decode image {path}; pass JPEG, PNG, GIF, BMP or WebP files.')
  probs = jax.jit(lambda p, x: jax.nn.softmax(
      model.apply({'params': p}, normalize(x, pre.mean, pre.std), train=False)))
  good = list(images)
  for start in range(0, len(good), 64):
    chunk = good[start:start + 64]
    batch = np.stack([images[i] for i in chunk])
    for i, p in zip(chunk, np.asarray(probs(checkpoint.params, batch))):
      top = np.argsort(-p, kind='stable')[:top_k]
      results[i] = [(names[j], float(p[j])) for j in top]
  return results


def main(args: list[str]) -> None:
  results = predict(FLAGS.checkpoint, args, FLAGS.step, FLAGS.top_k)
  for path, top in zip(args, results):
    if isinstance(top, str):
      continue
    print(path)
    for name, p in top:
      print(f'  {p:.4f}  {name}')
  sys.stdout.flush()
  failures = [r for r in results if isinstance(r, str)]
  for reason in failures:
    print(f'error: {reason}', file=sys.stderr)
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main, define_flags, 'python -m alexnet_jax.predict --checkpoint=DIR [--step=STEP] '
          '[--top_k=5] IMAGE...', num_args=(1, None))
