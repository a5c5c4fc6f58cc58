"""Image operations of the host pipeline (TensorFlow, stateless: every random
draw is a function of a seed tensor derived from the step).

The ImageNet geometry is public so that tests and benchmarks can hold it
against torchvision's: :func:`imagenet_train_window` (the paper's scale
augmentation or the Inception-style crop, as a window of source pixels),
:func:`imagenet_train`, :func:`center_crop` and :func:`imagenet_eval`
(torchvision's ``Resize`` + ``CenterCrop``/``TenCrop`` sizes and offsets),
:func:`resize_shorter`. TensorFlow is imported inside each function: this
module is imported by code that runs where TensorFlow is not configured yet.
"""

from __future__ import annotations

from resnet_jax.errors import UserError

# ImageNet training crops (config.train_crop): the paper's scale augmentation,
# or the Inception-style random-resized crop.
TRAIN_CROPS = ("scale", "random_resized")


def normalize(image, mean):
    """The one mean subtraction of every path.

    ``image``: (..., H, W, C) uint8 or float32 pixels on the 0..255 scale;
    ``mean``: (H, W, C) or (C,) on the 0..1 scale. Returns float32 on the 0..1
    scale minus ``mean``.
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.cast(image, tf.float32) / 255.0 - mean


def pad_crop_flip(image, seed, pad: int, flip: bool):
    """The paper's CIFAR augmentation: pad by ``pad`` pixels, random crop back
    to (H, W, C), random horizontal flip. ``seed``: (2,) int64; dtype kept."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w, c = image.shape
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if pad:
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, (h, w, c), seed=s1)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=s2)
    return image


def resized_shape(shape, size: int):
    """(new_h, new_w) float64 of an image of ``shape`` (H, W, ...) resized to
    shorter side ``size``: torchvision's ``Resize(size)`` (the longer side
    truncated, ``int(size * long / short)``)."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    size = tf.cast(size, tf.float64)  # an int or a (random) scalar tensor
    taller = w <= h
    new_h = tf.where(taller, tf.floor(size * h / w), size)
    new_w = tf.where(taller, size, tf.floor(size * w / h))
    return new_h, new_w


def resize_shorter(image, size):
    """(H, W, C) float32 resized (bilinear, antialiased) to shorter side ``size``
    pixels, to torchvision's ``Resize(size)`` shape."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    new_h, new_w = resized_shape(tf.shape(image), size)
    new = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


def imagenet_train_window(shape, seed, config):
    """The source-pixel window ``(top, left, height, width)`` int32 of one
    training crop, and the flip draw (bool), for an image of ``shape`` (H, W, ...).

    ``config.train_crop``:

    * ``"scale"`` (the paper's): the random ``image_size`` square crop of the
      image rescaled to shorter side ``s`` uniform in ``train_scale_range``
      pixels is, in source pixels, a square of side
      ``image_size * shorter / s`` at a uniform offset: the same distribution
      as resize-then-crop, without resizing the whole image.
    * ``"random_resized"`` (Inception-style): area uniform in [0.08, 1] of the
      image, aspect ratio log-uniform in [3/4, 4/3]
      (``tf.image.stateless_sample_distorted_bounding_box``; the whole image
      when 10 draws do not fit).

    ``seed``: (2,) int64; the draws are a pure function of it.
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)
    s1, s2, s3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    flip = tf.random.stateless_uniform([], s3) < 0.5
    crop_kind = train_crop(config)
    if crop_kind == "random_resized":
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.stack([h, w, 3]),
            bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
            seed=s1,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.stack([begin[0], begin[1], size[0], size[1]]), flip
    lo, hi = config.train_scale_range
    size = tf.random.stateless_uniform([], s1, minval=lo, maxval=hi + 1, dtype=tf.int32)
    shorter = tf.minimum(h, w)
    side = tf.cast(tf.math.round(int(config.image_size) * shorter / size), tf.int32)
    side = tf.clip_by_value(side, 1, shorter)
    u = tf.random.stateless_uniform([2], s2)
    top_left = tf.cast(
        tf.floor(u * tf.cast(tf.stack([h - side + 1, w - side + 1]), tf.float32)), tf.int32
    )
    top_left = tf.minimum(top_left, tf.stack([h - side, w - side]))
    return tf.stack([top_left[0], top_left[1], side, side]), flip


def train_crop(config) -> str:
    kind = config.train_crop
    if kind not in TRAIN_CROPS:
        raise UserError(f"train_crop={kind!r}; valid: {', '.join(TRAIN_CROPS)}.")
    return kind


def decode_window(encoded, window, size: int):
    """Decodes only ``window`` (top, left, height, width) of JPEG bytes
    ``encoded`` as RGB (greyscale expanded) and resizes it (bilinear,
    antialiased) to (size, size, 3) float32 on the 0..255 scale."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), "bilinear", antialias=True)
    return tf.ensure_shape(image, (size, size, 3))


