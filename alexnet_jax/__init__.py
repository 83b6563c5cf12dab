"""alexnet_jax: a faithful, fast JAX/Flax reproduction of AlexNet (NIPS 2012)."""
