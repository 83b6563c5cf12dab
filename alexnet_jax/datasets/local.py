"""The base of our builders: sets made from files on this machine, built without TFDS's chatter."""

from __future__ import annotations

import logging

from alexnet_jax.quiet_tf import tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS announces every build on stdout ('Downloading and preparing dataset Unknown size ...',
  'Dataset ... downloaded and prepared to ...'); ours download nothing, and a prepared set says
  where it is itself (alexnet_jax/datasets/prepared.py)."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class _ByDesign(logging.Filter):
  """TFDS warns that each of our builders has a config of its own (by design: it names the set
  by its source and options) and, the first time a set is built, that its folder has no
  dataset_info.json yet."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg not in ('Using custom data configuration: %s', 'Variant folder %s has no %s')


logging.getLogger('absl').addFilter(_ByDesign())
