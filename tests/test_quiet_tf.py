"""TensorFlow's start-up chatter never reaches the user, whatever the CPU; its errors do
(alexnet_jax/quiet_tf.py). Every test subprocess imports a TensorFlow that chatters as it does on
AVX-512 VNNI/AMX CPUs (tests/chatty_tensorflow, put on PYTHONPATH by conftest.py)."""

import os
import subprocess
import sys

from alexnet_jax import quiet_tf
from conftest import REPO

NOTICE = 'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
ONEDNN = 'I0000 00:00:1796459839.421874    4643 port.cc:153] oneDNN custom operations are on.\n'
CPU = ('I1205 08:34:01.452113    4643 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.\n'
       'To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild.\n')
WARNING = 'W0000 00:00:1796459839.455000    4643 loader.cc:7] a warning\n'
ERROR = ('E0000 00:00:1796459839.461234    4643 example.cc:42] a real error\n'
         'with a second line\n')


def python(code: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **env})


def test_the_stand_in_chatters_on_every_cpu():
  """Without quiet_tf the chatter shows, so the tests that look for it can fail here too."""
  out = python('import tensorflow')
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stderr.count('port.cc:153] oneDNN custom operations are on') >= 2
  assert 'absl::InitializeLog()' in out.stderr


def test_importing_through_quiet_tf_prints_only_errors():
  out = python('from alexnet_jax.quiet_tf import tf, tfds; print(int(tf.constant(2)) + 1)',
               CHATTY_TENSORFLOW_ERROR='1')
  assert out.stdout == '3\n'
  assert out.stderr.splitlines() == [
      'E0000 00:00:1796459839.461234    4643 example.cc:42] a real error while loading']


def test_info_records_and_the_notice_are_dropped_warnings_and_errors_kept(monkeypatch):
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '1')
  text = NOTICE + ONEDNN + CPU + WARNING + NOTICE + ONEDNN + ERROR + CPU
  assert quiet_tf.without_chatter(text) == WARNING + ERROR
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '0')  # asked for INFO: everything
  assert quiet_tf.without_chatter(text) == text


def test_held_back_output_comes_back_in_order_without_chatter(capfd, monkeypatch):
  """Descriptor 2 (C++) and sys.stderr (Python: warnings, tracebacks) are both held back."""
  monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
  with quiet_tf.start_up_chatter_dropped():
    os.write(2, (NOTICE + ONEDNN + ERROR + CPU).encode())
    print('a Python warning', file=sys.stderr)
  print('after', file=sys.stderr)
  assert capfd.readouterr().err == ERROR + 'a Python warning\nafter\n'
