import json
import subprocess
import sys

import pytest

from alexnet_jax import benchmark
from configs import benchmark as benchmark_config
from experiments import gpu_report
from conftest import REPO

# The real CLI on the smallest case; the child reports whether TensorFlow got imported.
CHILD = """
import runpy, sys
sys.argv = ['benchmark'] + sys.argv[1:]
try:
  runpy.run_module('alexnet_jax.benchmark', run_name='__main__')
except SystemExit as e:
  assert not e.code, e.code
print('TENSORFLOW_IMPORTED', 'tensorflow' in sys.modules)
"""


def test_cli_times_the_train_step_without_tensorflow(tmp_path):
  rows_path, table_path = tmp_path / 'rows.jsonl', tmp_path / 'table.md'
  out = subprocess.run(
      [sys.executable, '-c', CHILD, '--config=configs/benchmark.py',
       '--config.dataset.image_size=63', '--config.model.width=0.25', '--config.model.num_classes=10',
       '--config.benchmark.modes=("jit",)', '--config.benchmark.dtypes=("float32",)',
       '--config.benchmark.batch_sizes=(4,)', '--config.benchmark.search=("lrn_impl=shifted",)',
       '--config.benchmark.warmup_steps=0', '--config.benchmark.timed_steps=1',
       '--config.benchmark.repeats=1', f'--json={rows_path}', f'--markdown={table_path}'],
      cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'TENSORFLOW_IMPORTED False' in out.stdout
  rows = [json.loads(line) for line in open(rows_path)]
  stages = [(r['stage'], r['batch_dtype']) for r in rows]
  assert stages == [('baseline', 'uint8'), ('search lrn_impl=shifted', 'uint8'),
                    ('float32 batch', 'float32')]
  assert rows[1]['impl'] == 'group=towers lrn=shifted pool=reduce_window conv1=plain'
  best = max(rows[:2], key=lambda r: r['images_per_second'])
  assert rows[2]['impl'] == best['impl']  # the baseline is the winner on a float32 batch
  for r in rows:
    assert r['framework'] == 'jax' and r['wrapper'] == 'jit' and r['batch_size'] == 4
    assert r['images_per_second'] > 0 and r['device'] == 'cpu' and r['peak_fraction'] is None
    assert r['tflops'] == pytest.approx(r['images_per_second'] * r['flop_per_image'] / 1e12)
  assert open(table_path).read().count('| jax | jit |') == 3
  report_path = tmp_path / 'report.md'
  out = subprocess.run([sys.executable, 'experiments/gpu_report.py', f'--rows={rows_path}',
                        f'--markdown={report_path}'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  table = open(report_path).read()
  assert table.count('| jax | jit |') == 3
  assert ('float32 batch 256, best JAX: not measured (no JAX and no torch eager float32 row)'
          in table)
  assert 'uint8 batch normalised and lit on the device (jit, float32, batch 4): ' in table
  assert '% of the step (goal <= 2%)' in table


def row(framework, wrapper, dtype, images_per_second, batch_size=256):
  return benchmark.make_row(framework=framework, wrapper=wrapper, impl='x', dtype=dtype,
                            batch_size=batch_size, seconds_per_step=batch_size / images_per_second,
                            flop_per_image=4.35e9, compile_s=1.0, device='NVIDIA H100 80GB HBM3',
                            num_devices=1)


def test_ratios_use_the_best_measured_rows():
  rows = [row('torch', 'compile', 'bfloat16', 20_000), row('torch', 'eager', 'float32', 8_000),
          row('torch', 'eager', 'bfloat16', 9_000), row('jax', 'jit', 'bfloat16', 50_000),
          row('jax', 'pmap', 'bfloat16', 40_000), row('jax', 'jit', 'bfloat16', 90_000, 512),
          row('jax', 'jit', 'float32', 12_000)]
  lines = gpu_report.ratios(rows)
  assert lines[0].startswith('bfloat16 batch 256, best JAX: JAX 50,000 img/s (jit, x)')
  assert lines[0].endswith('= 2.50x (target >= 2.0x)')
  assert lines[1].startswith('bfloat16 batch 256, pmap') and '= 2.00x (target' in lines[1]
  assert lines[2].startswith('bfloat16 batch 256, jit') and '= 2.50x (target' in lines[2]
  assert lines[3].endswith('= 1.50x (target >= 1.5x)')
  assert gpu_report.ratios(rows[3:])[0].endswith('not measured (no torch.compile row)')


def test_report_refuses_a_missing_file_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, 'experiments/gpu_report.py', f'--rows={tmp_path}/no.jsonl'],
                       cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert f'--rows: {tmp_path}/no.jsonl does not exist.' in out.stderr


def test_peak_and_achieved_flops():
  r = row('jax', 'jit', 'bfloat16', 50_000)
  assert r['tflops'] == pytest.approx(217.5)
  assert r['peak_fraction'] == pytest.approx(217.5 / 989.4)
  assert benchmark.peak_bf16_tflops('NVIDIA H100 PCIe') == 756.0
  assert benchmark.peak_bf16_tflops('NVIDIA H200') == 989.4
  assert benchmark.peak_bf16_tflops('cpu') is None
  assert '| jax | jit | x | bfloat16 | 256 | float32 | 50,000 | 5.12 | 217.5 | 22.0 | 1.0 |' in (
      benchmark.format_table([r]))


@pytest.mark.parametrize('field,value,message', [
    ('search', ('lrn_impl=fused',), "benchmark.search item 'lrn_impl=fused'"),
    ('modes', ('pjit',), 'benchmark.modes'),
    ('grid', 'all', "benchmark.grid='all' is unknown"),
    ('batch_sizes', (), 'benchmark.batch_sizes is empty'),
])
def test_bad_benchmark_config_fails_before_compiling(field, value, message):
  config = benchmark_config.get_config()
  config.benchmark[field] = value
  with pytest.raises(ValueError, match=message):
    benchmark.check(config)


def test_one_at_a_time_grid_starts_with_the_headline():
  b = benchmark_config.get_config().benchmark
  assert benchmark.grid(b) == [('jit', 'bfloat16', 256), ('pmap', 'bfloat16', 256),
                               ('jit', 'float32', 256), ('jit', 'bfloat16', 128),
                               ('jit', 'bfloat16', 512)]
  b.grid = 'product'
  assert len(benchmark.grid(b)) == 12 and benchmark.grid(b)[0] == ('jit', 'bfloat16', 256)
