"""The paper's recipe on ILSVRC-2012 (TFDS `imagenet2012`, read from the manual download dir).

    python -m alexnet_jax.main --config=configs/imagenet.py --workdir=runs/imagenet \
        --config.dataset.manual_dir=/data/ilsvrc2012 --config.dataset.data_dir=/data/tfds

`manual_dir` holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; the first run prepares the
TFDS files in `data_dir`, then stores every image once as the paper's central 256x256 square
(§2; `dataset.prepared`, README "Prepared data"), which every later run reads. To do that ahead
of time: python -m alexnet_jax.prepare with the same flags (and no --workdir). Paper §5: batch
128, momentum 0.9, weight decay 5e-4, LR 0.01 divided by 10 when the validation error stops
improving (three times in ~90 epochs), N(0, 0.01) init with biases 1; 224 crops of the 256 image,
flips, PCA lighting.

This is the base of every other config: it defines every field, and the others override some.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from alexnet_jax.color_stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.parallelism = 'pmap'  # 'pmap' or 'jit' (Mesh + NamedSharding + shard_map)
  # Devices per model replica (jit only): 1, or model.groups, each device running one tower and
  # exchanging maps only where the paper's two GPUs did (§3.2, README.md "The paper's two GPUs").
  # The batch splits over the replicas.
  c.model_parallel = 1

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'paper'  # 'paper', 'paper_one_gpu' (§3.2's one-GPU net), 'torchvision'
  c.model.num_classes = 1000  # -1: the data set's number of classes
  c.model.lrn = True  # §3.3
  # LRN within each tower, as each GPU normalised its own maps (§3.3; cuda-convnet's rnorm1a/b)
  c.model.lrn_scope = 'tower'  # or 'all': across the towers (what runs before this field did)
  c.model.overlapping_pool = True  # 3x3 stride 2 (§3.4); False: 2x2 stride 2
  c.model.groups = 2  # 2 towers in conv2/4/5 (§3.2); 1: one tower
  c.model.width = 1.0  # channels and fc units times this; tests train at 0.25
  c.model.dropout_rate = 0.5  # §4.2
  # 'paper': N(0, init_std^2) weights, the "ones" biases below; 'he': N(0, 2/fan_in) weights (fc8:
  # 1/fan_in), zero biases, which keeps its scale at any input size (configs/folder.py).
  c.model.init = 'paper'
  c.model.init_std = 0.01  # weights ~ N(0, init_std^2) (§5)
  # Value of the "ones" biases (conv2, conv4, conv5, fc6, fc7; §5). Caffe needed 0.1 (docs/paper.md:
  # a flat ln(1000) loss).
  c.model.bias_init = 1.0
  c.model.dtype = 'float32'  # computation dtype: 'float32' or 'bfloat16'
  # How layers run, same forward output (README "Benchmarks"). pool_impl and conv1_impl are the
  # fastest measured on an H200 (experiments/results/gpu_benchmark.md); configs/benchmark.py
  # searches them all.
  c.model.group_impl = 'towers'  # one conv per tower; 'grouped' (XLA's), 'block' (block-diagonal)
  c.model.lrn_impl = 'reduce_window'  # or 'shifted' (one fused pass), 'banded' (1x1 contraction)
  c.model.pool_impl = 'slices'  # max of strided slices (elementwise gradient); or 'reduce_window'
  c.model.conv1_impl = 'space_to_depth'  # conv1 as a 3x3 conv on 4x4 pixel blocks; or 'plain'

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'imagenet2012'  # a TFDS name; 'digits' and 'folder' are ours (README)
  c.dataset.data_dir = placeholder(str)  # TFDS data_dir (None: ~/tensorflow_datasets)
  c.dataset.manual_dir = placeholder(str)  # TFDS manual_dir (imagenet2012's tar files)
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.image_size = 224  # train/eval crop side; images are first resized to round(S*256/224)
  c.dataset.flip = True  # horizontal reflections (§4.1)
  c.dataset.lighting = True  # PCA lighting noise (§4.1)
  c.dataset.lighting_std = 0.1
  c.dataset.eigval = IMAGENET_EIGVAL
  c.dataset.eigvec = IMAGENET_EIGVEC
  c.dataset.mean = IMAGENET_MEAN
  c.dataset.std = IMAGENET_STD
  c.dataset.cache = False  # True: keep the encoded records in memory (ImageNet's do not fit)
  c.dataset.shuffle_buffer = 10_000
  # Multi-host: 'shard' (each process reads its 1/N of the training split; the batches depend on
  # the number of processes) or 'all' (every process reads the whole split and keeps its rows of
  # each batch: the batches, and so the losses, of one process on any number of processes, for
  # N times the reading). One process: the same either way.
  c.dataset.process_reads = 'shard'
  c.dataset.path = placeholder(str)  # name='folder': DIR holding train/<class>/ and val/<class>/
  c.dataset.train_crop = 'paper'  # 'paper' (random S of the R center square) or 'inception'
  # Evaluation's resize: 'paper' (center S of the R center square) or 'torchvision' (its Resize(R)
  # and CenterCrop(S): longer side truncated, offsets rounded; full-size data, center crop only).
  c.dataset.eval_resize = 'paper'
  c.dataset.pca_stats = placeholder(str)  # a pca_stats JSON: replaces eigval/eigvec/mean/std
  c.dataset.on_bad_image = 'fail'  # folders: an unreadable image 'fail's the run or is 'skip'ped
  # The paper's stored form (§2): each image once as its central R x R square
  # (R = round(S*256/224)), prepared on first use (or by python -m alexnet_jax.prepare) and reused;
  # the host then only decodes the crop window. 'jpeg' at prepared_quality, or 'raw' uint8 (no
  # decode, R*R*3 bytes).
  c.dataset.prepared = True  # README "Prepared data"
  c.dataset.prepared_format = 'jpeg'
  c.dataset.prepared_quality = 95

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global, split over all devices (§5)
  c.train.eval_batch_size = 500
  c.train.num_epochs = 90  # §5
  c.train.num_train_steps = -1  # -1: no cap; a cap makes short smoke runs
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 0  # also checkpoint every N steps (a multiple of log_every)
  c.train.checkpoint_max_to_keep = 3  # the newest N, plus the best by val top-1 error
  c.train.on_nonfinite = 'stop'  # NaN/Inf loss or gradient: 'stop', or 'skip' the update
  c.train.allow_config_change = False  # resume a workdir whose stored config differs
  c.train.profile_steps = 0  # > 0: a jax.profiler trace of this many steps (TensorBoard)
  # > 0: save and exit (status 0) at the end of this epoch, as if stopped by a signal; the same
  # command with a later pause epoch (or 0) resumes it bit-identically. A search's early stopping
  # (alexnet_jax.sweep --early_stop=asha) pauses its trials at their rungs with it.
  c.train.pause_at_epoch = 0

  # Start from another run's parameters (a trained workdir, or convert_torchvision's output)
  # instead of the random init; ignored when the workdir already has a checkpoint to resume.
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = placeholder(str)  # its workdir; None: random init
  c.init.step = -1  # its checkpoint to take; -1: the newest
  c.init.reinit = ()  # layers initialised afresh instead, e.g. ('fc8',) for new classes

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.01  # §5
  c.optimizer.warmup_steps = 0  # LR rises linearly from 0 over this many steps; 0: no warm-up
  c.optimizer.momentum = 0.9  # §5
  c.optimizer.weight_decay = 5e-4  # §5
  c.optimizer.weight_decay_mode = 'decoupled'  # or 'coupled' (the paper's form)
  c.optimizer.frozen_layers = ()  # layers never updated, e.g. ('conv1', ..., 'conv5')
  # §5: LR ÷10 when the validation error stops improving (three times in ~90 epochs).
  c.optimizer.plateau = ml_collections.ConfigDict()
  c.optimizer.plateau.factor = 0.1  # LR x factor ...
  c.optimizer.plateau.patience = 5  # ... after this many epochs without a better val top-1 error
  c.optimizer.plateau.rtol = 1e-4  # relative improvement that counts as better
  c.optimizer.plateau.atol = 0.0
  c.optimizer.plateau.cooldown = 0  # epochs to wait after a drop before counting again
  c.optimizer.plateau.min_scale = 1e-3  # never below LR x min_scale (three drops)
  return c
