"""AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) as Flax linen modules.

The network is written as the paper's architecture table (§3.5): one row per layer, read top to
bottom by ``AlexNet.__call__``. Tensors are NHWC. ``python -m alexnet_jax.models`` prints the table
with output shapes and parameter counts (60,965,224 for the paper model with 1000 classes).
How each layer runs (LRN, pooling, towers) is in alexnet_jax/layers.py. `OPTIONS` lists the values
the config's `model` fields may take, checked once when an AlexNet is built (`from_config` builds it
from a config).

conv1 is padded by 2 on each side (as torchvision does) so that a 224 crop gives the paper's
55/27/13/6 feature maps (Caffe uses 227 crops without padding; same sizes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import layers
from alexnet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Conv:
  """One convolutional row of the architecture table."""

  name: str
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  grouped: bool = False  # split into `groups` towers (the paper's two GPUs)
  bias_one: bool = False  # paper: bias 1 so the ReLUs start in their positive part
  lrn: bool = False
  pool: bool = False


@dataclasses.dataclass(frozen=True)
class Dense:
  """One fully connected row of the architecture table."""

  name: str
  features: int | None  # None: num_classes
  bias_one: bool = False
  dropout: bool = False  # dropout on this layer's *input*
  relu: bool = True


# Paper §3.5, Figure 2.
PAPER = (
    Conv('conv1', 96, 11, stride=4, padding=2, lrn=True, pool=True),
    Conv('conv2', 256, 5, padding=2, grouped=True, bias_one=True, lrn=True, pool=True),
    Conv('conv3', 384, 3, padding=1),
    Conv('conv4', 384, 3, padding=1, grouped=True, bias_one=True),
    Conv('conv5', 256, 3, padding=1, grouped=True, bias_one=True, pool=True),
    Dense('fc6', 4096, bias_one=True),
    Dense('fc7', 4096, bias_one=True, dropout=True),
    Dense('fc8', None, dropout=True, relu=False),
)

# torchvision's "one weird trick" layout (Krizhevsky 2014): no LRN, no towers, 6x6 average pool.
TORCHVISION = (
    Conv('conv1', 64, 11, stride=4, padding=2, pool=True),
    Conv('conv2', 192, 5, padding=2, pool=True),
    Conv('conv3', 384, 3, padding=1),
    Conv('conv4', 256, 3, padding=1),
    Conv('conv5', 256, 3, padding=1, pool=True),
    Dense('fc6', 4096, dropout=True),
    Dense('fc7', 4096, dropout=True),
    Dense('fc8', None, relu=False),
)

# §3.2's baseline, "a net with half as many kernels in each convolutional layer trained on one GPU":
# one tower of 48-128-192-192-256 kernels (its footnote: conv5 and the fully connected layers keep
# their size, so both nets have about as many parameters), LRN and pooling as in PAPER.
PAPER_ONE_GPU = (
    Conv('conv1', 48, 11, stride=4, padding=2, lrn=True, pool=True),
    Conv('conv2', 128, 5, padding=2, bias_one=True, lrn=True, pool=True),
    Conv('conv3', 192, 3, padding=1),
    Conv('conv4', 192, 3, padding=1, bias_one=True),
    Conv('conv5', 256, 3, padding=1, bias_one=True, pool=True),
    *PAPER[5:],
)

VARIANTS = {'paper': PAPER, 'torchvision': TORCHVISION, 'paper_one_gpu': PAPER_ONE_GPU}
TORCHVISION_POOL = 6  # torchvision averages conv5's pooled map to 6x6 (nn.AdaptiveAvgPool2d)


def layer_names(variant: str) -> tuple[str, ...]:
  """The parameter-holding layers of a variant, input to output ('conv1', ..., 'fc8')."""
  return tuple(row.name for row in VARIANTS[variant])


def has_towers(variant: str) -> bool:
  """Whether a variant's table has layers split into towers (otherwise model.groups must be 1)."""
  return any(isinstance(row, Conv) and row.grouped for row in VARIANTS[variant])


INITS = ('paper', 'he')
DTYPES = ('float32', 'bfloat16')  # computation dtypes; parameters stay float32
# LRN's window with towers (groups > 1): within each tower's channels (the paper's, §3.3), or
# across all of them; conv1 counts as `groups` towers here too (AlexNet.lrn_scope).
LRN_SCOPES = ('tower', 'all')

