"""AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) as Flax linen modules.

The network is written as the paper's architecture table (§3.5): one row per layer, read top to
bottom by ``AlexNet.__call__``. Tensors are NHWC. ``python -m alexnet_jax.models`` prints the table
with output shapes and parameter counts (60,965,224 for the paper model with 1000 classes).

conv1 is padded by 2 on each side (as torchvision does) so that a 224 crop gives the paper's
55/27/13/6 feature maps (Caffe uses 227 crops without padding; same sizes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

VARIANTS = {'paper': PAPER, 'torchvision': TORCHVISION}
TORCHVISION_POOL = 6  # torchvision averages conv5's pooled map to 6x6 (nn.AdaptiveAvgPool2d)


def layer_names(variant: str) -> tuple[str, ...]:
  """The parameter-holding layers of a variant, input to output ('conv1', ..., 'fc8')."""
  return tuple(row.name for row in VARIANTS[variant])


LRN_IMPLS = ('reduce_window', 'shifted', 'banded')


def local_response_norm(
    x: jax.Array, *, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
    impl: str = 'reduce_window'
) -> jax.Array:
  """Paper §3.3: b_i = a_i / (k + alpha * sum_{|j-i|<=size//2} a_j^2) ** beta, across channels.

  alpha is *not* divided by `size` (Caffe and PyTorch divide it). The sum is accumulated in float32
  whatever the input dtype. `impl` only changes how the window sum over channels is computed:
    reduce_window — XLA's window reduction (a separate pass on GPU);
    shifted — the sum of `size` shifted copies of a^2, one elementwise pass XLA can fuse with the
              ReLU before and the division after;
    banded — a^2 (in the input dtype) times a 0/1 (C x C) band matrix, a 1x1 contraction that runs
             on the matrix units, accumulated in float32 (on GPUs float32 inputs use TF32 there).
  """
  x32 = x.astype(jnp.float32)
  half = size // 2
  channels = x.shape[-1]
  if impl == 'reduce_window':
    window_sum = jax.lax.reduce_window(
        jnp.square(x32), 0.0, jax.lax.add,
        window_dimensions=(1,) * (x.ndim - 1) + (size,),
        window_strides=(1,) * x.ndim,
        padding=((0, 0),) * (x.ndim - 1) + ((half, half),))
  elif impl == 'shifted':
    padded = jnp.pad(jnp.square(x32), ((0, 0),) * (x.ndim - 1) + ((half, half),))
    window_sum = sum(jax.lax.slice_in_dim(padded, i, i + channels, axis=-1) for i in range(size))
  elif impl == 'banded':
    index = np.arange(channels)
    band = jnp.asarray(np.abs(index[:, None] - index[None, :]) <= half, x.dtype)
    window_sum = jax.lax.dot_general(jnp.square(x), band, (((x.ndim - 1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  else:
    raise ConfigError(f'model.lrn_impl={impl!r} is unknown; use one of {LRN_IMPLS}.')
  denom = k + alpha * window_sum
  if beta == 0.75:  # d^-3/4 without pow's exp/log, forward and backward
    inv_sqrt = jax.lax.rsqrt(denom)
    scale = inv_sqrt * jnp.sqrt(inv_sqrt)
  else:
    scale = denom ** -beta
  return (x32 * scale).astype(x.dtype)


POOL_IMPLS = ('reduce_window', 'slices')


def max_pool(x: jax.Array, window: int, stride: int, impl: str = 'reduce_window') -> jax.Array:
  """VALID max-pooling over H, W of NHWC.

  impl='slices' takes the maximum of the window*window strided slices: the same output, but its
  gradient is elementwise (pads and selects that fuse) instead of XLA's select-and-scatter. On
  ties within a window it splits the gradient equally where select-and-scatter gives it all to one
  element (both are valid subgradients; after a ReLU the tied values are almost always zeros, whose
  gradient the ReLU discards).
  """
  if impl == 'reduce_window':
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding='VALID')
  if impl != 'slices':
    raise ConfigError(f'model.pool_impl={impl!r} is unknown; use one of {POOL_IMPLS}.')
  out_h, out_w = ((s - window) // stride + 1 for s in x.shape[1:3])
  views = [jax.lax.slice(x, (0, i, j, 0),
                         (x.shape[0], i + stride * (out_h - 1) + 1,
                          j + stride * (out_w - 1) + 1, x.shape[3]), (1, stride, stride, 1))
           for i in range(window) for j in range(window)]
  return functools.reduce(jnp.maximum, views)


def per_example_dropout(
    x: jax.Array, rate: float, rng: jax.Array, example_ids: jax.Array
) -> jax.Array:
  """Inverted dropout whose mask for each example is keyed by that example's global id.

  The mask of an example is the same whichever device, device count or batch position it lands
  on, so training does not depend on how the global batch is split.
  """
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, example_ids)
  keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(keys)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


GROUP_IMPLS = ('towers', 'grouped', 'block')
CONV1_IMPLS = ('plain', 'space_to_depth')


def conv_towers(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int, groups: int,
                impl: str = 'towers', space_to_depth: bool = False) -> jax.Array:
  """Grouped convolution, NHWC x HWIO; kernel is (kh, kw, C_in / groups, C_out).

  impl='towers' runs one convolution per tower and concatenates them (the paper's two GPUs);
  'grouped' uses XLA's feature_group_count; 'block' runs one dense convolution whose kernel is
  block-diagonal (zeros between towers: twice the multiply-adds, no split or concatenation).
  Same result; 'towers' is ~8x faster than 'grouped' on XLA:CPU. `space_to_depth` (groups=1 only)
  runs a strided convolution as a stride-1 one on (stride x stride) pixel blocks (see
  `space_to_depth_conv`).
  """
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(stride, stride),
                           padding=[(padding, padding)] * 2,
                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if impl not in GROUP_IMPLS:
    raise ConfigError(f'model.group_impl={impl!r} is unknown; use one of {GROUP_IMPLS}.')
  if groups == 1:
    return space_to_depth_conv(x, kernel, stride, padding) if space_to_depth else conv(x, kernel)
  if impl == 'grouped':
    return conv(x, kernel, feature_group_count=groups)
  if impl == 'block':
    kh, kw, cin, cout = kernel.shape
    blocks = kernel.reshape(kh, kw, cin, groups, cout // groups)
    dense = jnp.einsum('hwigo,gG->hwgiGo', blocks, jnp.eye(groups, dtype=kernel.dtype))
    return conv(x, dense.reshape(kh, kw, cin * groups, cout))
  return jnp.concatenate([conv(xs, ks) for xs, ks in zip(jnp.split(x, groups, axis=-1),
                                                          jnp.split(kernel, groups, axis=-1))],
                         axis=-1)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """conv(x, kernel, stride, padding) computed as a stride-1 VALID convolution on blocks.

  Output pixel o reads padded rows stride*o + t, t < kh; writing t = stride*a + r, that is block
  row o + a, row r inside it. So the (padded) image becomes (H/stride, W/stride, stride^2 * C) and
  the kernel, zero-padded to a multiple of stride, (ceil(kh/stride), ..., stride^2 * C, C_out):
  for conv1, 57x57x48 images and a 3x3x48 kernel instead of 228x228x3 and 11x11x3, which fills
  the matrix units that 3 input channels leave mostly idle. Same sums, same output.
  """
  n, _, _, c = x.shape
  kh, kw, _, cout = kernel.shape
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = [-(-k // stride) for k in (kh, kw)]  # kernel side in blocks
  # Keep exactly the rows the outputs read, rounded up to whole blocks (the rest is never read).
  sides = [stride * ((s - k) // stride + t) for s, k, t in zip(x.shape[1:3], (kh, kw), taps)]
  x = x[:, :sides[0], :sides[1]]
  x = jnp.pad(x, ((0, 0), (0, sides[0] - x.shape[1]), (0, sides[1] - x.shape[2]), (0, 0)))
  bh, bw = sides[0] // stride, sides[1] // stride
  x = x.reshape(n, bh, stride, bw, stride, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(n, bh, bw, stride * stride * c)
  kernel = jnp.pad(kernel, ((0, stride * taps[0] - kh), (0, stride * taps[1] - kw), (0, 0), (0, 0)))
  kernel = kernel.reshape(taps[0], stride, taps[1], stride, c, cout).transpose(0, 2, 1, 3, 4, 5)
  kernel = kernel.reshape(taps[0], taps[1], stride * stride * c, cout)
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv2d(nn.Module):
  """A convolution with `groups` towers; parameters laid out as nn.Conv(feature_group_count)."""

  features: int
  kernel: int
  stride: int
  padding: int
  groups: int
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer
  dtype: Any
  group_impl: str = 'towers'
  space_to_depth: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] % self.groups or self.features % self.groups:
      raise ConfigError(f'groups={self.groups} must divide the {x.shape[-1]} input and '
                       f'{self.features} output channels of {self.name}.')
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    y = conv_towers(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
                    padding=self.padding, groups=self.groups, impl=self.group_impl,
                    space_to_depth=self.space_to_depth)
    return y + bias.astype(self.dtype)


INITS = ('paper', 'he')


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
  """AlexNet; `variant` picks the table, the other fields are the paper's switchable tricks."""

  num_classes: int = 1000
  variant: str = 'paper'
  lrn: bool = True  # §3.3 local response normalisation (paper variant only)
  overlapping_pool: bool = True  # §3.4: 3x3/2 pooling; False: 2x2/2
  groups: int = 2  # §3.2: two towers; 1: one tower with the same widths
  width: float = 1.0  # every row's channels/units times this (1: the table's); small = fast tests
  dropout_rate: float = 0.5
  init_scheme: str = 'paper'  # config model.init: INITS, see `initializers`
  bias_init: float = 1.0  # value of the "ones" biases (Caffe needed 0.1); 'paper' init only
  init_std: float = 0.01  # 'paper' init only
  dtype: Any = jnp.float32  # computation dtype; parameters stay float32
  # How the layers run (same forward output; see README "Benchmarks"): GROUP_IMPLS, LRN_IMPLS,
  # POOL_IMPLS, CONV1_IMPLS.
  group_impl: str = 'towers'
  lrn_impl: str = 'reduce_window'
  pool_impl: str = 'reduce_window'
  conv1_impl: str = 'plain'

  def __post_init__(self):
    super().__post_init__()
    if self.variant not in VARIANTS:
      raise ConfigError(f'model.variant={self.variant!r} is unknown; use one of {sorted(VARIANTS)}.')
    for field, choices in (('group_impl', GROUP_IMPLS), ('lrn_impl', LRN_IMPLS),
                           ('pool_impl', POOL_IMPLS), ('conv1_impl', CONV1_IMPLS)):
      if getattr(self, field) not in choices:
        raise ConfigError(f'model.{field}={getattr(self, field)!r} is unknown; use one of '
                          f'{choices}.')
    if self.init_scheme not in INITS:
      raise ConfigError(f'model.init={self.init_scheme!r} is unknown; use one of {INITS}.')
    if self.groups < 1:
      raise ConfigError(f'model.groups={self.groups} must be 1 (one tower) or more.')
    if not 0 < self.width <= 4:
      raise ConfigError(f'model.width={self.width} must be in (0, 4]; 1 is the paper\'s network.')

  def features(self, row: Conv | Dense) -> int:
    """A row's output channels (units) at `width`: a multiple of `groups` for convolutions, so
    that every tower split stays even."""
    if row.features is None:
      return self.num_classes
    if isinstance(row, Dense):
      return max(1, round(row.features * self.width))
    return self.groups * max(1, round(row.features * self.width / self.groups))

  @nn.compact
  def __call__(
      self, x: jax.Array, *, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    if min(x.shape[1:3]) < min_image_size(self):
      raise ConfigError(f'input {x.shape[1]}x{x.shape[2]} is too small for this model: the side '
                       f'must be at least {min_image_size(self)} (dataset.image_size).')
    if example_ids is None:
      example_ids = jnp.arange(x.shape[0])
    pool = 3 if self.overlapping_pool else 2
    x = x.astype(self.dtype)
    for row in VARIANTS[self.variant]:
      kernel_init, bias_init = initializers(row, self.init_scheme, self.init_std, self.bias_init)
      if isinstance(row, Conv):
        x = Conv2d(self.features(row), row.kernel, row.stride, row.padding,
                   groups=self.groups if row.grouped else 1, kernel_init=kernel_init,
                   bias_init=bias_init, dtype=self.dtype,
                   group_impl=self.group_impl,
                   space_to_depth=row.name == 'conv1' and self.conv1_impl == 'space_to_depth',
                   name=row.name)(x)
        x = nn.relu(x)
        if row.lrn and self.lrn:
          x = local_response_norm(x, impl=self.lrn_impl)
        conv_out = x
        if row.pool:
          x = max_pool(x, pool, 2, self.pool_impl)
        self.sow('intermediates', 'rows', (conv_out, x))
        continue
      if x.ndim == 4:  # first dense row: flatten H, W, C (in that order)
        if self.variant == 'torchvision':
          x = adaptive_avg_pool(x, (TORCHVISION_POOL, TORCHVISION_POOL))
        x = x.reshape(x.shape[0], -1)
      if row.dropout and train and self.dropout_rate > 0:
        x = per_example_dropout(x, self.dropout_rate, self.make_rng('dropout'), example_ids)
      x = nn.Dense(self.features(row), kernel_init=kernel_init,
                   bias_init=bias_init, dtype=self.dtype, name=row.name)(x)
      if row.relu:
        x = nn.relu(x)
      self.sow('intermediates', 'rows', (x, x))
    return x.astype(jnp.float32)


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on NHWC: bin i spans [floor(i*H/out), ceil((i+1)*H/out))."""
  def pool_axis(x, axis, out):
    size = x.shape[axis]
    bins = [jnp.mean(jax.lax.slice_in_dim(x, (i * size) // out, -(-(i + 1) * size // out),
                                          axis=axis), axis=axis, keepdims=True)
            for i in range(out)]
    return jnp.concatenate(bins, axis=axis)
  return pool_axis(pool_axis(x, 1, output_size[0]), 2, output_size[1])


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
  """The architecture table with output shapes and parameter counts, as printed by the CLI."""
  if image_size < min_image_size(model):
    raise ConfigError(f'image size {image_size} is too small: this model needs at least '
                     f'{min_image_size(model)} to keep a 1x1 map after the last pooling.')
  rows = layer_table(model, image_size)
  width = '' if model.width == 1 else f', width={model.width:g}'
  lines = [f'AlexNet ({model.variant}, groups={model.groups}{width}, {model.num_classes} classes), '
           f'input {image_size}x{image_size}x3',
           f'{"layer":<8}{"output (HxWxC)":>28}{"parameters":>14}']
  shape = lambda s: 'x'.join(map(str, s))
  for name, out, pooled, count in rows:
    text = shape(out) if out == pooled else f'{shape(out)} -> {shape(pooled)}'
    lines.append(f'{name:<8}{text:>28}{count:>14,}')
  lines.append(f'{"total":<8}{"":>28}{sum(row[-1] for row in rows):>14,}')
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
                         '1 = one tower). torchvision has none.')
    flags.DEFINE_integer('image_size', 224, 'Input side in pixels.')

  def main(args: list[str]) -> None:
    del args  # none: cli.run refuses them
    paper = FLAGS.variant == 'paper'
    if not paper and FLAGS.groups not in (None, 1):
      raise ConfigError(f'--groups={FLAGS.groups} applies to --variant=paper only; torchvision '
                        f'has no towers.')
    model = AlexNet(num_classes=FLAGS.num_classes, variant=FLAGS.variant, lrn=paper,
                    groups=(FLAGS.groups or 2) if paper else 1)
    print(format_table(model, FLAGS.image_size))

  cli.run(main, define_flags, 'python -m alexnet_jax.models [--variant=paper|torchvision] '
          '[--groups=1|2] [--num_classes=N] [--image_size=N]')


if __name__ == '__main__':
  _cli()
