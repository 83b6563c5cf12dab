import json
import os
import subprocess
import sys

from alexnet_jax import curves
from conftest import REPO


def write_run(workdir, lrs, duplicate_last=False):
  """A metrics.jsonl like train.py's: 10 steps an epoch, train lines every 5, eval per epoch."""
  os.makedirs(workdir)
  lines = []
  for epoch, lr in enumerate(lrs, 1):
    for step in (10 * epoch - 5, 10 * epoch):
      lines.append({'step': step, 'epoch': step / 10, 'train_loss': 2.0 / step,
                    'train_top1_error': 0.5, 'learning_rate': lr, 'images_per_second': 1.0})
    lines.append({'step': 10 * epoch, 'epoch': float(epoch), 'val_top1_error': 0.5 / epoch,
                  'val_top5_error': 0.1 / epoch, 'val_loss': 1.0, 'learning_rate': lr})
  if duplicate_last:  # a resumed run repeats the steps after its checkpoint
    lines.append({**lines[-1], 'val_top1_error': 0.01})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(l) + '\n' for l in lines)


def test_plot_runs_overlays_runs_and_marks_lr_drops(tmp_path):
  write_run(tmp_path / 'a', [0.01, 0.01, 0.001, 0.001, 0.0001], duplicate_last=True)
  write_run(tmp_path / 'b', [0.02] * 5)
  runs = [curves.read_run(str(tmp_path / d)) for d in 'ab']
  assert [l['step'] for l in runs[0].evals] == [10, 20, 30, 40, 50]
  assert runs[0].evals[-1]['val_top1_error'] == 0.01  # the newest line of a repeated step
  assert runs[0].lr_drops() == [(3.0, 0.001), (5.0, 0.0001)]
  assert runs[1].lr_drops() == []

  fig = curves.plot_runs(runs)
  axes = fig.axes
  assert [ax.get_title() for ax in axes] == ['training loss', 'validation top-1 error',
                                             'validation top-5 error', 'learning rate']
  assert [len(ax.get_lines()) for ax in axes] == [2, 2, 2, 2]  # one line per run in each panel
  assert list(axes[1].get_lines()[1].get_ydata()) == [0.5 / e for e in range(1, 6)]
  lr_marks = axes[3].collections[0].get_offsets().tolist()
  assert lr_marks == [[3.0, 0.001], [5.0, 0.0001]]  # the drops of run a; run b has none
  assert len(axes[3].collections) == 1
  assert axes[1].collections[0].get_offsets().tolist() == [[3.0, 0.5 / 3], [5.0, 0.01]]


def test_plot_cli_writes_png(tmp_path):
  write_run(tmp_path / 'a', [0.01, 0.001])
  write_run(tmp_path / 'b', [0.01, 0.01])
  out = subprocess.run([sys.executable, '-m', 'alexnet_jax.plot', f'--workdir={tmp_path / "a"}',
                        str(tmp_path / 'b'), f'--out={tmp_path / "c.png"}'],
                       cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'c.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert (tmp_path / 'c.png').stat().st_size > 10_000
  (tmp_path / 'empty').mkdir()
  missing = subprocess.run([sys.executable, '-m', 'alexnet_jax.plot', str(tmp_path / 'empty')],
                           cwd=REPO, capture_output=True, text=True)
  assert missing.returncode != 0
  assert missing.stderr.strip() == (f'error: {tmp_path / "empty" / "metrics.jsonl"} does not '
                                    f'exist; pass the --workdir of a training run or of a sweep.')


def test_plot_cli_draws_every_trial_of_a_sweep(tmp_path):
  sweep = tmp_path / 'sweep'  # as python -m alexnet_jax.sweep leaves it
  write_run(sweep / 'model.lrn=False', [0.01, 0.001])
  write_run(sweep / 'base', [0.01, 0.01])
  (sweep / 'results.csv').write_text('')
  (sweep / 'not_started').mkdir()
  write_run(tmp_path / 'single', [0.02])
  out = subprocess.run([sys.executable, '-m', 'alexnet_jax.plot', str(sweep),
                        str(tmp_path / 'single')], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == f'wrote {sweep / "curves.png"}'
  assert (sweep / 'curves.png').stat().st_size > 10_000
  runs = curves.read_runs([str(sweep), str(tmp_path / 'single')])
  assert [r.workdir for r in runs] == [str(sweep / 'base'), str(sweep / 'model.lrn=False'),
                                       str(tmp_path / 'single')]
  legend = curves.plot_runs(runs).axes[0].get_legend().get_texts()
  assert [t.get_text() for t in legend] == ['base', 'model.lrn=False', 'single']


def test_tail_reads_appends_and_rereads_a_rewound_log(tmp_path):
  """A Tail read after each change of a live run's log equals read_run of it (but for the train
  lines before the last, with only_last_train): lines appended, a line written in parts, a log
  rewritten atomically (a resumed run; as long as it was) or cut."""
  from alexnet_jax import workdir
  run_dir, path = tmp_path / 'a', tmp_path / 'a' / 'metrics.jsonl'
  tail, last = curves.Tail(str(run_dir)), curves.Tail(str(run_dir), only_last_train=True)
  assert tail.read() == last.read() == curves.Run(str(run_dir), [], [])  # not started yet

  def read():
    run, whole = tail.read(), curves.read_run(str(run_dir))
    assert run == whole
    assert last.read() == curves.Run(str(run_dir), whole.train[-1:], whole.evals)
    return [l['step'] for l in run.train], [l['step'] for l in run.evals], run

  def append(text):
    with open(path, 'a') as f:
      f.write(text)

  write_run(run_dir, [0.01, 0.01])
  train, evals, run = read()
  assert (train, evals) == ([5, 10, 15, 20], [10, 20])
  assert tail.read() is run  # nothing changed: nothing parsed nor built
  lines = path.read_text().splitlines(keepends=True)
  eval_30 = json.dumps({'step': 30, 'epoch': 3.0, 'val_top1_error': 0.2, 'val_top5_error': 0.1})
  append(json.dumps({'step': 25, 'epoch': 2.5, 'train_loss': 0.1}) + '\n' + eval_30[:20])
  assert read()[:2] == ([5, 10, 15, 20, 25], [10, 20])  # the eval line being written: not yet
  append(eval_30[20:])  # whole, its newline not yet written
  assert read()[:2] == ([5, 10, 15, 20, 25], [10, 20, 30])
  append('\n' + json.dumps({'step': 20, 'epoch': 2.0, 'val_top1_error': 0.01}) + '\n')
  train, evals, run = read()
  assert evals == [10, 20, 30] and run.evals[1]['val_top1_error'] == 0.01  # the newest wins

  # Resumed from step 10 (workdir.MetricLogger): a new file, here longer than the old one.
  resumed = lines[:2] + [json.dumps({'step': 10, 'epoch': 1.0, 'train_loss': 9.0}) + '\n'] * 50
  workdir.write_atomic(str(path), ''.join(resumed))
  train, evals, run = read()
  assert (train, evals, run.train[-1]['train_loss']) == ([5, 10], [], 9.0)
  with open(path, 'w') as f:  # the same file, cut shorter
    f.write(lines[0].replace('"train_loss": 0.4', '"train_loss": 7.0'))
  train, evals, run = read()
  assert (train, evals, run.train[0]['train_loss']) == ([5], [], 7.0)
  os.remove(path)
  assert tail.read() == last.read() == curves.Run(str(run_dir), [], [])