# The config's `model` fields (configs/default.py) that take one of a few values...
OPTIONS: dict[str, tuple[str, ...]] = {
    'variant': tuple(VARIANTS), 'init': INITS, 'dtype': DTYPES, 'lrn_scope': LRN_SCOPES,
    'group_impl': layers.GROUP_IMPLS, 'lrn_impl': layers.LRN_IMPLS, 'pool_impl': layers.POOL_IMPLS,
    'conv1_impl': layers.CONV1_IMPLS}
# ... the ones that only change how layers run (same forward output, see alexnet_jax/layers.py) ...
IMPLS = {field: OPTIONS[field] for field in ('group_impl', 'lrn_impl', 'pool_impl', 'conv1_impl')}
# ... and the numeric ones: (test, what to say when it fails).
RANGES = {
    'groups': (lambda groups: groups >= 1, 'must be 1 (one tower) or more'),
    'width': (lambda width: 0 < width <= 4, "must be in (0, 4]; 1 is the paper's network"),
}


def check_options(values: Mapping[str, Any]) -> None:
  """Raises ConfigError for the first value of a model config (named as in its `model` section)
  that `OPTIONS` or `RANGES` does not allow, or that the torchvision variant cannot have."""
  for field, choices in OPTIONS.items():
    if values[field] not in choices:
      raise ConfigError(f'model.{field}={values[field]!r} is unknown; use one of {choices}.')
  for field, (allowed, rule) in RANGES.items():
    if not allowed(values[field]):
      raise ConfigError(f'model.{field}={values[field]} {rule}.')
  if values['variant'] == 'torchvision' and (values['lrn'] or values['groups'] != 1):
    raise ConfigError("model.variant='torchvision' has no LRN and no towers; set "
                      "--config.model.lrn=False --config.model.groups=1 (configs/torchvision.py).")
  if values['groups'] != 1 and not has_towers(values['variant']):
    raise ConfigError(f"model.variant={values['variant']!r} has no towers; set "
                      f"--config.model.groups=1.")


def check_model_parallel(model: AlexNet, model_parallel: int) -> None:
  """Raises ConfigError unless `model` can run one tower on each of `model_parallel` devices (1:
  nothing to split): the towers exchange maps only where the paper's GPUs did (§3.2), so the
  devices must be the towers, and no layer may read across them anywhere else."""
  if model_parallel == 1:
    return
  if not has_towers(model.variant):
    raise ConfigError(f'model_parallel={model_parallel} runs one tower per device, and '
                      f'model.variant={model.variant!r} has no towers; use the paper variant with '
                      f'--config.model.groups={model_parallel}, or model_parallel=1.')
  if model.groups != model_parallel:
    raise ConfigError(f'model_parallel={model_parallel} runs one tower per device, but '
                      f'model.groups={model.groups}; set --config.model.groups={model_parallel} or '
                      f'--config.model_parallel={model.groups}.')
  if model.lrn and model.lrn_scope == 'all':
    raise ConfigError(f"model.lrn_scope='all' normalises across the towers, which model_parallel="
                      f"{model_parallel} runs on different devices; use model.lrn_scope='tower' "
                      f"(the paper's) or model_parallel=1.")
  for row in VARIANTS[model.variant]:
    if isinstance(row, Dense) and row.features is not None and not model.splits(row):
      raise ConfigError(f'model.width={model.width:g} gives {row.name} {model.features(row)} '
                        f'units, which do not split over model_parallel={model_parallel} '
                        f'devices; use a width that gives a multiple of {model_parallel}.')


