"""The paper's CIFAR-10 recipe (Sec. 4.2).

Batch 128, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by
10 at 32k and 48k iterations, stop at 64k; 4-pixel padding + random 32x32 crop
+ horizontal flip; per-pixel mean subtraction. Any CIFAR net by
``--config.model`` (resnet20 ... resnet1202, plainN).

* ``--config.validation_split=5000``: the paper's 45k/5k train/validation split
  (evaluates on the held-out 5k of the training set instead of the test set).
* ``--config.warmup_steps=400``: ResNet-110's warm-up, learning rate 0.01 for
  the first 400 iterations (the paper: "until the training error is below
  80% (about 400 iterations)"; here a fixed count so that resumes are exact).
* ``--config.dataset=cifar100`` for CIFAR-100.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.model = "resnet20"
    c.dataset = "cifar10"
    c.validation_split = 0
    c.crop_padding = 4
    c.random_flip = True
    c.batch_size = 128
    c.eval_batch_size = 200
    c.num_train_steps = 64_000
    c.learning_rate = 0.1
    c.lr_boundaries = (32_000, 48_000)
    c.weight_decay = 1e-4
    c.momentum = 0.9
    c.log_every_steps = 100
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 2_000
    return c
