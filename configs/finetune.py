"""Fine-tuning on few labels: digits 5-9 from a network trained on digits 0-4.

    python train.py --config configs/digits.py --workdir runs/digits_0to4 \
        --config.classes='(0, 1, 2, 3, 4)'
    python train.py --config configs/finetune.py --workdir runs/finetune_5to9 \
        --config.init_from=runs/digits_0to4

The digits recipe (ResNet-20) on the classes 5..9 (relabelled 0..4) with 10
training examples per class, from ``init_from``'s weights (a resnet_jax
workdir or converted torchvision/timm/transformers weights) with a new
classifier; without ``init_from`` the same run trains from scratch. A short
schedule for 50 examples: batch 16, 300 steps, lr 0.05 /10 at 150 and 225.
``--config.freeze_backbone=True`` (with ``freeze_bn_stats=True``: a linear
probe), ``--config.backbone_lr_multiplier=0.1``: see docs/weights.md#fine-tuning.
"""

from configs import digits


def get_config():
    c = digits.get_config()
    c.classes = (5, 6, 7, 8, 9)
    c.train_examples_per_class = 10
    c.finetune_new_head = True
    c.batch_size = 16
    c.num_train_steps = 300
    c.learning_rate = 0.05
    c.lr_boundaries = (150, 225)
    c.log_every_steps = 50
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    return c
