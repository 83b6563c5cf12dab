import dataclasses
import hashlib
import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import layers, models
from alexnet_jax.errors import ConfigError
from conftest import REPO


def lrn_reference(a, size=5, k=2.0, alpha=1e-4, beta=0.75):
  """The paper's formula, written as a loop over channels."""
  n_ch = a.shape[-1]
  out = np.empty_like(a)
  for i in range(n_ch):
    lo, hi = max(0, i - size // 2), min(n_ch - 1, i + size // 2)
    s = np.sum(a[..., lo:hi + 1] ** 2, axis=-1)
    out[..., i] = a[..., i] / (k + alpha * s) ** beta
  return out


def test_lrn_matches_formula():
  a = np.random.default_rng(0).normal(scale=30.0, size=(2, 3, 4, 11)).astype(np.float32)
  np.testing.assert_allclose(layers.local_response_norm(jnp.asarray(a)), lrn_reference(a),
                             rtol=1e-5, atol=1e-6)


def tower_lrn_reference(a, groups, **kwargs):
  """Each of `groups` equal channel blocks normalised alone (the paper's towers)."""
  return np.concatenate([lrn_reference(t, **kwargs) for t in np.split(a, groups, axis=-1)], -1)


@pytest.mark.parametrize('groups', [1, 2, 3])
@pytest.mark.parametrize('impl', layers.LRN_IMPLS)
def test_lrn_implementations_match_formula(impl, groups):
  a = np.random.default_rng(0).normal(scale=30.0, size=(2, 3, 4, 12)).astype(np.float32)
  lrn = lambda **kwargs: layers.local_response_norm(jnp.asarray(a), impl=impl, groups=groups,
                                                    **kwargs)
  np.testing.assert_allclose(lrn(), tower_lrn_reference(a, groups), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lrn(beta=0.6), tower_lrn_reference(a, groups, beta=0.6),
                             rtol=1e-5, atol=1e-6)
  if groups > 1:  # the window stops at the tower edges: not the same as one window over all
    assert not np.allclose(lrn(), lrn_reference(a), rtol=1e-4)


def conv1_after_lrn(model, variables, x):
  """conv1's output after its ReLU and (if the model has it) LRN, before pooling."""
  _, state = jax.jit(lambda v: model.apply(v, x, train=False, mutable=['intermediates']))(variables)
  return np.asarray(state['intermediates']['rows'][0][0])


def test_lrn_scope_normalises_conv1_within_each_tower():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 63, 63, 3)), jnp.float32)
  model = models.AlexNet(num_classes=10, width=0.25, groups=2, init_std=0.5)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, train=False))()
  relu = conv1_after_lrn(model.clone(lrn=False), variables, x)  # 24 maps, 12 per tower
  assert relu.max() > 30  # big enough that LRN changes them
  tower = conv1_after_lrn(model, variables, x)
  every = conv1_after_lrn(model.clone(lrn_scope='all'), variables, x)
  np.testing.assert_allclose(tower, tower_lrn_reference(relu, 2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(every, lrn_reference(relu), rtol=1e-5, atol=1e-5)
  assert not np.allclose(tower, every, rtol=1e-4)


def shapes(model, side):
  return {name: (out, pooled) for name, out, pooled, _ in models.layer_table(model, side)}


def test_paper_feature_maps_at_224():
  s = shapes(models.AlexNet(), 224)
  assert s['conv1'] == ((55, 55, 96), (27, 27, 96))
  assert s['conv2'] == ((27, 27, 256), (13, 13, 256))
  assert s['conv3'][1] == (13, 13, 384) and s['conv4'][1] == (13, 13, 384)
  assert s['conv5'] == ((13, 13, 256), (6, 6, 256))
  assert s['fc8'][1] == (1000,)


def test_demo_side_and_smallest_side():
  model = models.AlexNet(num_classes=10)
  assert models.min_image_size(model) == 63
  assert shapes(model, 63)['conv5'][1] == (1, 1, 256)
  assert shapes(model, 64)['fc8'][1] == (10,)
  with pytest.raises(ValueError, match='at least 63'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 62, 62, 3)), train=False)


