"""TFDS builders this project owns. Importing this package registers them with TFDS."""

from alexnet_jax.datasets import digits  # noqa: F401  (registers 'digits')
from alexnet_jax.datasets import folder  # noqa: F401  (registers 'folder'; needs dataset.path)
from alexnet_jax.datasets import prepared  # noqa: F401  (registers 'prepared'; any source's R×R squares)
