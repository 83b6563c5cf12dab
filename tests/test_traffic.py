import collections
import json
import os
import subprocess
import sys

from alexnet_jax import traffic
from conftest import REPO

def devices_env(n):
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}


# Lines of compiled HLO as XLA writes them (explicit and iota replica groups, async pairs, tuples).
HLO = '''
  %all_gather.15 = f32[8,3,3,64]{2,1,0,3} all-gather(%x), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={3}, use_global_device_ids=true, metadata={op_name="jit(laid_out)/shard_map/jvp(AlexNet)/conv3_input/all_gather"}
  %reduce_scatter.31 = f32[8,3,3,32]{2,1,0,3} reduce-scatter(%y), channel_id=1, replica_groups=[2,2]<=[4], use_global_device_ids=true, dimensions={3}, to_apply=%r, metadata={op_name="jit(laid_out)/shard_map/transpose(jvp(AlexNet))/conv3_input/reduce_scatter"}
  %all-reduce.1 = (f32[1024,5]{1,0}, /*index=1*/f32[5]{0}) all-reduce(%a, %b), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), use_global_device_ids=true, to_apply=%s, metadata={op_name="jit(laid_out)/shard_map/psum"}
  %ags = (f32[4,512]{1,0}, f32[8,512]{1,0}) all-gather-start(%z), channel_id=3, replica_groups={{0,1},{2,3}}, dimensions={0}, use_global_device_ids=true
  %agd = f32[8,512]{1,0} all-gather-done(%ags)
  %pmin.7 = s32[] all-reduce(%f), channel_id=4, replica_groups={{0},{1},{2},{3}}, to_apply=%m
  %everyone = bf16[16]{0} all-reduce(%g), channel_id=5, replica_groups={}, to_apply=%m
  %fusion.2 = f32[8,512]{1,0} fusion(%all-gather.3), kind=kLoop, calls=%fused
  %collective-permute.4 = f32[8,1,5,64]{3,2,1,0} collective-permute(%h), channel_id=6, source_target_pairs={{0,1},{2,3}}, metadata={op_name="jit(laid_out)/shard_map/jvp(AlexNet)/conv2/conv_general_dilated"}
  %collective-permute.5 = f32[8]{0} collective-permute(%k), channel_id=7, source_target_pairs={{0,0},{1,1}}
  %all-to-all.6 = f32[2,4]{1,0} all-to-all(%l), channel_id=8, replica_groups={{0,1},{2,3}}, dimensions={0}, metadata={op_name="jit(laid_out)/transpose(jvp(AlexNet/conv4))/all_to_all"}
'''


def test_collectives_reads_axes_stages_and_bytes_from_hlo():
  found = traffic.collectives(HLO, (2, 2))
  assert [(c.kind, c.axis, c.where, c.stage, c.group_size, c.bytes_sent) for c in found] == [
      ('all-gather', 'model', 'conv3_input', 'forward', 2, 8 * 9 * 64 * 4 // 2),
      ('reduce-scatter', 'model', 'conv3_input', 'backward', 2, 8 * 9 * 32 * 4),
      ('all-reduce', 'batch', 'psum', 'step', 2, 2 * (1024 * 5 + 5) * 4 // 2),
      ('all-gather', 'model', '?', 'step', 2, 8 * 512 * 4 // 2),  # the result, not the operand
      ('all-reduce', 'mixed', '?', 'step', 4, 2 * 16 * 2 * 3 // 4),  # {} = every device
      ('collective-permute', 'model', 'conv2', 'forward', 2, 8 * 5 * 64 * 4),  # a halo
      ('all-to-all', 'model', 'all_to_all', 'backward', 2, 2 * 4 * 4 // 2)]
  assert traffic.model_axis_exchanges(found) == collections.Counter({
      ('all-gather', 'conv3_input', 'forward'): 1, ('reduce-scatter', 'conv3_input', 'backward'): 1,
      ('all-gather', '?', 'step'): 1, ('collective-permute', 'conv2', 'forward'): 1,
      ('all-to-all', 'all_to_all', 'backward'): 1})


def test_cli_shows_the_papers_traffic_on_two_by_two_devices(tmp_path):
  """2 replicas x the two towers: on the model axis exactly the paper's exchanges (conv3's and
  fc6-fc8's inputs, both ways; the logits; the finite flag), nothing at conv1/2/4/5, no halos;
  across replicas only the gradients' mean."""
  rows = tmp_path / 'traffic.jsonl'
  out = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.benchmark', '--config=configs/default.py', '--traffic',
       f'--json={rows}', '--config.parallelism=jit', '--config.model_parallel=2',
       '--config.model.num_classes=10', '--config.model.width=0.25',
       '--config.dataset.image_size=63', '--config.train.batch_size=16'],
      env=devices_env(4), cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  found = [traffic.Collective(**json.loads(line)) for line in rows.read_text().splitlines()]
  assert traffic.model_axis_exchanges(found) == traffic.PAPER_MODEL_AXIS
  assert {(c.axis, c.kind, c.where) for c in found if c.axis != 'model'} == {
      ('batch', 'all-reduce', 'psum')}
  conv3 = next(c for c in found if c.where == 'conv3_input' and c.kind == 'all-gather')
  assert conv3.shape.startswith('f32[8,3,3,64]') and conv3.bytes_sent == 8 * 3 * 3 * 32 * 4
  assert "the paper's pattern, exactly" in out.stdout
  assert '2 replicas x model_parallel=2 on 4 CPU devices' in out.stdout


def test_a_layers_exchange_added_or_removed_breaks_the_pattern():
  """The paper's table with conv4 reading both towers adds its input's all-gather and
  reduce-scatter; with conv3 reading its own tower, conv3's go: either way the compiled step is no
  longer the paper's (tests/traffic_check.py compiles both on 2 devices)."""
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'traffic_check.py')],
                       env=devices_env(2), cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  changed = json.loads(out.stdout.strip().splitlines()[-1])
  assert sorted(changed) == ['conv3_own_tower', 'conv4_reads_both']
  for change, layer in (('conv4_reads_both', 'conv4'), ('conv3_own_tower', 'conv3')):
    measured = collections.Counter({tuple(row[:3]): row[3] for row in changed[change]})
    assert measured != traffic.PAPER_MODEL_AXIS, change
    differs = (measured - traffic.PAPER_MODEL_AXIS) + (traffic.PAPER_MODEL_AXIS - measured)
    assert differs == collections.Counter({('all-gather', f'{layer}_input', 'forward'): 1,
                                           ('reduce-scatter', f'{layer}_input', 'backward'): 1})
