"""AlexNet from scratch on your own images at 224: DIR/train/<class>/ and DIR/val/<class>/.

    python -m alexnet_jax.main --config=configs/folder.py --workdir=runs/mine \
        --config.dataset.path=DIR

The paper's network, 224 crops of the 256 image, flips, PCA lighting and LR ÷10 on validation
plateaus (§4.1, §5), with an init and learning rate that learn at 224 from a few hundred images:
  * model.init='he': N(0, 2/fan_in) weights (fc8: 1/fan_in), zero biases. A fixed std does not
    fit every layer: with N(0, 0.03) and biases 0.1 (the digits demo's, tuned at 64 px where fc6
    sees a 1x1x256 map, not 6x6x256) the loss blows up to NaN within 3 epochs; with the paper's
    N(0, 0.01) and biases 1 it stays at chance.
  * learning rate 0.002 at batch 16 (the paper's 0.01 at 128, scaled linearly, is 0.00125),
    reached by a linear warm-up over the first 16 steps: 0.01 diverged in the third epoch on the
    photo folder of experiments/make_photo_folder.py.
On that folder (2 classes, 64 + 16 500x375 JPEGs each) the validation error is below 10% after
2-3 epochs and the 20 epochs end in about 10 minutes on 2 CPU cores
(experiments/results/folder_from_scratch.md). 20 epochs is short for a medium folder (thousands
of images: thousands of steps, hours on a CPU, minutes on a GPU): raise train.num_epochs there
(the paper: ~90); the plateau rule lowers the LR when validation stops improving. Batch 16 keeps
the steps per image high on small folders; a larger batch wants a proportionally larger LR.

With ImageNet-trained weights at hand, configs/finetune_folder.py needs fewer images and minutes.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model.init = 'he'

  c.dataset.name = 'folder'  # dataset.path (DIR) has no default: the run says so if it is unset
  c.dataset.image_size = 224
  c.dataset.flip = True

  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.num_epochs = 20
  c.train.log_every_steps = 8

  c.optimizer.learning_rate = 0.002
  c.optimizer.warmup_steps = 16
  return c
