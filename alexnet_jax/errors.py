"""Errors the user can act on, and how a run tells whoever started it how it ended.

The CLIs print the one-line message of these errors and exit non-zero: 1 for a `ConfigError` or
a `TrainingStopped` (the config itself is the cause: running it again fails again), and
`EXIT_INTERRUPTED` for an `Interrupted` (a cause outside the config: the same command resumes
once it is cleared). A run stopped by a signal exits 0 and prints a line that begins with
`STOPPED`; the sweep and search launchers (alexnet_jax/launchers.py) read these three classes
as *failed*, *interrupted* and *stopped*.
"""

# sysexits.h's EX_TEMPFAIL, "a temporary failure ... the user is invited to retry".
EXIT_INTERRUPTED = 75
STOPPED = 'Stopped by '  # the start of the line a run stopped by a signal prints last


class ConfigError(ValueError):
  """A bad input (config value, data set, workdir) detected before any long computation."""


class TrainingStopped(RuntimeError):
  """Training cannot go on because of its config (e.g. a non-finite loss with
  train.on_nonfinite='stop')."""


class Interrupted(RuntimeError):
  """Training cannot go on for a reason outside its config (a full disk, the workdir held by
  another run); its checkpoints are intact and the same command resumes it."""
