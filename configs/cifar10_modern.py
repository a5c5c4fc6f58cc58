"""A modern CIFAR-10 recipe for the paper's networks, to compare with the
paper's (``configs/cifar10.py``): the same model, data and 64k iterations of
batch 128, trained as current baselines are.

This is a composition, not one paper's table; each choice and its source:

- cosine decay with 5 epochs of linear warm-up (Loshchilov & Hutter 2017,
  SGDR; Goyal et al. 2017 for the warm-up), Nesterov momentum;
- label smoothing 0.1 (Szegedy et al. 2016);
- CutMix with alpha 1.0 applied to half the batches (Yun et al. 2019, its
  CIFAR setting: ``beta=1.0``, ``cutmix_prob=0.5``);
- an EMA of the weights with decay 0.999 a step, copying the weights during
  the warm-up (torchvision's EMA rule; evaluation reports both models);
- weight decay 5e-4, none on BatchNorm and biases (the common CIFAR value
  for ResNets trained with these regularisers, e.g. the wide-ResNet recipe).
"""

from configs.cifar10 import get_config as paper_config


def get_config():
    c = paper_config()
    c.lr_schedule = "cosine"
    c.learning_rate = 0.1
    c.warmup_steps = 0
    c.warmup_epochs = 5.0
    c.nesterov = True
    c.label_smoothing = 0.1
    c.cutmix_alpha = 1.0
    c.mix_prob = 0.5
    c.ema_decay = 0.999
    c.ema_every_steps = 1
    c.weight_decay = 5e-4
    c.weight_decay_exclude_bn_bias = True
    return c
