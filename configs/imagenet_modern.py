"""A modern ImageNet recipe (what current ResNet-50 baselines use, not the paper's).

v1.5 bottlenecks, zero-initialised last BatchNorm of each block, bfloat16
compute, Nesterov SGD, learning rate 0.1 per 256 images scaled linearly with
the batch, 5 epochs of linear warm-up then cosine decay over 90 epochs, label
smoothing 0.1, no weight decay on BatchNorm and biases, Inception-style
random-resized crops (8-100% of the area, aspect 3/4 to 4/3). The schedule is
in epochs (90, 5 of warm-up), resolved into steps for the batch size of the
run, so ``--config.batch_size=4096`` alone rescales it.
"""

from configs.imagenet import get_config as paper_config


def get_config():
    c = paper_config()
    c.variant = "v1.5"
    c.zero_init_residual = True
    c.dtype = "bfloat16"
    c.batch_size = 1024
    c.learning_rate = 0.1
    c.lr_batch_base = 256  # 0.1 per 256 images, scaled with the batch at run time
    c.lr_schedule = "cosine"
    # In epochs: the trainer turns them into steps for the batch size it runs.
    c.num_train_steps = 0
    c.num_epochs = 90.0
    c.warmup_steps = 0
    c.warmup_epochs = 5.0
    c.eval_every_steps = 0
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 0
    c.checkpoint_every_epochs = 1.0
    c.train_crop = "random_resized"
    c.nesterov = True
    c.label_smoothing = 0.1
    c.weight_decay = 5e-5
    c.weight_decay_exclude_bn_bias = True
    return c
