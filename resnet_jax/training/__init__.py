"""Training: the pure steps, the recipe, the checks, the experiment and the loop.

* :mod:`~resnet_jax.training.steps`: ``TrainState``, ``train_step``,
  ``eval_step`` (pure; importable without orbax or TensorFlow).
* :mod:`~resnet_jax.training.recipe`: the model, optimizer, schedule, mesh and
  first state from a config.
* :mod:`~resnet_jax.training.checks`: every check of a config, run before any work.
* :mod:`~resnet_jax.training.experiment`: what a run builds once, the step
  runners, restore-or-init.
* :mod:`~resnet_jax.training.loop`: ``train_and_evaluate`` and its parts.
* :mod:`~resnet_jax.training.checkpoints`, :mod:`~resnet_jax.training.runtime`
  (lock, metric writer, signals), :mod:`~resnet_jax.training.finetune`,
  :mod:`~resnet_jax.training.workdir` (the workdir's layout).

Nothing is imported here, so that ``resnet_jax.training.steps`` loads without
the orbax and TensorFlow that the loop's modules need.
"""
