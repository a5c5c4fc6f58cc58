"""The paper's ImageNet recipe (Sec. 3.4).

Batch 256, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by
10 "when the error plateaus": here a fixed schedule standing in for it, at 150k,
300k and 450k iterations of 600k (the paper trains "for up to 60 x 10^4
iterations"). Scale augmentation (shorter side uniform in [256, 480]), random
224x224 crop, horizontal flip, mean subtraction; evaluation on the 224 center
crop of the image resized to 256 on its shorter side, or with
``--config.ten_crop=True`` the paper's 10-crop testing.

ImageNet must be prepared for tfds first (see docs/training.md#preparing-imagenet).
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.model = "resnet50"
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.train_scale_range = (256, 480)
    c.eval_resize = 256
    c.ten_crop = False
    c.shuffle_buffer = 16_384
    c.batch_size = 256
    c.eval_batch_size = 200
    c.num_train_steps = 600_000
    c.learning_rate = 0.1
    c.lr_boundaries = (150_000, 300_000, 450_000)
    c.weight_decay = 1e-4
    c.momentum = 0.9
    c.log_every_steps = 200
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 5_000
    return c