def test_non_overlapping_pool_shapes():
  s = shapes(models.AlexNet(overlapping_pool=False), 224)
  assert s['conv1'][1] == (27, 27, 96) and s['conv5'][1] == (6, 6, 256)


@pytest.mark.parametrize('kwargs,total', [
    ({}, 60_965_224),
    ({'groups': 1}, 62_378_344),
    ({'variant': 'torchvision', 'lrn': False, 'groups': 1}, 61_100_840),
])
def test_parameter_counts(kwargs, total):
  assert sum(row[-1] for row in models.layer_table(models.AlexNet(**kwargs), 224)) == total


def test_paper_one_gpu_is_half_the_kernels_in_one_tower():
  """§3.2's comparison net: 48-128-192-192-256 kernels, one tower, fc 4096-4096-1000."""
  # (kernel side, input channels, output channels) of each convolution; conv5's map is 6x6 at 224.
  convs = [(11, 3, 48), (5, 48, 128), (3, 128, 192), (3, 192, 192), (3, 192, 256)]
  dense = [(6 * 6 * 256, 4096), (4096, 4096), (4096, 1000)]
  total = (sum(k * k * cin * cout + cout for k, cin, cout in convs)
           + sum(n_in * n_out + n_out for n_in, n_out in dense))
  assert total == 59_798_312
  model = models.AlexNet(variant='paper_one_gpu', groups=1)
  s = shapes(model, 224)
  assert s['conv1'] == ((55, 55, 48), (27, 27, 48)) and s['conv5'] == ((13, 13, 256), (6, 6, 256))
  assert sum(row[-1] for row in models.layer_table(model, 224)) == total
  out = subprocess.run([sys.executable, '-m', 'alexnet_jax.models', '--variant=paper_one_gpu'],
                       cwd=REPO, check=True, capture_output=True, text=True).stdout
  assert out.splitlines()[0].startswith('AlexNet (paper_one_gpu, groups=1, 1000 classes)')
  assert out.splitlines()[-1].split() == ['total', f'{total:,}']


# sha256 of the parameters below (paper init, seed 0), computed before `model.init` existed: the
# 'paper' init must stay bit-identical (the digits demo and the paper configs use it).
PAPER_INIT_SHA256 = 'b6d1d3483fb326772cd53b46ca541983655e2ba78cc58c99d89afa76de678699'
# Inputs per output of each kernel at 224 (conv2, conv4, conv5: per tower), for He's std.
FAN_IN = {'conv1': 11 * 11 * 3, 'conv2': 5 * 5 * 48, 'conv3': 3 * 3 * 256, 'conv4': 3 * 3 * 192,
          'conv5': 3 * 3 * 192, 'fc6': 6 * 6 * 256, 'fc7': 4096, 'fc8': 4096}


def checksum(params) -> str:
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    digest.update(jax.tree_util.keystr(path).encode() + np.asarray(leaf).tobytes())
  return digest.hexdigest()


@pytest.mark.parametrize('init', models.INITS)
def test_init_values_per_layer(init):
  model = models.AlexNet(num_classes=1000, bias_init=1.0, init_scheme=init)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                      train=False))()['params']
  assert list(params) == list(FAN_IN)
  ones = {'conv2', 'conv4', 'conv5', 'fc6', 'fc7'} if init == 'paper' else set()
  for name, layer in params.items():
    expected_bias = 1.0 if name in ones else 0.0
    np.testing.assert_array_equal(layer['bias'], expected_bias, err_msg=name)
    # paper: N(0, 0.01^2); he: N(0, gain^2 / fan_in), gain^2 = 2 before a ReLU, 1 for fc8.
    std = 0.01 if init == 'paper' else np.sqrt((1.0 if name == 'fc8' else 2.0) / FAN_IN[name])
    kernel = np.asarray(layer['kernel'])
    # >= 34,848 samples a layer: the sample std is within 0.4% (1 SE) of the true one.
    assert abs(kernel.std() / std - 1) < 0.02, (name, kernel.std(), std)
    assert abs(kernel.mean()) < std * 0.05, name
    assert layer['kernel'].dtype == jnp.float32
  if init == 'paper':
    assert checksum(params) == PAPER_INIT_SHA256


