"""The seam every entry point goes through: what a config builds, and what a workdir holds.

`build(config, num_classes)` makes everything a config implies: the devices' layout
(`parallel.Parallel`), the model (`models.from_config`), the optimiser and the plateau rule
(`optim`), the preprocessing (`preprocess.Preprocess`), the initial train state, and the steps of
alexnet_jax/steps.py wrapped for the devices. `load(workdir, step)` reads a run directory (a
training run's, or convert_torchvision's): its config.json, the experiment that config builds, one
checkpoint's parameters (checked against the model) and the class names. train, evaluate, predict,
benchmark, convert_torchvision, pca_stats and the tests use nothing else to make these.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import optax

from alexnet_jax import checkpoints, models, optim, steps
from alexnet_jax import workdir as workdir_lib
from alexnet_jax.errors import ConfigError
from alexnet_jax.parallel import MODEL_AXIS, Parallel
from alexnet_jax.preprocess import Preprocess

# What an evaluation may take from a --config that differs from the run's config.json (where the
# data is, how it is batched and on which devices): any other field of `model` or of the eval
# preprocessing would score another model than the one trained.
EVAL_PINNED = ('model.', 'dataset.image_size', 'dataset.mean', 'dataset.std', 'dataset.pca_stats')
# Except: layer implementations (the same output) and the number of classes (the checkpoint's fc8
# decides it; evaluate checks it against the data).
EVAL_FREE = tuple(f'model.{field}:' for field in models.IMPLS) + ('model.num_classes:',)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything one config implies. The wrapped steps are built (not compiled) on first use."""

  config: ml_collections.ConfigDict
  parallel: Parallel
  model: models.AlexNet
  tx: optax.GradientTransformation
  plateau: optax.GradientTransformationExtraArgs
  pre: Preprocess

  def init_state(self, params: Any = None) -> steps.TrainState:
    """The train state on the host: parameters drawn from `config.seed`, or `params`."""
    return jax.device_get(steps.create_train_state(
        self.model, self.tx, self.plateau, self.pre.image_size, self.config.seed, params))

  @property
  def device_model(self) -> models.AlexNet:
    """The model as each device runs it inside the wrapped steps: whole, or with model_parallel
    > 1 one tower per device, exchanging maps over the mesh's model axis."""
    if self.parallel.model_parallel == 1:
      return self.model
    return self.model.clone(tower_axis=MODEL_AXIS)

  @functools.cached_property
  def train_step(self) -> Callable:
    """(device state, batch) -> (state, metrics); the state's buffers are donated."""
    return self.parallel.wrap(functools.partial(
        steps.train_step, model=self.device_model, tx=self.tx, mean=self.pre.mean,
        std=self.pre.std), updates_state=True)

  @functools.cached_property
  def eval_step(self) -> Callable:
    """(device params, batch) -> sums of errors and loss over the global batch."""
    return self.parallel.wrap(functools.partial(
        steps.eval_step, model=self.device_model, mean=self.pre.mean, std=self.pre.std))

  @functools.cached_property
  def plateau_step(self) -> Callable:
    """(device state, {'val_error'}) -> (state with the plateau rule fed, {})."""
    return self.parallel.wrap(functools.partial(steps.plateau_step, plateau=self.plateau),
                              updates_state=True)


def build(config: ml_collections.ConfigDict, num_classes: int | None = None,
          devices: list[jax.Device] | None = None) -> Experiment:
  """The experiment `config` describes, for `num_classes` (None: `model.num_classes`, which then
  must be set) on `devices` (None: all). Every option is checked here, before anything compiles."""
  if num_classes is None:
    num_classes = config.model.num_classes
    if num_classes < 1:
      raise ConfigError(f'model.num_classes={num_classes}: this command has no data set to take '
                        f'the number of classes from; set --config.model.num_classes.')
  model = models.from_config(config.model, num_classes)
  pre = Preprocess.from_config(config.dataset)
  models.check_image_size(model, pre.image_size)
  parallel = parallel_of(config, devices)
  models.check_model_parallel(model, parallel.model_parallel)
  return Experiment(config=config, parallel=parallel, model=model,
                    tx=optim.make_optimizer(config.optimizer),
                    plateau=optim.make_plateau(config.optimizer), pre=pre)


def parallel_of(config: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> Parallel:
  """The devices' layout `config` asks for."""
  return Parallel(config.parallelism, devices, config.model_parallel)


def check(config: ml_collections.ConfigDict) -> None:
  """`build`'s checks, before the data (and so the number of classes) is known."""
  build(config, config.model.num_classes if config.model.num_classes > 0 else 2)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One checkpoint of a run directory, with the experiment its config builds."""

  experiment: Experiment
  step: int
  params: Any  # numpy arrays
  class_names: list[str] | None  # None: the directory has none


def load(workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None,
         flag: str = '--workdir') -> Checkpoint:
  """Checkpoint `step` (None: the newest) of `workdir`, in the experiment of its config.json, or
  of `config` if it only differs from that in where the data is and how it is batched
  (`EVAL_PINNED`); `flag` is how the command names the directory."""
  workdir_lib.check_readable(workdir, flag)
  step, params = checkpoints.restore_params(workdir, step)
  stored = workdir_lib.read_config(workdir, flag)
  if config is None:
    config = stored
  else:
    check_same_model(stored, config, workdir)
  experiment = build(config, num_classes=params['fc8']['bias'].shape[0])
  checkpoints.check_param_shapes(
      params, models.abstract_params(experiment.model, experiment.pre.image_size),
      f'checkpoint {step} of {workdir}', f'its {workdir_lib.CONFIG} does not describe it')
  return Checkpoint(experiment, step, params, workdir_lib.read_class_names(workdir))


def check_same_model(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     workdir: str) -> None:
  """Refuses a `config` that would build another model or preprocessing than the run's."""
  changed = [change for change in workdir_lib.differences(stored, config)
             if change.startswith(EVAL_PINNED) and not change.startswith(EVAL_FREE)]
  if changed:
    raise ConfigError(
        f'--config changes what {workdir} was trained as ({", ".join(changed[:3])}'
        f'{", ..." if len(changed) > 3 else ""}); drop --config to use its '
        f'{workdir_lib.CONFIG}, or override only where the data is and how it is batched.')
