"""How the layers of alexnet_jax.models run: local response normalisation (§3.3), max-pooling
(§3.4), convolutions split into towers (§3.2), conv1 on pixel blocks (space-to-depth), dropout.

Each `impl` choice (LRN_IMPLS, POOL_IMPLS, GROUP_IMPLS, CONV1_IMPLS) changes how a layer runs, never
what it computes: the forward output is the same (tests/test_models.py; README "Benchmarks").
models.OPTIONS checks the config's choices once, so the functions here take them as given.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


LRN_IMPLS = ('reduce_window', 'shifted', 'banded')


def local_response_norm(
    x: jax.Array, *, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75,
    impl: str = 'reduce_window', groups: int = 1
) -> jax.Array:
  """Paper §3.3: b_i = a_i / (k + alpha * sum_{|j-i|<=size//2} a_j^2) ** beta, across channels.

  alpha is *not* divided by `size` (Caffe and PyTorch divide it). The sum is accumulated in float32
  whatever the input dtype. With `groups` > 1 the channels are that many equal towers and the window
  stops at each tower's edges, as if each tower were normalised alone (the paper's two GPUs; §3.3).
  `impl` only changes how the window sum over channels is computed:
    reduce_window — XLA's window reduction (a separate pass on GPU);
    shifted — the sum of `size` shifted copies of a^2, one elementwise pass XLA can fuse with the
              ReLU before and the division after;
    banded — a^2 (in the input dtype) times a 0/1 (C x C) band matrix (block-diagonal, one block
             per tower), a 1x1 contraction that runs on the matrix units, accumulated in float32
             (on GPUs float32 inputs use TF32 there).
  """
  x32 = x.astype(jnp.float32)
  half = size // 2
  channels = x.shape[-1]
  if impl == 'banded':
    index = np.arange(channels)
    tower = index // (channels // groups)
    band = (np.abs(index[:, None] - index[None, :]) <= half) & (tower[:, None] == tower[None, :])
    window_sum = jax.lax.dot_general(jnp.square(x), jnp.asarray(band, x.dtype),
                                     (((x.ndim - 1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  else:  # the towers as an axis of their own; the window runs along the last one
    squares = jnp.square(x32).reshape(*x.shape[:-1], groups, channels // groups)
    window_sum = _window_sum(squares, size, impl).reshape(x.shape)
  denom = k + alpha * window_sum
  if beta == 0.75:  # d^-3/4 without pow's exp/log, forward and backward
    inv_sqrt = jax.lax.rsqrt(denom)
    scale = inv_sqrt * jnp.sqrt(inv_sqrt)
  else:
    scale = denom ** -beta
  return (x32 * scale).astype(x.dtype)


def _window_sum(squares: jax.Array, size: int, impl: str) -> jax.Array:
  """Sum over a window of `size` along the last axis, zero beyond its ends ('reduce_window' or
  'shifted', see `local_response_norm`)."""
  half = size // 2
  pad = ((0, 0),) * (squares.ndim - 1) + ((half, half),)
  if impl == 'reduce_window':
    return jax.lax.reduce_window(squares, 0.0, jax.lax.add,
                                 window_dimensions=(1,) * (squares.ndim - 1) + (size,),
                                 window_strides=(1,) * squares.ndim, padding=pad)
  padded = jnp.pad(squares, pad)
  return sum(jax.lax.slice_in_dim(padded, i, i + squares.shape[-1], axis=-1) for i in range(size))


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
    if x.shape[-1] % self.groups or self.features % self.groups:  # AlexNet keeps them multiples
      raise ValueError(f'groups={self.groups} must divide the {x.shape[-1]} input and '
                       f'{self.features} output channels of {self.name}.')
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    y = conv_towers(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
                    padding=self.padding, groups=self.groups, impl=self.group_impl,
                    space_to_depth=self.space_to_depth)
    return y + bias.astype(self.dtype)


def gather_towers(x: jax.Array, axis_name: str) -> jax.Array:
  """Every tower's channels (last axis, tower 0 first), each from the device that runs it (inside
  a shard_map manual over `axis_name`): the exchange where a layer reads both towers. Its gradient
  is a reduce-scatter: that layer holds a different part of its kernels on each device, so each
  device's cotangent is its part's contribution, and they add up."""
  return jax.lax.all_gather(x, axis_name, axis=x.ndim - 1, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_whole(x: jax.Array, axis_name: str) -> jax.Array:
  """`gather_towers` for a value every device then uses in the same whole computation (the logits,
  or a layer not split over the devices): its cotangent is the same on every device, so each
  keeps its own slice of it and nothing travels back (a reduce-scatter would add it up once per
  device)."""
  return gather_towers(x, axis_name)


def _gather_whole_bwd(axis_name: str, _: None, cotangent: jax.Array) -> tuple[jax.Array]:
  size = cotangent.shape[-1] // jax.lax.axis_size(axis_name)
  return (jax.lax.dynamic_slice_in_dim(cotangent, jax.lax.axis_index(axis_name) * size, size,
                                       axis=cotangent.ndim - 1),)


gather_whole.defvjp(lambda x, axis_name: (gather_towers(x, axis_name), None), _gather_whole_bwd)


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on NHWC: bin i spans [floor(i*H/out), ceil((i+1)*H/out))."""
  def pool_axis(x, axis, out):
    size = x.shape[axis]
    bins = [jnp.mean(jax.lax.slice_in_dim(x, (i * size) // out, -(-(i + 1) * size // out),
                                          axis=axis), axis=axis, keepdims=True)
            for i in range(out)]
    return jnp.concatenate(bins, axis=axis)
  return pool_axis(pool_axis(x, 1, output_size[0]), 2, output_size[1])