def test_width_scales_every_row_and_keeps_towers_even():
  rows = models.layer_table(models.AlexNet(num_classes=10, width=0.25), 224)
  channels = {name: out[-1] for name, out, _, _ in rows}
  # 96/4 = 24, 256/4 = 64, 384/4 = 96 per layer; fc6/fc7 1024; fc8 stays the class count.
  assert channels == {'conv1': 24, 'conv2': 64, 'conv3': 96, 'conv4': 96, 'conv5': 64,
                      'fc6': 1024, 'fc7': 1024, 'fc8': 10}
  odd = models.AlexNet(width=0.1, groups=2)  # 96 * 0.1 = 9.6 -> 10, an even split over 2 towers
  assert all(out[-1] % 2 == 0 for name, out, _, _ in models.layer_table(odd, 224)
             if name.startswith('conv'))
  for width in (0.0, -1.0, 5.0):
    with pytest.raises(ValueError, match=rf'^model.width={width} must be in \(0, 4\]'):
      models.AlexNet(width=width)


def test_unknown_init_fails_before_compiling():
  with pytest.raises(ValueError, match=r"^model.init='xavier' is unknown; use one of"):
    models.AlexNet(init_scheme='xavier')


def test_towers_equal_xla_grouped_conv():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  a = layers.conv_towers(x, k, stride=1, padding=1, groups=2, impl='towers')
  b = layers.conv_towers(x, k, stride=1, padding=1, groups=2, impl='grouped')
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Tower 0 only sees the first half of the input channels.
  x2 = x.at[..., 4:].set(0.0)
  np.testing.assert_allclose(layers.conv_towers(x2, k, stride=1, padding=1, groups=2)[..., :3],
                             a[..., :3], rtol=1e-5, atol=1e-5)


def test_block_diagonal_group_impl_equals_towers():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 6)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 2, 9)), jnp.float32)
  np.testing.assert_allclose(layers.conv_towers(x, k, stride=2, padding=1, groups=3, impl='block'),
                             layers.conv_towers(x, k, stride=2, padding=1, groups=3),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('side,kernel,stride,padding', [(63, 11, 4, 2), (70, 11, 4, 2),
                                                        (224, 11, 4, 2), (9, 3, 2, 0)])
def test_space_to_depth_conv_equals_strided_conv(side, kernel, stride, padding):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, side, side + 1, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  plain = layers.conv_towers(x, k, stride=stride, padding=padding, groups=1)
  s2d = layers.space_to_depth_conv(x, k, stride, padding)
  assert s2d.shape == plain.shape
  np.testing.assert_allclose(s2d, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('window,side', [(3, 13), (3, 55), (2, 12)])
def test_max_pool_slices_equals_reduce_window(window, side):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, side, side + 2, 4)), jnp.float32)
  np.testing.assert_array_equal(layers.max_pool(x, window, 2, 'slices'),
                                layers.max_pool(x, window, 2, 'reduce_window'))


