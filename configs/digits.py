"""The offline default: scikit-learn's bundled handwritten digits (real data).

1,797 8x8 grey images, a stratified 80/20 train/test split (1,437 / 360), a
CIFAR-style ResNet-20 through the same training loop as CIFAR-10 (pad-1 random
crop, no flips: digits are not mirror-symmetric). A few minutes on 2 CPU cores.
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.model = "resnet20"
    c.dataset = "digits"
    c.crop_padding = 1
    c.random_flip = False
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_train_steps = 1_200
    c.learning_rate = 0.1
    c.lr_boundaries = (600, 900)
    c.weight_decay = 1e-4
    c.log_every_steps = 50
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    return c
