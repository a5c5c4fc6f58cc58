"""torchvision's V2 recipe for ResNet-50 (``ResNet50_Weights.IMAGENET1K_V2``:
80.858% top-1, 95.434% top-5, as torchvision's weights table states).

Sources: the recipe linked from those weights' ``meta["recipe"]``
(https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621) and
the blog post "How to Train State-Of-The-Art Models Using TorchVision's
Latest Primitives" (Vryniotis, 2021), whose command is

    torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5
      --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear
      --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002
      --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0
      --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4

and the defaults of torchvision's ``references/classification/train.py``
(``--model-ema-steps 32``, ``--model-ema-decay 0.99998``,
``--lr-warmup-decay 0.01``). What differs here, and why:

- the EMA decay: torchvision rescales its per-step decay to one update every
  32 steps as ``alpha = min(1, (1 - 0.99998) * world_size * batch_size *
  ema_steps / epochs)`` and ``decay = 1 - alpha``; with 8 x 128 images,
  32 steps and 600 epochs that is the ``ema_decay`` below (per update);
- the warm-up starts at 0, not at ``0.01 * lr`` (this trainer's cosine
  warm-up); over 5 epochs the difference is 1% of the first step's rate;
- repeated augmentation (``--ra-sampler --ra-reps 4``): the four copies of
  an example are consecutive examples of one global batch, where
  torchvision's ``RASampler`` deals them to four of its eight GPUs at the same
  step; with ``bn_groups`` set, a group's BatchNorm statistics then see each
  image four times;
- the training crop's resize is bilinear without antialiasing (tf.image),
  torchvision's ``RandomResizedCrop`` on PIL images antialiases.
"""

from configs.imagenet import get_config as paper_config

# torchvision's train.py defaults and the recipe's world size x batch.
_TV_EMA_DECAY, _TV_EMA_STEPS, _TV_BATCH, _TV_EPOCHS = 0.99998, 32, 8 * 128, 600


def get_config():
    c = paper_config()
    c.model = "resnet50"
    c.variant = "v1.5"  # torchvision's ResNet-50 is v1.5
    c.batch_size = _TV_BATCH
    c.learning_rate = 0.5  # --lr 0.5 at batch 1024 (8 x 128)
    c.lr_schedule = "cosine"
    c.num_train_steps = 0
    c.num_epochs = float(_TV_EPOCHS)
    c.warmup_steps = 0
    c.warmup_epochs = 5.0  # --lr-warmup-epochs 5 --lr-warmup-method linear
    c.eval_every_steps = 0
    c.eval_every_epochs = 10.0
    c.checkpoint_every_steps = 0
    c.checkpoint_every_epochs = 1.0
    c.momentum = 0.9  # train.py's default
    c.weight_decay = 2e-5  # --weight-decay 0.00002
    c.weight_decay_exclude_bn_bias = True  # --norm-weight-decay 0.0 (biases: the fc's too)
    c.label_smoothing = 0.1
    c.mixup_alpha = 0.2
    c.cutmix_alpha = 1.0
    c.mix_prob = 1.0  # torchvision's RandomChoice of RandomMixup / RandomCutmix, p=1.0
    c.mix_switch_prob = 0.5
    c.auto_augment = "trivialaugment"  # --auto-augment ta_wide
    c.random_erasing = 0.1  # --random-erase 0.1
    c.repeated_augmentation = 4  # --ra-sampler --ra-reps 4
    c.ema_every_steps = _TV_EMA_STEPS
    c.ema_decay = 1.0 - min(1.0, (1.0 - _TV_EMA_DECAY) * _TV_BATCH * _TV_EMA_STEPS / _TV_EPOCHS)
    c.train_crop = "random_resized"  # RandomResizedCrop(176)
    c.image_size = 176  # --train-crop-size 176 (and the eval crop's, below)
    c.train_scale_range = (176, 176)  # unused by random_resized; must be >= image_size
    c.eval_image_size = 224  # ImageClassification(crop_size=224, resize_size=232)
    c.eval_resize = 232  # --val-resize-size 232
    return c
