"""A modern ImageNet recipe (what current ResNet-50 baselines use, not the paper's).

v1.5 bottlenecks, zero-initialised last BatchNorm of each block, bfloat16
compute, Nesterov SGD, learning rate 0.1 per 256 images scaled linearly with
the batch, 5 epochs of linear warm-up then cosine decay over 90 epochs, label
smoothing 0.1, no weight decay on BatchNorm and biases, random-size crops as in
the paper's scale augmentation.
"""

from configs.imagenet import get_config as paper_config

IMAGENET_TRAIN_SIZE = 1_281_167


def get_config():
    c = paper_config()
    c.variant = "v1.5"
    c.zero_init_residual = True
    c.dtype = "bfloat16"
    c.batch_size = 1024
    c.learning_rate = 0.1
    c.lr_batch_base = 256
    c.lr_schedule = "cosine"
    steps_per_epoch = IMAGENET_TRAIN_SIZE // c.batch_size
    c.num_train_steps = 90 * steps_per_epoch
    c.warmup_steps = 5 * steps_per_epoch
    c.nesterov = True
    c.label_smoothing = 0.1
    c.weight_decay = 5e-5
    c.weight_decay_exclude_bn_bias = True
    c.eval_every_steps = 5 * steps_per_epoch
    c.checkpoint_every_steps = steps_per_epoch
    return c
