"""Learning rate x weight decay on the digits demo.

    python -m alexnet_jax.sweep --config=configs/default.py --sweep=configs/sweeps/learning_rate.py \
        --workdir=runs/lr_sweep --parallel=2
"""

from alexnet_jax.trials import product


def get_sweep() -> list[dict]:
  return product({'optimizer.learning_rate': [0.005, 0.01, 0.02],
                  'optimizer.weight_decay': [5e-4, 0.0]})
