"""The paper's ablations: each of its tricks switched off, one at a time.

    python -m alexnet_jax.sweep --config=configs/default.py --sweep=configs/sweeps/ablation.py \
        --workdir=runs/ablation --seeds=3

Full model; without LRN (§3.3); non-overlapping 2x2/2 pooling (§3.4); without PCA lighting (§4.1);
without dropout (§4.2); §3.2's one-GPU net (one tower with half the kernels: model.variant=
'paper_one_gpu', the paper's comparison); and one tower that keeps every kernel (groups 1, not in
the paper). `experiments/ablation.py` runs this and sets the numbers next to the paper's.
"""

ABLATIONS = {  # row label -> overrides
    'full model': {},
    'no LRN': {'model.lrn': False},
    'non-overlapping pooling': {'model.overlapping_pool': False},
    'no PCA lighting': {'dataset.lighting': False},
    'no dropout': {'model.dropout_rate': 0.0},
    'one GPU (half the kernels)': {'model.variant': 'paper_one_gpu', 'model.groups': 1},
    'one tower, all kernels': {'model.groups': 1},
}


def get_sweep() -> list[dict]:
  return list(ABLATIONS.values())