def initializers(
    row: Conv | Dense, init: str, std: float, bias_one: float
) -> tuple[nn.initializers.Initializer, nn.initializers.Initializer]:
  """(kernel, bias) initialisers of one table row.

  'paper' (§5): kernels ~ N(0, std^2); the `bias_one` rows' biases = `bias_one`, the others 0.
  'he' (He et al. 2015, torch.nn.init.kaiming_normal_ with fan_in): kernels ~ N(0, gain^2 / fan_in),
  fan_in = kh * kw * input channels per tower (convolutions) or inputs (dense); gain sqrt(2) for
  the rows a ReLU follows, so activations keep their scale at any input size (LRN's division by
  about k^beta = 1.7 is left as it is), and 1 for fc8 (LeCun); biases 0. `std` and `bias_one` are
  not used.
  """
  if init == 'paper':
    return nn.initializers.normal(std), nn.initializers.constant(bias_one if row.bias_one else 0.0)
  relu = isinstance(row, Conv) or row.relu
  kernel = nn.initializers.variance_scaling(2.0 if relu else 1.0, 'fan_in', 'normal')
  return kernel, nn.initializers.zeros


class AlexNet(nn.Module):
  """AlexNet; `variant` picks the table, the other fields are the paper's switchable tricks.

  The fields are the config's `model` fields (`from_config`); `check_options` checks them when the
  module is built.
  """

  num_classes: int = 1000
  variant: str = 'paper'
  lrn: bool = True  # §3.3 local response normalisation (paper variants only)
  lrn_scope: str = 'tower'  # LRN_SCOPES: within each tower (the paper's) or across all channels
  overlapping_pool: bool = True  # §3.4: 3x3/2 pooling; False: 2x2/2
  groups: int = 2  # §3.2: two towers; 1: one tower with the same widths
  width: float = 1.0  # every row's channels/units times this (1: the table's); small = fast tests
  dropout_rate: float = 0.5
  init_scheme: str = 'paper'  # config model.init: INITS, see `initializers`
  bias_init: float = 1.0  # value of the "ones" biases (Caffe needed 0.1); 'paper' init only
  init_std: float = 0.01  # 'paper' init only
  dtype: Any = jnp.float32  # computation dtype (config model.dtype: DTYPES); parameters float32
  # How the layers run (same forward output; see README "Benchmarks"): IMPLS.
  group_impl: str = 'towers'
  lrn_impl: str = 'reduce_window'
  pool_impl: str = 'reduce_window'
  conv1_impl: str = 'plain'
  # Inside a shard_map manual over this mesh axis, of `groups` devices: each device runs one tower
  # (its share of every layer's kernels and neurons) and the towers exchange maps only where a layer
  # reads both (the paper's two GPUs, §3.2; `device_features`). None: every tower runs here.
  # Set by alexnet_jax/experiment.py, not by a config.
  tower_axis: str | None = None

  def __post_init__(self):
    super().__post_init__()
    values = {name: getattr(self, field.name) for name, field in config_fields().items()}
    check_options({**values, 'dtype': jnp.dtype(self.dtype).name})

  def features(self, row: Conv | Dense) -> int:
    """A row's output channels (units) at `width`: a multiple of `groups` for convolutions, so
    that every tower split stays even."""
    if row.features is None:
      return self.num_classes
    if isinstance(row, Dense):
      return max(1, round(row.features * self.width))
    return self.groups * max(1, round(row.features * self.width / self.groups))

  def splits(self, row: Conv | Dense) -> bool:
    """Whether a row's outputs split over the towers' devices: every convolution's (a multiple of
    `groups`); a dense row's when `groups` divides them (`check_model_parallel` lets only fc8, the
    classes, run whole on every device)."""
    return isinstance(row, Conv) or self.features(row) % self.groups == 0

  def device_features(self, row: Conv | Dense) -> int:
    """A row's outputs computed on this device: all of them, or with `tower_axis` one tower's
    share of a row that `splits`."""
    split = self.tower_axis is not None and self.splits(row)
    return self.features(row) // self.groups if split else self.features(row)

  @nn.compact
  def __call__(
      self, x: jax.Array, *, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    check_image_size(self, min(x.shape[1:3]), 'input side')
    if example_ids is None:
      example_ids = jnp.arange(x.shape[0])
    pool = 3 if self.overlapping_pool else 2
    x = x.astype(self.dtype)
    spread = self.tower_axis is not None  # one tower on this device: groups are devices
    local = False  # x holds only this device's tower (its share of the channels or units)
    for row in VARIANTS[self.variant]:
      kernel_init, bias_init = initializers(row, self.init_scheme, self.init_std, self.bias_init)
      if isinstance(row, Conv):
        if local and not row.grouped:  # conv3 reads both towers' maps: the exchange (§3.2)
          with jax.named_scope(f'{row.name}_input'):
            x, local = layers.gather_towers(x, self.tower_axis), False
        x = layers.Conv2d(
            self.device_features(row), row.kernel, row.stride, row.padding,
            groups=self.groups if row.grouped and not spread else 1, kernel_init=kernel_init,
            bias_init=bias_init, dtype=self.dtype, group_impl=self.group_impl,
            space_to_depth=row.name == 'conv1' and self.conv1_impl == 'space_to_depth',
            name=row.name)(x)
        local = spread
        x = nn.relu(x)
        if row.lrn and self.lrn:
          towers = self.groups if self.lrn_scope == 'tower' and not spread else 1
          x = layers.local_response_norm(x, impl=self.lrn_impl, groups=towers)
        conv_out = x
        if row.pool:
          x = layers.max_pool(x, pool, 2, self.pool_impl)
        self.sow('intermediates', 'rows', (conv_out, x))
        continue
      split = spread and self.splits(row)
      if local:  # a dense row reads the whole previous layer (fc6: both towers' maps)
        gather = layers.gather_towers if split else layers.gather_whole
        with jax.named_scope(f'{row.name}_input'):
          x, local = gather(x, self.tower_axis), False
      if x.ndim == 4:  # first dense row: flatten H, W, C (in that order)
        if self.variant == 'torchvision':
          x = layers.adaptive_avg_pool(x, (TORCHVISION_POOL, TORCHVISION_POOL))
        x = x.reshape(x.shape[0], -1)
      if row.dropout and train and self.dropout_rate > 0:
        x = layers.per_example_dropout(x, self.dropout_rate, self.make_rng('dropout'), example_ids)
      x = nn.Dense(self.device_features(row), kernel_init=kernel_init,
                   bias_init=bias_init, dtype=self.dtype, name=row.name)(x)
      local = split
      if row.relu:
        x = nn.relu(x)
      self.sow('intermediates', 'rows', (x, x))
    if local:  # the softmax reads every class
      with jax.named_scope('logits'):
        x = layers.gather_whole(x, self.tower_axis)
    return x.astype(jnp.float32)


# AlexNet field -> config field where the names differ (`init` is a flax Module method).
CONFIG_NAMES = {'init_scheme': 'init'}


def config_fields() -> dict[str, dataclasses.Field]:
  """AlexNet's fields that a config's `model` section sets, by config name: all but num_classes
  (the caller resolves model.num_classes=-1), tower_axis (the devices' layout sets it) and flax's
  parent and name."""
  return {CONFIG_NAMES.get(field.name, field.name): field for field in dataclasses.fields(AlexNet)
          if field.name not in ('num_classes', 'tower_axis', 'parent', 'name')}


def from_config(model: ml_collections.ConfigDict, num_classes: int) -> AlexNet:
  """The AlexNet that a config's `model` section describes (configs/default.py) with `num_classes`
  outputs; the section's own num_classes is not read. Raises ConfigError for a value the model
  cannot take (checked before the dtype name is looked up)."""
  fields = config_fields()
  values = {name: model[name] for name in fields}  # older config.json: see workdir.ADDED
  check_options(values)
  kwargs = {fields[name].name: value for name, value in values.items()}
  return AlexNet(num_classes=num_classes, **{**kwargs, 'dtype': jnp.dtype(values['dtype'])})


def min_image_size(model: AlexNet) -> int:
  """Smallest input side that still gives a 1x1 map after the last pooling."""
  side = 1
  for row in reversed(VARIANTS[model.variant]):
    if isinstance(row, Conv):
      if row.pool:
        window = 3 if model.overlapping_pool else 2
        side = (side - 1) * 2 + window
      side = (side - 1) * row.stride + row.kernel - 2 * row.padding
  return side


def check_image_size(model: AlexNet, size: int, what: str = 'dataset.image_size') -> None:
  """Raises ConfigError if an input side of `size` pixels is below `min_image_size(model)`."""
  if size < min_image_size(model):
    raise ConfigError(f'{what}={size} is too small for this model; use at least '
                      f'{min_image_size(model)}.')


def abstract_params(model: AlexNet, image_size: int) -> Any:
  """The parameter tree's shapes and dtypes (jax.ShapeDtypeStruct) at this input side; nothing
  is computed. (fc6's input size depends on the side, except in the torchvision variant.)"""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)['params']


