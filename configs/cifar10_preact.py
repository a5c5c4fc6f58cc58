"""Pre-activation ResNets on CIFAR-10 (He et al., *Identity Mappings in Deep
Residual Networks*, ECCV 2016): ``preact_resnet164`` by default,
``--config.model=preact_resnet1001`` or ``preact_resnet110`` (basic blocks).

What is taken from where:

* The networks: ``resnet_jax.models.table`` (``preact_resnet164``/``1001``:
  bottlenecks of 16/32/64 base filters, depth 9n + 2, a 1x1 projection without
  BatchNorm reading the pre-activated input where the shape changes, the
  stride in the first 1x1), as the authors' reference code builds them
  (github.com/KaimingHe/resnet-1k-layers, ``resnet-pre-act.lua``).
* Batch 128: the reference code's README says the paper's results were
  obtained with a mini-batch of 128 (its own command uses 64 to fit ResNet-1001
  in memory, ``--config.batch_size=64``).
* Everything else is the paper-1 CIFAR-10 recipe of ``configs/cifar10.py``
  (SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by 10 at 32k
  and 48k iterations, 64k iterations, 4-pixel padding, crops and flips) with
  its 400-iteration warm-up at 0.01, which the paper-1 recipe gives ResNet-110.
  These values are not checked against the 2016b paper's own text here.
"""

from configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.model = "preact_resnet164"
    c.warmup_steps = 400
    c.warmup_learning_rate = 0.01
    return c