@pytest.mark.parametrize('impls', [
    {'lrn_impl': 'shifted'}, {'lrn_impl': 'banded'}, {'pool_impl': 'slices'},
    {'conv1_impl': 'space_to_depth'}, {'group_impl': 'grouped'}, {'group_impl': 'block'},
    {'lrn_impl': 'banded', 'pool_impl': 'slices', 'conv1_impl': 'space_to_depth',
     'group_impl': 'block'},
    {'lrn_scope': 'all', 'lrn_impl': 'shifted'}, {'lrn_scope': 'all', 'lrn_impl': 'banded'},
])
def test_implementations_keep_the_forward_output(impls):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 67, 67, 3)), jnp.float32)
  plain = models.AlexNet(num_classes=10, init_std=0.05, bias_init=0.1,
                         lrn_scope=impls.get('lrn_scope', 'tower'))
  variables = jax.jit(lambda: plain.init(jax.random.PRNGKey(0), x, train=False))()
  ref = jax.jit(lambda v: plain.apply(v, x, train=False))(variables)
  out = jax.jit(lambda v: plain.clone(**impls).apply(v, x, train=False))(variables)
  assert float(jnp.max(jnp.abs(ref))) > 1.0  # not a degenerate all-zero comparison
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_unknown_implementation_fails_before_compiling():
  with pytest.raises(ValueError, match=r"model.lrn_impl='fused' is unknown"):
    models.AlexNet(lrn_impl='fused').init(jax.random.PRNGKey(0), jnp.zeros((1, 63, 63, 3)),
                                          train=False)


def test_forward_macs_of_the_paper_model():
  assert models.forward_macs(models.AlexNet(), 224) == 724_406_816  # 4.35 GFLOP per trained image
  assert models.forward_macs(models.AlexNet(groups=1), 224) == 1_135_256_096