def imagenet_train(encoded, seed, config):
    """One training crop of JPEG bytes ``encoded``: the window of
    :func:`imagenet_train_window` decoded, resized to ``image_size`` and
    flipped: (S, S, 3) float32 on the 0..255 scale. ``seed``: (2,) int64."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    window, flip = imagenet_train_window(tf.image.extract_jpeg_shape(encoded), seed, config)
    image = decode_window(encoded, window, int(config.image_size))
    return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def center_offsets(new_h, new_w, crop: int):
    """torchvision's ``CenterCrop``: top and left ``round((size - crop) / 2)``
    (half to even, as Python's ``round``), float64."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.math.round((new_h - crop) / 2.0), tf.math.round((new_w - crop) / 2.0)


def center_crop(encoded, resize: int, crop: int):
    """The ``crop`` centre square of JPEG bytes ``encoded`` resized to shorter
    side ``resize`` (torchvision's ``Resize`` + ``CenterCrop`` geometry),
    decoding only the window the crop's resampling reads.

    The window is resampled with the scale and offset of the whole-image
    resize (``ScaleAndTranslate``, the antialiased triangle kernel of
    ``tf.image.resize``), so the crop equals resize-then-crop to float
    rounding, not just to the nearest source pixel. (crop, crop, 3) float32
    on the 0..255 scale.
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    shape = tf.image.extract_jpeg_shape(encoded)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    new_h, new_w = resized_shape(shape, resize)
    top, left = center_offsets(new_h, new_w, crop)
    scale = tf.stack([new_h / h, new_w / w])
    # The kernel reaches max(1, 1/scale) source pixels beyond the crop's edge.
    one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
    margin = tf.math.ceil(tf.maximum(one, one / scale)) + one
    start = tf.maximum(zero, tf.floor(tf.stack([top, left]) / scale) - margin)
    stop = tf.minimum(
        tf.stack([h, w]), tf.math.ceil((tf.stack([top, left]) + crop) / scale) + margin
    )
    window = tf.cast(tf.concat([start, stop - start], 0), tf.int32)
    image = tf.cast(tf.image.decode_and_crop_jpeg(encoded, window, channels=3), tf.float32)
    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=tf.constant([crop, crop], tf.int32),
        scale=tf.cast(scale, tf.float32),
        translation=tf.cast(start * scale - tf.stack([top, left]), tf.float32),
        kernel_type="triangle",
        antialias=True,
    )
    return tf.ensure_shape(out[0], (crop, crop, 3))


def eval_crop_size(config) -> int:
    """The evaluation crop: ``eval_image_size``, or ``image_size`` when it is 0."""
    return int(config.get("eval_image_size", 0) or config.image_size)


def imagenet_eval(encoded, config):
    """The center crop of JPEG bytes ``encoded`` as (S, S, 3), the crop of the
    image resized to shorter side ``eval_resize`` (only the window it reads is
    decoded); or the paper's 10 crops (4 corners + center, and their flips) as
    (10, S, S, 3), decoded once; float32 on the 0..255 scale, S =
    :func:`eval_crop_size` (``eval_image_size``, or ``image_size`` when 0).
    Sizes and offsets follow torchvision's ``Resize``, ``CenterCrop`` and
    ``TenCrop``."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    crop, resize = eval_crop_size(config), int(config.eval_resize)
    if not config.ten_crop:
        return center_crop(encoded, resize, crop)
    image = tf.cast(tf.io.decode_jpeg(encoded, channels=3), tf.float32)
    image = resize_shorter(image, resize)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = center_offsets(tf.cast(h, tf.float64), tf.cast(w, tf.float64), crop)
    top, left = tf.cast(top, tf.int32), tf.cast(left, tf.int32)
    center = image[top : top + crop, left : left + crop]
    crops = [
        image[:crop, :crop],
        image[:crop, w - crop :],
        image[h - crop :, :crop],
        image[h - crop :, w - crop :],
        center,
    ]
    crops = crops + [tf.image.flip_left_right(c) for c in crops]
    return tf.ensure_shape(tf.stack(crops), (10, crop, crop, 3))
