"""Fine-tunes an ImageNet-trained AlexNet on your own images: new fc8, frozen convolutions.

    python -m alexnet_jax.convert_torchvision alexnet-owt-7be5be79.pth runs/torchvision
    python -m alexnet_jax.main --config=configs/finetune_folder.py --workdir=runs/finetune \
        --config.dataset.path=DIR
    python -m alexnet_jax.predict --checkpoint=runs/finetune DIR/val/*/*.jpg

DIR holds train/<class>/ and val/<class>/ images (see the folder data set in the README). The
parameters come from `init.checkpoint` (default: the converted torchvision weights above; any
training workdir works, with the model fields of its run, e.g. `--config.model.variant=paper
--config.model.lrn=True --config.model.groups=2` for ours); fc8 is initialised afresh for the
folder's classes; conv1-conv5 stay frozen (`--config.optimizer.frozen_layers="()"` trains them
too) while fc6-fc8 train with SGD at a tenth of the paper's learning rate.
"""

import ml_collections

from configs import torchvision


def get_config() -> ml_collections.ConfigDict:
  c = torchvision.get_config()
  c.model.num_classes = -1  # the folder's

  c.init.checkpoint = 'runs/torchvision'
  c.init.reinit = ('fc8',)
  c.optimizer.frozen_layers = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')

  c.dataset.name = 'folder'
  c.dataset.cache = True

  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.num_epochs = 10
  c.train.log_every_steps = 10

  c.optimizer.learning_rate = 0.001
  c.optimizer.plateau.patience = 2
  return c
