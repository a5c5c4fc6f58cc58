"""MLPerf Training's ResNet-50 v1.5 reference with LARS (quality target 75.9%
top-1 on the ImageNet validation set).

Source: mlcommons/training, ``image_classification/README_tensorflow2.md``
(the reference's TPU-v3-64 command, batch 4096) and
``image_classification/tensorflow2/lars_util.py`` (its schedule):

    --optimizer=LARS --batch_size=4096 --base_learning_rate=10.0 --warmup_epochs=5
    --train_epochs=42 --lr_schedule=polynomial --label_smoothing=0.1
    --weight_decay=0.0002 --momentum=0.9 --lars_epsilon=0 --num_replicas=64

- LARS (``lars_optimizer.py``): trust coefficient (``eeta``) 0.001, momentum
  0.9; BatchNorm parameters and biases (its ``skip_list``) get neither the
  trust ratio nor weight decay; its trust ratio ``eeta * |w| / (|g| + wd * |w|)``
  (recipe.lars, not optax.lars, which divides by ``|g + wd * w|``).
- The schedule (``PolynomialDecayWithWarmup``): linear warm-up to 10.0 over 5
  epochs, then power-2 polynomial decay to 0.0001 over ``train_steps -
  warmup_steps + 1`` steps.
- BatchNorm over each replica's share: 4096 images on 64 replicas, 64 each:
  ``bn_groups=64`` here (ghost BatchNorm of 64 images), whatever the device
  count.
- The v1.5 network with the reference's input: 224 random-resized crops and
  flips; evaluation on the 224 centre crop of the image resized to 256.
  The reference also uses its own (bounding-box) distortion; the crop here is
  the Inception-style one without boxes.
"""

from configs.imagenet import get_config as paper_config


def get_config():
    c = paper_config()
    c.model = "resnet50"
    c.variant = "v1.5"
    c.batch_size = 4096
    c.optimizer = "lars"
    c.learning_rate = 10.0  # --base_learning_rate=10.0 at batch 4096
    c.lars_trust_coefficient = 0.001
    c.lars_eps = 0.0
    c.momentum = 0.9
    c.weight_decay = 2e-4
    c.lr_schedule = "polynomial"
    c.lr_end_value = 1e-4
    c.lr_power = 2.0
    c.num_train_steps = 0
    c.num_epochs = 42.0
    c.warmup_steps = 0
    c.warmup_epochs = 5.0
    c.eval_every_steps = 0
    c.eval_every_epochs = 4.0  # MLPerf evaluates every 4 epochs
    c.checkpoint_every_steps = 0
    c.checkpoint_every_epochs = 1.0
    c.label_smoothing = 0.1
    c.bn_groups = 64
    c.train_crop = "random_resized"
    # The reference runs --dtype=fp32; --config.dtype=bfloat16 trains faster on GPUs and TPUs.
    c.dtype = "float32"
    return c
