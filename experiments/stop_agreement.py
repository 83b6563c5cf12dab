"""What the stop agreement (alexnet_jax/cluster.py, `Stop.at`, asked once a step) costs a step.

    python -m experiments.stop_agreement [--steps=40] [--markdown=experiments/results/stop_agreement.md]

Trains the digits demo (configs/default.py, the paper's network at 64 px, batch 64) for `--steps`
steps, once as one process and once as two local processes (`--coordinator_address`, one CPU
device each), timing every `Stop.at` call of the real loop, and sets that time against the
step's: the loop's wall-clock time per step from the train lines of metrics.jsonl (batch /
images_per_second), the first log interval (compilation) left out. Until a signal, `Stop.at` is a
lock and two dictionary reads; the thread that answers the other processes waits in the
coordination service and costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.report_out import emit


def measure(steps: int, workdir: str, coordinator: str | None, process_id: int) -> dict:
  """One process of a run: its `Stop.at` times (s) and the loop's seconds per step."""
  from alexnet_jax import cluster, train
  from configs import default
  if coordinator:
    cluster.start(coordinator, 2, process_id, False)
  times = []
  at = cluster.Stop.at

  def timed(self, step):
    t = time.perf_counter()
    try:
      return at(self, step)
    finally:
      times.append(time.perf_counter() - t)

  cluster.Stop.at = timed
  config = default.get_config()
  config.train.num_train_steps, config.train.log_every_steps = steps, 10
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f]
  per_step = [config.train.batch_size / l['images_per_second'] for l in lines
              if 'images_per_second' in l][1:]  # the first interval compiles
  return {'at_us': [1e6 * t for t in times[10:]], 'step_s': per_step}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--markdown', default=None)
  parser.add_argument('--process', default=None, help=argparse.SUPPRESS)  # 'ADDRESS,ID,DIR'
  args = parser.parse_args()
  if args.process:  # one of the two processes
    address, pid, workdir = args.process.split(',')
    print(json.dumps(measure(args.steps, workdir, address, int(pid))))
    return
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    one = measure(args.steps, os.path.join(tmp, 'one'), None, 0)
    rows.append(('1 process', one))
    import socket
    with socket.socket() as sock:
      sock.bind(('localhost', 0))
      port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, '-m', 'experiments.stop_agreement',
                               f'--steps={args.steps}',
                               f'--process=localhost:{port},{i},{os.path.join(tmp, "two")}'],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    for i, p in enumerate(procs):
      out, _ = p.communicate()
      assert p.returncode == 0, out
      rows.append((f'2 processes, process {i}', json.loads(out.strip().splitlines()[-1])))
  text = [f'# The stop agreement\'s cost per step\n\n`python -m experiments.stop_agreement '
          f'--steps={args.steps}`: the digits demo (configs/default.py), {args.steps} steps, '
          f'CPU.\n',
          '| run | `Stop.at` median µs | mean µs | max µs | step (median ms) | cost / step |',
          '|---|---|---|---|---|---|']
  for name, r in rows:
    med_at, med_step = statistics.median(r['at_us']), statistics.median(r['step_s'])
    text.append(f'| {name} | {med_at:.1f} | {statistics.mean(r["at_us"]):.1f} | '
                f'{max(r["at_us"]):.1f} | {1e3 * med_step:.0f} | '
                f'{med_at / 1e6 / med_step:.2e} |')
  emit('\n'.join(text), args.markdown)


if __name__ == '__main__':
  main()
