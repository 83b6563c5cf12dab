"""Makes `import tensorflow` print what it prints on CPUs with AVX-512 VNNI/BF16 or AMX, on any CPU.

On such CPUs TensorFlow 2.21 writes these records straight to file descriptor 2 while it loads,
once from each of two libraries, whatever TF_CPP_MIN_LOG_LEVEL says. conftest.py puts this folder
on every test subprocess's PYTHONPATH, so a command that lets TensorFlow's start-up reach the user
fails its test on every machine, not only on those CPUs. `CHATTY_TENSORFLOW_ERROR=1` adds an
error record, which must still reach the user.
"""

import importlib.abc
import os
import sys

_NOTICE = b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n'
_ONEDNN = (b'I0000 00:00:1796459839.421874    4643 port.cc:153] oneDNN custom operations are on. '
           b'You may see slightly different numerical results due to floating-point round-off '
           b'errors from different computation orders. To turn them off, set the environment '
           b'variable `TF_ENABLE_ONEDNN_OPTS=0`.\n')
_CPU = (b'I0000 00:00:1796459839.452113    4643 cpu_feature_guard.cc:227] This TensorFlow binary '
        b'is optimized to use available CPU instructions in performance-critical operations.\n'
        b'To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in '
        b'other operations, rebuild TensorFlow with the appropriate compiler flags.\n')
_ERROR = b'E0000 00:00:1796459839.461234    4643 example.cc:42] a real error while loading\n'


class _Chatty(importlib.abc.MetaPathFinder):
  """Writes the records when `tensorflow` starts loading; the real finders then load it."""

  def find_spec(self, name, path, target=None):
    del path, target
    if name == 'tensorflow':
      os.write(2, _NOTICE + _ONEDNN + _CPU + _NOTICE + _ONEDNN)
      if os.environ.get('CHATTY_TENSORFLOW_ERROR') == '1':
        os.write(2, _ERROR)
    return None


sys.meta_path.insert(0, _Chatty())