def layer_table(
    model: AlexNet, image_size: int
) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
  """(layer, shape before pooling, shape after, parameter count) per table row, for one image."""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = abstract_params(model, image_size)
  _, state = jax.eval_shape(
      lambda p, x: model.apply({'params': p}, x, train=False, mutable=['intermediates']),
      params, image)
  outputs = state['intermediates']['rows']
  return [(row.name, tuple(out.shape[1:]), tuple(pooled.shape[1:]), count_params(params[row.name]))
          for row, (out, pooled) in zip(VARIANTS[model.variant], outputs)]


def count_params(params: Any) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def forward_macs(model: AlexNet, image_size: int) -> int:
  """Multiply-adds of one image's forward pass through the convolutions and dense layers.

  Each output value of a row costs one multiply-add per kernel weight feeding it, so a row costs
  (output pixels) x (its parameters less biases); LRN, pooling and ReLU are not counted. Paper model
  at 224: 0.72 GMAC, so a trained image (forward + backward ~ 3 forwards) is ~4.3 GFLOP.
  """
  return sum(int(np.prod(out[:-1])) * (count - out[-1])
             for _, out, _, count in layer_table(model, image_size))


def format_table(model: AlexNet, image_size: int) -> str:
  """The architecture table with output shapes and parameter counts, as printed by the CLI; the
  torchvision variant's average pool (to 6x6, before fc6) has a line of its own."""
  check_image_size(model, image_size, 'image_size')
  rows = layer_table(model, image_size)
  width = '' if model.width == 1 else f', width={model.width:g}'
  lines = [f'AlexNet ({model.variant}, groups={model.groups}{width}, {model.num_classes} classes), '
           f'input {image_size}x{image_size}x3',
           f'{"layer":<8}{"output (HxWxC)":>28}{"parameters":>14}']
  shape = lambda s: 'x'.join(map(str, s))
  line = lambda name, text, count: f'{name:<8}{text:>28}{count:>14,}'
  last_conv = [row.name for row in VARIANTS[model.variant] if isinstance(row, Conv)][-1]
  for name, out, pooled, count in rows:
    lines.append(line(name, shape(out) if out == pooled else f'{shape(out)} -> {shape(pooled)}',
                      count))
    if name == last_conv and model.variant == 'torchvision':
      averaged = (TORCHVISION_POOL, TORCHVISION_POOL, pooled[-1])
      lines.append(line('avgpool', f'{shape(pooled)} -> {shape(averaged)}', 0))
  lines.append(line('total', '', sum(row[-1] for row in rows)))
  return '\n'.join(lines)


