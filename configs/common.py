"""Keys shared by every recipe; each config file overrides what it needs."""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Model
    c.model = "resnet20"
    c.num_classes = 0  # 0: the dataset's number of classes
    c.variant = "v1"  # 'v1' (paper) or 'v1.5' (stride in the bottleneck 3x3)
    c.shortcut = config_dict.placeholder(str)  # None: A for CIFAR nets, B for ImageNet nets
    c.zero_init_residual = False
    # Stochastic depth (Huang et al. 2016): the last block drops its residual
    # branch with this probability, earlier ones linearly less (as timm); its
    # randomness is a function of (seed, step), so resumes stay exact.
    c.drop_path_rate = 0.0
    c.dropout_rate = 0.0  # dropout between each block's convolutions (wide ResNets)
    c.bn_momentum = 0.9  # PyTorch momentum 0.1
    c.bn_epsilon = 1e-5
    # >1: training BatchNorm statistics over this many equal groups of the batch
    # (ghost BatchNorm); a multiple of the device count keeps them on each device.
    c.bn_groups = 1
    c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
    # Store each activation in training through rj.materialize (an identity XLA
    # does not fuse across). None: the trainer turns it on for CPU devices,
    # where it is faster (BENCHMARKS.md), and off elsewhere.
    c.materialize = config_dict.placeholder(bool)
    # Data
    c.dataset = "cifar10"
    c.data_dir = config_dict.placeholder(str)  # tfds data_dir (None: ~/tensorflow_datasets)
    c.mock_data = False  # the real tfds code path on tfds.testing.mock_data
    c.mock_num_examples = 64
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 200
    c.augment = True
    c.validation_split = 0  # >0: hold out the end of the training split for evaluation
    # '': the recipe's evaluation split (ImageNet validation, CIFAR test);
    # else a tfds split such as 'validation[:10000]' or 'train[:5000]'.
    c.eval_split = ""
    c.crop_padding = 4  # in-memory datasets: pad, random crop back
    c.random_flip = True
    # ImageNet-style file datasets
    c.image_size = 224  # the random (train) and centre (eval) crop
    c.train_scale_range = (256, 480)  # shorter side before the training crop
    c.eval_resize = 256  # shorter side before the eval crop
    c.eval_image_size = 0  # the eval crop (0: image_size; torchvision's V2 recipe: 224 after 176)
    c.ten_crop = False  # the paper's 10-crop testing
    # ImageNet training crop: 'scale' (the paper's: shorter side uniform in
    # train_scale_range, then a random crop) or 'random_resized' (Inception-style:
    # 8-100% of the area, aspect 3/4 to 4/3). Only the crop window is decoded.
    c.train_crop = "scale"
    c.shuffle_buffer = 16_384
    # Host batches are copied to the devices this many steps ahead on a
    # background thread (0: on the training thread, between steps).
    c.prefetch_batches = 2
    # True: the training batches are a function of (seed, step), so a resumed
    # run is bit-exact on CPU. False: tf.data yields files and examples in
    # completion order, which keeps a busy host from stalling on one slow
    # JPEG; every example still gets its own seeded augmentation and each
    # uninterrupted epoch sees every example once, but the batches are not
    # reproducible, and a resume within an epoch may repeat or skip some of
    # that epoch's examples.
    c.deterministic_input = True
    # The fast path for in-memory datasets: training set and augmentation on the
    # devices, steps_per_call train steps per host call (lax.scan).
    c.device_data = False
    c.steps_per_call = 1
    # Optimisation
    c.num_train_steps = 64_000
    # Schedules in epochs, resolved into steps at run time from the actual
    # batch size and training-set size; each is used only where its step key
    # is 0 (so one --config.batch_size= override rescales the whole recipe).
    c.num_epochs = 0.0  # with num_train_steps = 0
    c.warmup_epochs = 0.0  # with warmup_steps = 0
    c.eval_every_epochs = 0.0  # with eval_every_steps = 0
    c.checkpoint_every_epochs = 0.0  # with checkpoint_every_steps = 0
    c.learning_rate = 0.1
    c.lr_batch_base = 0  # >0: learning rate scaled by batch_size / lr_batch_base
    c.lr_schedule = "step"  # 'step', 'cosine' or 'polynomial' (MLPerf's LARS decay)
    c.lr_end_value = 0.0  # 'polynomial': the rate it decays to
    c.lr_power = 2.0  # 'polynomial': the power of its decay
    c.lr_boundaries = (32_000, 48_000)
    c.lr_decay_factor = 0.1
    c.warmup_steps = 0
    c.warmup_learning_rate = 0.01  # constant warm-up value for the 'step' schedule
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.weight_decay_exclude_bn_bias = False
    c.label_smoothing = 0.0
    # 'sgd' (the paper's), 'lars' (MLPerf's: no trust ratio or weight decay on
    # BatchNorm and biases), 'lamb' or 'adamw', each from optax.
    c.optimizer = "sgd"
    c.lars_trust_coefficient = 0.001
    c.lars_eps = 0.0
    c.adam_b1 = 0.9  # lamb and adamw
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    # >1: batch_size (one update's global batch) is split into this many
    # interleaved micro-batches (examples j, j+k, ...) whose mean gradient makes
    # the update: the same losses as bn_groups=k on the batch reordered micro-batch
    # by micro-batch, with a micro-batch's activations.
    c.grad_accum_steps = 1
    # >0: an exponential moving average of the parameters and BatchNorm
    # statistics, updated every ema_every_steps steps with this decay (per
    # update); as torchvision's, the first update and every update in the
    # warm-up (warmup_steps) copy the weights. Evaluation reports both models.
    c.ema_decay = 0.0
    c.ema_every_steps = 1
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), as timm's Mixup
    # in 'batch' mode, on the devices inside the train step: with probability
    # mix_prob a batch is mixed with its reverse, by CutMix with probability
    # mix_switch_prob when both alphas are set; labels mix (after smoothing).
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    c.mix_prob = 1.0
    c.mix_switch_prob = 0.5
    # Per-image augmentation of the host pipelines (ImageNet, CIFAR, digits):
    # '', 'randaugment' or 'trivialaugment' (TrivialAugment-wide), as torchvision's.
    c.auto_augment = ""
    c.randaugment_num_ops = 2
    c.randaugment_magnitude = 9
    # torchvision's RandomErasing(p=random_erasing): one rectangle of 2-33% of
    # the image, aspect 0.3-3.3, set to 0 after normalisation (the mean pixel).
    c.random_erasing = 0.0
    # Repeated augmentation (Hoffer et al. 2020; torchvision's and DeiT's
    # RASampler): each training example r times in a row, augmented apart, in
    # the same global batch; an epoch keeps its length (1/r of the examples,
    # r times each). 1: off. Host pipelines only.
    c.repeated_augmentation = 1
    c.skip_nonfinite_steps = False
    # Fine-tuning (resnet_jax/finetune.py, configs/finetune.py)
    # A resnet_jax workdir (its newest checkpoint's params and batch_stats) or a
    # torchvision/timm/transformers weights file or directory to start from on a
    # fresh start; ignored when the workdir already has a checkpoint (a resume).
    c.init_from = config_dict.placeholder(str)
    # True: always a freshly initialised classifier ('head'); False: a new one
    # only where its shape differs (another num_classes), else the loaded one.
    c.finetune_new_head = False
    # True: init_from a workdir's EMA weights (a run with ema_decay > 0).
    c.init_from_ema = False
    # BatchNorm in inference mode while training: it normalises with the
    # running statistics and leaves them unchanged.
    c.freeze_bn_stats = False
    # Zero updates (weight decay included) for every parameter but the head.
    c.freeze_backbone = False
    c.backbone_lr_multiplier = 1.0  # the backbone's learning rate is this times the head's
    # digits only: the labels to keep, relabelled 0..k-1 in this order
    # (empty: all ten).
    c.classes = ()
    # digits only: the first N training examples of each class in an order
    # shuffled by train_subset_seed (0: all); the test split is never cut.
    c.train_examples_per_class = 0
    c.train_subset_seed = 0
    # Bookkeeping
    c.seed = 0
    c.log_every_steps = 100
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3
    return c
