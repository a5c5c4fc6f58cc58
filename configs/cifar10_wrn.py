"""Wide ResNet-28-10 on CIFAR-10 (Zagoruyko and Komodakis, *Wide Residual
Networks*, BMVC 2016): ``wrn28_10`` by default, ``--config.model=wrn16_8``,
dropout between the convolutions with ``--config.dropout_rate``.

What is taken from where. The values are those of the authors' PyTorch code,
which says it reproduces their Lua code exactly
(github.com/szagoruyko/wide-residual-networks, ``pytorch/main.py``):

* batch 128; SGD, momentum 0.9 (not Nesterov), weight decay 5e-4 on every
  parameter; learning rate 0.1, multiplied by 0.2 at epochs 60, 120 and 160 of
  200 (``--epoch_step [60,120,160] --lr_decay_ratio 0.2 --epochs 200``);
* horizontal flips and 32x32 random crops of the image padded by 4 pixels.
* The networks: ``resnet_jax.models.table`` (pre-activation basic blocks of
  16k/32k/64k filters, 1x1 projections where the shape changes).
* Dropout is off, as in that code; the paper's dropout runs are
  ``--config.dropout_rate=0.3``, a value not checked against its text here.

The epochs are steps of this trainer: CIFAR-10's 50,000 training images make
390 full batches of 128 an epoch (the last, partial one is dropped), so 200
epochs are 78,000 steps and the decays fall at steps 23,400, 46,800 and 62,400.

Where this recipe differs from that code: its crops pad with reflections of
the image and it normalises each channel with CIFAR-10's mean and standard
deviation; the pipeline here pads with zeros and subtracts the per-pixel mean,
as the ResNet paper's CIFAR recipe (``configs/cifar10.py``) does.
"""

from configs import cifar10

STEPS_PER_EPOCH = 50_000 // 128


def get_config():
    c = cifar10.get_config()
    c.model = "wrn28_10"
    c.batch_size = 128
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4
    c.lr_schedule = "step"
    c.lr_decay_factor = 0.2
    c.lr_boundaries = tuple(e * STEPS_PER_EPOCH for e in (60, 120, 160))
    c.num_train_steps = 200 * STEPS_PER_EPOCH
    c.dropout_rate = 0.0
    return c
