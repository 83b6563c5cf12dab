"""The paper's recipe on ILSVRC-2012 (TFDS `imagenet2012`, read from the manual download dir).

    python -m alexnet_jax.main --config=configs/imagenet.py --workdir=runs/imagenet \
        --config.dataset.manual_dir=/data/ilsvrc2012 --config.dataset.data_dir=/data/tfds

`manual_dir` holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; the first run prepares the
TFDS files in `data_dir`, then stores every image once as the paper's central 256x256 square
(§2; `dataset.prepared`, README "Prepared data"), which every later run reads. To do that ahead
of time: python -m alexnet_jax.prepare with the same flags (and no --workdir). Paper §5: batch 128, momentum 0.9, weight decay 5e-4, LR 0.01 divided by
10 when the validation error stops improving (three times in ~90 epochs), N(0, 0.01) init with
biases 1; 224 crops of the 256 image, flips, PCA lighting.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model.num_classes = 1000
  c.model.init_std = 0.01
  c.model.bias_init = 1.0  # the paper's; Caffe needed 0.1 (docs/paper.md: a flat ln(1000) loss)

  # The fastest implementations measured on an H200 (experiments/results/gpu_benchmark.md); the
  # forward output is the same as the plain layers'.
  c.model.pool_impl = 'slices'
  c.model.conv1_impl = 'space_to_depth'

  c.dataset.name = 'imagenet2012'
  c.dataset.image_size = 224
  c.dataset.flip = True
  c.dataset.cache = False
  c.dataset.prepared = True  # 256x256 JPEGs made once (README: "Prepared data")

  c.train.batch_size = 128
  c.train.eval_batch_size = 500
  c.train.num_epochs = 90
  c.train.log_every_steps = 100

  c.optimizer.learning_rate = 0.01
  c.optimizer.plateau.patience = 5
  return c
