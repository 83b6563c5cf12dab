"""AlexNet from scratch on your own images at 224: DIR/train/<class>/ and DIR/val/<class>/.

    python -m alexnet_jax.main --config=configs/folder.py --workdir=runs/mine \
        --config.dataset.path=DIR

The paper's network, 224 crops of the 256 image, flips, PCA lighting and LR ÷10 on validation
plateaus (§4.1, §5), with an init and learning rate that learn at 224 from a few hundred images
(measured on the 2-class photo folder of experiments/make_photo_folder.py,
experiments/results/folder_from_scratch.md):
  * model.init='he': N(0, 2/fan_in) weights (fc8: 1/fan_in), zero biases: every layer's scale
    follows its fan-in, whatever the input side. The digits demo's N(0, 0.03) with biases 0.1 was
    tuned at 64 px, where fc6 sees a 1x1x256 map instead of 6x6x256: at 224 its first epoch's
    loss is 3.7 (1.7 with 'he') and at the demo's LR 0.01 it went to 677, 3e23, then NaN within
    two epochs. The paper's N(0, 0.01) with biases 1 (§5) can sit at the chance loss for
    thousands of steps (Caffe's reference model lowered the biases to 0.1 for that).
  * learning rate 0.002 at batch 16 (the paper's 0.01 at 128, scaled linearly, is 0.00125): 0.01
    diverged in the third epoch (loss 76, then NaN). A linear warm-up over the first 16 steps
    softens the start (first epoch's loss 1.7 instead of 2.4).
On that folder (2 classes, 64 + 16 500x375 JPEGs each) the validation error is below 10% after
2-3 epochs, and the 20 epochs take about 8 minutes on 2 (shared) CPU cores, start-up included.
20 epochs is short for a medium folder (thousands of images: thousands of steps, hours on a CPU,
minutes on a GPU): raise train.num_epochs there (the paper: ~90); the plateau rule lowers the LR
when validation stops improving. Batch 16 gives small folders many steps per epoch; a larger
batch wants a proportionally larger LR (and more warm-up).

With ImageNet-trained weights at hand, configs/finetune_folder.py needs fewer images and minutes.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  # The digits demo's small-run settings (in-memory cache, plain layers, patience 3), at 224.
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
