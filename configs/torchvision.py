"""torchvision's AlexNet (64-192-384-256-256, no LRN, no towers, 6x6 average pool) on ILSVRC-2012.

Its ImageNet weights (torchvision's IMAGENET1K_V1, `alexnet-owt-7be5be79.pth`: 56.522% / 79.066%
top-1/top-5 accuracy) become a workdir of this config, then evaluate like any run:

    python -m alexnet_jax.convert_torchvision alexnet-owt-7be5be79.pth runs/torchvision
    python -m alexnet_jax.evaluate --config=configs/torchvision.py --workdir=runs/torchvision \
        --config.dataset.manual_dir=/data/ilsvrc2012 --config.dataset.data_dir=/data/tfds

Evaluation is torchvision's (`dataset.eval_resize='torchvision'`, its
`AlexNet_Weights.IMAGENET1K_V1.transforms()`): shorter side to 256 (bilinear, antialiased; the
longer side truncated, e.g. 500x375 -> 341x256), center 224 crop at rounded offsets, mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) for pixels in [0, 1]. It resizes the full
image, so this config reads the data set's own files (`dataset.prepared=False`: a prepared set
holds only the paper's 256 squares) and evaluates center crops only. Training this
variant from scratch (`python -m alexnet_jax.main --config=configs/torchvision.py ...`) uses the
paper's optimiser and augmentation with N(0, 0.01) weights and zero biases (torchvision's recipe
used PyTorch's default init and a step schedule, not reproduced here).
"""

import ml_collections

from alexnet_jax.color_stats import IMAGENET_MEAN, IMAGENET_STD
from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
  c = imagenet.get_config()
  c.model.variant = 'torchvision'
  c.model.lrn = False
  c.model.groups = 1
  c.dataset.mean = IMAGENET_MEAN  # torchvision's normalisation (the defaults already)
  c.dataset.std = IMAGENET_STD
  c.dataset.eval_resize = 'torchvision'
  c.dataset.prepared = False  # torchvision's resize needs the full image
  return c