def _cli() -> None:
  """`python -m alexnet_jax.models`: the table of one model (alexnet_jax/cli.py's shape)."""
  from absl import flags
  from alexnet_jax import cli
  FLAGS = flags.FLAGS

  def define_flags() -> None:
    flags.DEFINE_enum('variant', 'paper', sorted(VARIANTS), 'Which architecture table.')
    flags.DEFINE_integer('num_classes', 1000, 'Size of fc8.', lower_bound=1)
    flags.DEFINE_integer('groups', None, 'Towers in conv2/4/5 of the paper variant (default 2; '
                         '1 = one tower). The other variants have none.')
    flags.DEFINE_integer('image_size', 224, 'Input side in pixels.')

  def main(args: list[str]) -> None:
    del args  # none: cli.run refuses them
    towers = has_towers(FLAGS.variant)
    if not towers and FLAGS.groups not in (None, 1):
      raise ConfigError(f'--groups={FLAGS.groups} applies to --variant=paper only; '
                        f'{FLAGS.variant} has no towers.')
    model = AlexNet(num_classes=FLAGS.num_classes, variant=FLAGS.variant,
                    lrn=FLAGS.variant != 'torchvision', groups=(FLAGS.groups or 2) if towers else 1)
    print(format_table(model, FLAGS.image_size))

  cli.run(main, define_flags, 'python -m alexnet_jax.models '
          '[--variant=paper|paper_one_gpu|torchvision] '
          '[--groups=1|2] [--num_classes=N] [--image_size=N]')


if __name__ == '__main__':
  _cli()
