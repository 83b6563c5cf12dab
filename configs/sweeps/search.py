"""A search space: learning rate x weight decay, both log-uniform, on the digits demo.

    python -m alexnet_jax.sweep --config=configs/default.py --sweep=configs/sweeps/search.py \
        --workdir=runs/search --search=random --trials=9 --early_stop=asha \
        --config.train.num_epochs=9

experiments/results/search_digits.md: this search with ASHA against the same 9 configs trained
to the end.
"""

from alexnet_jax.search import log_uniform


def get_sweep() -> dict:
  return {'optimizer.learning_rate': log_uniform(1e-3, 1e-1),
          'optimizer.weight_decay': log_uniform(1e-5, 1e-2)}
