"""``python -m resnet_jax.export``: see :mod:`resnet_jax.export.cli`."""

from resnet_jax.export.cli import main

main()
