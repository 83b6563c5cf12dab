"""Errors the user can act on. The CLIs print their one-line message and exit non-zero."""


class ConfigError(ValueError):
  """A bad input (config value, data set, workdir) detected before any long computation."""


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss with train.on_nonfinite='stop')."""
