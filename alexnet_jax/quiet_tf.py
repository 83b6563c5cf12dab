"""TensorFlow and TFDS, imported here and nowhere else: quietly, and kept off the accelerators.

    from alexnet_jax.quiet_tf import tf, tfds

On x86 CPUs with AVX-512 VNNI/BF16 or AMX (those of most GPU hosts) `import tensorflow` writes
absl's "All log messages before absl::InitializeLog() is called are written to STDERR" and oneDNN's
"custom operations are on" INFO line straight to file descriptor 2, once from each of two
libraries, whatever TF_CPP_MIN_LOG_LEVEL says. They would come before every error line and at the
start of every run. On CPUs whose oneDNN lacks uint8 kernels (AVX-512 VNNI without AMX) it also
logs, at ERROR level and once per process, "oneDNN supports DT_UINT8 only on platforms with
AVX-512. Falling back to the default Eigen-based implementation" the first time a tf.data graph
holds a uint8 op oneDNN would take: every training run's first batch.

So the import runs with descriptor 2 captured, then meets that once-only notice (a uint8 transpose
in a graph) while still captured, and what was written goes back to stderr without this chatter:
any other warning or error TensorFlow prints while loading still shows. `TF_CPP_MIN_LOG_LEVEL=0`
keeps it all. oneDNN itself stays on where TensorFlow turns it on: turning it off
(TF_ENABLE_ONEDNN_OPTS=0) also silences TensorFlow, but costs the input pipeline 5-12% of its
speed for the same bytes (experiments/results/pipeline_benchmark.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from typing import Iterator

# A C++ log record: absl's notice before its first one, or a line in absl/glog form
# ('I0000 00:00:1796459839.421874    4643 port.cc:153] oneDNN custom operations are on. ...'),
# followed by its continuation lines. INFO records and oneDNN's fallback notice are chatter;
# every other warning and error is kept.
RECORD = re.compile(r'WARNING: All log messages before absl::InitializeLog\(\) is called are '
                    r'written to STDERR\s*$|([IWEF])\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] '
                    r'(oneDNN supports DT_\w+ only on platforms with)?')


def without_chatter(text: str) -> str:
  """`text` written by C++ libraries, less absl's notice and every INFO record (with its
  continuation lines); everything with TF_CPP_MIN_LOG_LEVEL=0."""
  if os.environ.get('TF_CPP_MIN_LOG_LEVEL') == '0':
    return text
  kept, keeping = [], True
  for line in text.splitlines(keepends=True):
    record = RECORD.match(line)
    if record:
      keeping = record.group(1) not in (None, 'I') and not record.group(2)
    if keeping:
      kept.append(line)
  return ''.join(kept)


@contextlib.contextmanager
def start_up_chatter_dropped() -> Iterator[None]:
  """Within it, what C++ libraries write to descriptor 2 and what Python writes to sys.stderr
  are held back; at the end both are written to stderr, the former `without_chatter`."""
  sys.stderr.flush()
  saved, python_stderr = os.dup(2), sys.stderr
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    sys.stderr = io.StringIO()  # Python's own lines (warnings, tracebacks) stay whole
    try:
      yield
    finally:
      python_lines, sys.stderr = sys.stderr.getvalue(), python_stderr
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      sys.stderr.write(without_chatter(held.read().decode(errors='replace')) + python_lines)
      sys.stderr.flush()


with start_up_chatter_dropped():
  import tensorflow as tf
  import tensorflow_datasets as tfds
  # Where oneDNN lacks uint8 kernels, its once-per-process fallback notice comes now.
  tf.function(lambda x: tf.transpose(x, [1, 0]))(tf.zeros([2, 3], tf.uint8))

# TensorFlow only feeds the host; keep it off every accelerator so JAX owns them.
tf.config.set_visible_devices([], 'GPU')

__all__ = ['tf', 'tfds']