def test_bfloat16_computation_keeps_float32_params():
  model = models.AlexNet(num_classes=10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 63, 63, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert model.apply(variables, x, train=False).dtype == jnp.float32


def test_dropout_mask_follows_example_id_not_position():
  x = jnp.ones((4, 32))
  rng = jax.random.PRNGKey(3)
  a = layers.per_example_dropout(x, 0.5, rng, jnp.array([10, 11, 12, 13]))
  b = layers.per_example_dropout(x[:2], 0.5, rng, jnp.array([13, 11]))
  np.testing.assert_array_equal(a[3], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert set(np.unique(a).tolist()) == {0.0, 2.0}
  assert not np.array_equal(a[0], a[1])


def test_cli_prints_paper_total():
  out = subprocess.run([sys.executable, '-m', 'alexnet_jax.models'], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  assert '60,965,224' in out.splitlines()[-1]
  assert '55x55x96 -> 27x27x96' in out


def module_fields(model: models.AlexNet) -> dict:
  return {field.name: getattr(model, field.name) for field in dataclasses.fields(model)
          if field.name != 'parent'}


@pytest.mark.parametrize('config_name', ['default', 'torchvision', 'imagenet', 'benchmark'])
def test_from_config_builds_the_configured_module(config_name):
  m = importlib.import_module(f'configs.{config_name}').get_config().model
  # The config's fields spelled out one by one, as train.make_model built the module.
  expected = models.AlexNet(
      num_classes=7, variant=m.variant, lrn=m.lrn, lrn_scope=m.lrn_scope,
      overlapping_pool=m.overlapping_pool, groups=m.groups, width=m.width,
      dropout_rate=m.dropout_rate, init_scheme=m.init,
      bias_init=m.bias_init, init_std=m.init_std, dtype=jnp.dtype(m.dtype),
      group_impl=m.group_impl, lrn_impl=m.lrn_impl, pool_impl=m.pool_impl,
      conv1_impl=m.conv1_impl)
  assert module_fields(models.from_config(m, num_classes=7)) == module_fields(expected)


@pytest.mark.parametrize('config_name,changes,message', [
    ('default', {'lrn_impl': 'nope'},
     "model.lrn_impl='nope' is unknown; use one of ('reduce_window', 'shifted', 'banded')."),
    ('default', {'dtype': 'float16'},
     "model.dtype='float16' is unknown; use one of ('float32', 'bfloat16')."),
    ('default', {'variant': 'vgg'},
     "model.variant='vgg' is unknown; use one of ('paper', 'torchvision', 'paper_one_gpu')."),
    ('default', {'lrn_scope': 'gpu'},
     "model.lrn_scope='gpu' is unknown; use one of ('tower', 'all')."),
    ('default', {'variant': 'paper_one_gpu'},
     "model.variant='paper_one_gpu' has no towers; set --config.model.groups=1."),
    ('torchvision', {'groups': 2},
     "model.variant='torchvision' has no LRN and no towers; set --config.model.lrn=False "
     "--config.model.groups=1 (configs/torchvision.py)."),
    ('default', {'width': 0.0}, "model.width=0.0 must be in (0, 4]; 1 is the paper's network."),
    ('default', {'groups': 0}, 'model.groups=0 must be 1 (one tower) or more.'),
])
def test_from_config_rejects_a_bad_option_in_one_line(config_name, changes, message):
  m = importlib.import_module(f'configs.{config_name}').get_config().model
  m.update(changes)
  with pytest.raises(ConfigError) as e:
    models.from_config(m, num_classes=10)
  assert str(e.value) == message


@pytest.mark.parametrize('fields,model_parallel,message', [
    ({'groups': 1}, 2, 'model_parallel=2 runs one tower per device, but model.groups=1; set '
     '--config.model.groups=2 or --config.model_parallel=1.'),
    ({}, 4, 'model_parallel=4 runs one tower per device, but model.groups=2; set '
     '--config.model.groups=4 or --config.model_parallel=2.'),
    ({'variant': 'torchvision', 'lrn': False, 'groups': 1}, 2,
     "model_parallel=2 runs one tower per device, and model.variant='torchvision' has no towers; "
     "use the paper variant with --config.model.groups=2, or model_parallel=1."),
    ({'lrn_scope': 'all'}, 2, "model.lrn_scope='all' normalises across the towers, which "
     "model_parallel=2 runs on different devices; use model.lrn_scope='tower' (the paper's) or "
     "model_parallel=1."),
    ({'width': 0.3}, 2, 'model.width=0.3 gives fc6 1229 units, which do not split over '
     'model_parallel=2 devices; use a width that gives a multiple of 2.'),
])
def test_model_parallel_needs_one_tower_per_device(fields, model_parallel, message):
  with pytest.raises(ConfigError) as e:
    models.check_model_parallel(models.AlexNet(num_classes=10, **fields), model_parallel)
  assert str(e.value) == message


def test_model_parallel_allows_the_towers_and_whole_classes():
  """The paper's two towers, four towers, and fc8 whole on each device when the classes do not
  split (101 over 2)."""
  for groups, num_classes in ((2, 1000), (4, 10), (2, 101)):
    models.check_model_parallel(models.AlexNet(num_classes=num_classes, groups=groups), groups)
  models.check_model_parallel(models.AlexNet(groups=1, lrn_scope='all'), 1)


def test_module_checks_its_options_when_built():
  with pytest.raises(ConfigError, match=r"^model.dtype='float16' is unknown"):
    models.AlexNet(dtype=jnp.float16)
  with pytest.raises(ConfigError, match=r"^model.variant='torchvision' has no LRN"):
    models.AlexNet(variant='torchvision', groups=1)  # lrn=True by default


def test_check_image_size_names_the_setting():
  model = models.AlexNet(num_classes=10)
  models.check_image_size(model, 63)
  with pytest.raises(ConfigError) as e:
    models.check_image_size(model, 62)
  assert str(e.value) == 'dataset.image_size=62 is too small for this model; use at least 63.'
  with pytest.raises(ConfigError, match=r'^image_size=40 is too small for this model; use at least '
                                        r'63\.$'):
    models.format_table(model, 40)


def test_torchvision_table_shows_the_average_pool():
  model = models.AlexNet(num_classes=10, variant='torchvision', lrn=False, groups=1)
  for side, conv5 in ((63, '1x1x256'), (224, '6x6x256')):
    lines = models.format_table(model, side).splitlines()
    row = [line.split()[0] for line in lines].index('avgpool')
    assert lines[row - 1].split()[0] == 'conv5' and lines[row + 1].split()[0] == 'fc6'
    assert lines[row].split() == ['avgpool', conv5, '->', '6x6x256', '0']
  assert 'avgpool' not in models.format_table(models.AlexNet(num_classes=10), 224)
