"""RandAugment and TrivialAugment-wide for the host pipeline (TensorFlow,
stateless), as torchvision's ``transforms.RandAugment`` and
``transforms.TrivialAugmentWide`` with their defaults: 31 magnitude bins,
nearest interpolation, fill 0.

:func:`augment` augments one image, its draws (:func:`sample_ops`) a function
of a seed tensor. :func:`apply_op` is one op at a given (signed) magnitude, as
torchvision's ``_apply_op``, and :func:`augmentation_space` the magnitudes of
each op, as its ``_augmentation_space``: both are public so that tests can hold
them against torchvision's. :func:`check` validates the config. TensorFlow is imported
inside each function: this module is imported where TensorFlow is not
configured yet.

The ops follow torchvision's tensor implementations
(``transforms/_functional_tensor.py``). On uint8 images they are exact,
truncations and roundings included, except that a geometric op whose
sampling point falls on a tie between two source pixels (a coordinate at
k + 0.5, up to float32 round-off) may take the other one. A float32 image (the
0..255 scale; values may be fractional) is clipped to [0, 255] and the ops
follow torchvision's float formulas on that scale, without the casts to uint8,
except that Posterize and Equalize, which need integers, round the image to
uint8 first.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from resnet_jax.errors import UserError

# config.auto_augment: none, torchvision's RandAugment, TrivialAugmentWide.
POLICIES = ("", "randaugment", "trivialaugment")
NUM_MAGNITUDE_BINS = 31  # torchvision's default, for both policies

# torchvision's op lists (the same 14 ops in the same order for both policies).
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED_OPS = frozenset(OPS[1:10])  # a random sign flips the magnitude


def check(policy: str, num_ops: int, magnitude: int) -> None:
    """Raises :class:`UserError` for an unknown ``policy`` (config.auto_augment),
    ``num_ops`` < 1 (config.randaugment_num_ops) or ``magnitude`` outside 0..30
    (config.randaugment_magnitude)."""
    if policy not in POLICIES:
        raise UserError(f"auto_augment={policy!r}; valid: '' (none), {', '.join(POLICIES[1:])}.")
    if not _is_int(num_ops) or num_ops < 1:
        raise UserError(f"randaugment_num_ops={num_ops!r}; valid: an integer >= 1.")
    if not _is_int(magnitude) or not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise UserError(
            f"randaugment_magnitude={magnitude!r}; valid: an integer "
            f"0..{NUM_MAGNITUDE_BINS - 1} (a bin of torchvision's {NUM_MAGNITUDE_BINS})."
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _linspace(start: float, end: float, steps: int = NUM_MAGNITUDE_BINS) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32) bit for bit: the first
    half counted up from ``start``, the second down from ``end``, each value
    rounded once (a fused multiply-add)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + step * i
    down = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def augmentation_space(policy: str, height: int, width: int) -> dict:
    """torchvision's ``_augmentation_space`` of ``policy`` for an image of
    ``height`` x ``width``: op name -> (float32 magnitudes, signed). The
    magnitudes are (31,) or, for ops without one, a 0-d 0.0."""
    bins = NUM_MAGNITUDE_BINS
    if policy == "randaugment":
        shear, translate, rotate, enhance, posterize_div = 0.3, None, 30.0, 0.9, 4
    elif policy == "trivialaugment":
        shear, translate, rotate, enhance, posterize_div = 0.99, 32.0, 135.0, 0.99, 6
    else:
        raise ValueError(f"no augmentation space for policy {policy!r}")
    none = np.zeros((), np.float32)
    bits = np.arange(bins, dtype=np.float32) / np.float32((bins - 1) / posterize_div)
    space = {
        "Identity": (none, False),
        "ShearX": (_linspace(0.0, shear), True),
        "ShearY": (_linspace(0.0, shear), True),
        "TranslateX": (_linspace(0.0, translate or 150.0 / 331.0 * width), True),
        "TranslateY": (_linspace(0.0, translate or 150.0 / 331.0 * height), True),
        "Rotate": (_linspace(0.0, rotate), True),
        "Brightness": (_linspace(0.0, enhance), True),
        "Color": (_linspace(0.0, enhance), True),
        "Contrast": (_linspace(0.0, enhance), True),
        "Sharpness": (_linspace(0.0, enhance), True),
        "Posterize": ((8 - np.round(bits)).astype(np.float32), False),
        "Solarize": (_linspace(255.0, 0.0), False),
        "AutoContrast": (none, False),
        "Equalize": (none, False),
    }
    assert tuple(space) == OPS
    return space


def augment(image, seed, policy: str, num_ops: int = 2, magnitude: int = 9):
    """``image`` augmented by ``policy`` (:data:`POLICIES`).

    ``image``: (H, W, C) uint8 or float32 on the 0..255 scale, C = 1 or 3,
    static shape; ``seed``: (2,) int64, every draw a function of it. Returns
    the same shape and dtype. ``"randaugment"``: ``num_ops`` ops drawn uniformly
    with replacement, each at magnitude bin ``magnitude`` (0..30);
    ``"trivialaugment"``: one op, its bin drawn uniformly. A signed op's
    magnitude is negated with probability 1/2. ``""``: the image unchanged.
    Works in graph mode (``tf.data.Dataset.map``): each op is a
    ``tf.switch_case`` over :data:`OPS`, whose branches are XLA-compiled
    (but :data:`UNCOMPILED_OPS` on uint8 images): XLA fuses an op's
    whole-image passes into one loop, 2-3x faster on the CPU than
    TensorFlow's kernels one by one.
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    check(policy, num_ops, magnitude)
    if not policy:
        return image
    image = tf.convert_to_tensor(image)
    _check_image(image)
    return _augment_image(image, sample_ops(seed, policy, num_ops, magnitude), policy)


# On uint8 images the blends (ratio * x + (1 - ratio) * other) stay TensorFlow
# kernels: XLA:CPU contracts a product and a sum into one fused multiply-add,
# which rounds once where torch rounds twice and moves truncated uint8 pixels
# by 1. On float32 images (no truncation) that is a last-bit difference, and
# they are compiled too.
UNCOMPILED_OPS = frozenset({"Brightness", "Color", "Contrast", "Sharpness"})
# Ops that compile their own parts, as more than one XLA program.
SELF_COMPILED_OPS = frozenset({"Equalize"})


@functools.cache
def _op(name: str, exact: bool):
    """Op ``name`` of :data:`OPS` as ``f(x, magnitude, exact)``: an
    XLA-compiled ``tf.function`` (made once per process, compiled once per
    image shape), or, for :data:`UNCOMPILED_OPS` on uint8 images
    (``exact``) and :data:`SELF_COMPILED_OPS`, the plain function."""
    fn = _OP_FNS[name]
    if name in SELF_COMPILED_OPS or (exact and name in UNCOMPILED_OPS):
        return fn
    return _compiled(fn)


def _augment_image(image, draws, policy: str):
    """:func:`augment`'s image work: the ops of ``draws`` (rows of
    :func:`sample_ops`) applied in turn."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w, c = image.shape
    x, exact = _to_float(image)
    space = augmentation_space(policy, h, w)
    table = tf.constant(
        np.stack([np.broadcast_to(space[op][0], (NUM_MAGNITUDE_BINS,)) for op in OPS]),
        tf.float64,
    )
    signed = tf.constant([space[op][1] for op in OPS])
    for row in tf.unstack(draws):
        op, bin_, negate = tf.unstack(row)
        value = tf.gather_nd(table, tf.stack([op, bin_]))
        value = tf.where((negate == 1) & tf.gather(signed, op), -value, value)
        branches = [functools.partial(_op(name, exact), x, value, exact) for name in OPS]
        x = tf.ensure_shape(tf.switch_case(op, branches), (h, w, c))
    return _from_float(x, image.dtype)


def sample_ops(seed, policy: str, num_ops: int = 2, magnitude: int = 9):
    """The draws of :func:`augment` for ``seed`` ((2,) int64): (ops, 3) int32
    rows (op index in :data:`OPS`, magnitude bin, negate 0/1; the sign only
    acts on :data:`SIGNED_OPS`), ``num_ops`` rows for ``"randaugment"`` (bin
    ``magnitude``), one for ``"trivialaugment"`` (bin uniform in 0..30)."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    seed = tf.cast(seed, tf.int64)
    rows = []
    draws = num_ops if policy == "randaugment" else 1
    for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, draws)):
        s_op, s_bin, s_sign = tf.unstack(tf.random.experimental.stateless_split(op_seed, 3))
        op = tf.random.stateless_uniform([], s_op, 0, len(OPS), tf.int32)
        if policy == "randaugment":
            bin_ = tf.constant(magnitude, tf.int32)
        else:
            bin_ = tf.random.stateless_uniform([], s_bin, 0, NUM_MAGNITUDE_BINS, tf.int32)
        negate = tf.random.stateless_uniform([], s_sign, 0, 2, tf.int32)
        rows.append(tf.stack([op, bin_, negate]))
    return tf.stack(rows)


def apply_op(image, op_name: str, magnitude):
    """One op of :data:`OPS` at the signed ``magnitude`` (a float or a scalar
    tensor, as torchvision's ``_apply_op`` receives it: degrees for Rotate,
    pixels for Translate*, bits for Posterize, the threshold for Solarize,
    the factor minus 1 for the colour ops). ``image``: (H, W, C) uint8 or
    float32 (0..255); same shape and dtype returned."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    if op_name not in _OP_FNS:
        raise ValueError(f"unknown op {op_name!r}; valid: {', '.join(OPS)}")
    image = tf.convert_to_tensor(image)
    _check_image(image)
    x, exact = _to_float(image)
    return _from_float(_op(op_name, exact)(x, tf.cast(magnitude, tf.float64), exact), image.dtype)


def _check_image(image) -> None:
    """Raises for an image :func:`augment` and :func:`apply_op` do not take."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    if image.shape.rank != 3 or image.shape[-1] not in (1, 3) or not image.shape.is_fully_defined():
        raise ValueError(f"expected an (H, W, 1 or 3) image of static shape, got {image.shape}")
    if image.dtype not in (tf.uint8, tf.float32):
        raise TypeError(f"expected a uint8 or float32 image, got {image.dtype.name}")


def _to_float(image):
    """(float32 pixels clipped to [0, 255], whether they are uint8 ones)."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32), True
    return tf.clip_by_value(image, 0.0, 255.0), False


def _from_float(x, dtype):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.cast(x, dtype)  # uint8: the values are integers in 0..255 already


# --- geometric ops (nearest, fill 0) ------------------------------------------


def _affine(x, matrix):
    """``x`` resampled by torchvision's inverse affine ``matrix`` (a0, a1, a2,
    b0, b1, b2: output -> source, in coordinates centred on the image, pixel
    centres at half-integers, as ``_functional_tensor._gen_affine_grid``),
    nearest, fill 0.

    A gather of each output pixel's source pixel, its coordinates computed
    in float32 and rounded half away from zero, as ``ImageProjectiveTransformV3``
    does at about three times the cost on the CPU (the two may differ at
    sampling ties, by round-off, as either may from torchvision).
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w, c = x.shape
    a0, a1, a2, b0, b1, b2 = matrix
    # Pixel index j sits at j + ox in the centred frame, and back.
    ox, oy = 0.5 - w / 2, 0.5 - h / 2
    t = tf.unstack(
        tf.cast(
            tf.stack([a0, a1, a0 * ox + a1 * oy + a2 - ox, b0, b1, b0 * ox + b1 * oy + b2 - oy]),
            tf.float32,
        )
    )
    i, j = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
    )
    sx = t[0] * j + t[1] * i + t[2]
    sy = t[3] * j + t[4] * i + t[5]
    # std::round: half away from zero; a source at -0.5 rounds to -1 (outside).
    inside = (sx > -0.5) & (sx < w - 0.5) & (sy > -0.5) & (sy < h - 0.5)
    ix = tf.cast(tf.floor(sx + 0.5), tf.int32)
    iy = tf.cast(tf.floor(sy + 0.5), tf.int32)
    keep = tf.cast(inside, tf.int32)
    index = (iy * w + ix) * keep  # outside: pixel 0, then zeroed (no padded copy of x)
    return tf.gather(tf.reshape(x, [h * w, c]), index) * tf.cast(keep, x.dtype)[..., None]


def _f64(value):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.constant(value, tf.float64)


def _shear_x(x, m, exact):
    # F.affine(shear=[degrees(atan(m)), 0], center=[0, 0]): the top-left corner fixed.
    h = x.shape[0]
    one, zero = _f64(1.0), _f64(0.0)
    return _affine(x, (one, m, m * (h / 2), zero, one, zero))


def _shear_y(x, m, exact):
    # F.affine(shear=[0, degrees(atan(m))], center=[0, 0]).
    w = x.shape[1]
    one, zero = _f64(1.0), _f64(0.0)
    return _affine(x, (one, zero, zero, m, one, m * (w / 2)))


def _trunc(m):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.sign(m) * tf.floor(tf.abs(m))  # Python's int(m)


def _shift(x, m, axis: int):
    """``x`` moved by ``int(m)`` pixels along ``axis`` (1: right, 0: down for
    m > 0), zeros shifted in: what :func:`_affine` gives for the translation
    (whole-pixel source coordinates, no ties), as a gather of whole rows or
    columns instead of every pixel. (A slice at a dynamic offset would make
    XLA compile once per magnitude.)"""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    n = x.shape[axis]
    source = tf.range(n) - tf.cast(tf.clip_by_value(_trunc(m), -n, n), tf.int32)
    inside = tf.cast((source >= 0) & (source < n), x.dtype)
    moved = tf.gather(x, tf.clip_by_value(source, 0, n - 1), axis=axis)
    return moved * (inside[None, :, None] if axis == 1 else inside[:, None, None])


def _translate_x(x, m, exact):
    # F.affine(translate=[int(m), 0]): source x = output x - int(m).
    return _shift(x, m, axis=1)


def _translate_y(x, m, exact):
    return _shift(x, m, axis=0)


def _rotate(x, m, exact):
    # F.rotate(angle=m): counter-clockwise about the image centre.
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    rot = -m * (math.pi / 180.0)
    cos, sin, zero = tf.cos(rot), tf.sin(rot), _f64(0.0)
    return _affine(x, (cos, sin, zero, -sin, cos, zero))


# --- colour ops ----------------------------------------------------------------


def _blend(x, other, ratio, exact):
    """torchvision's ``_blend``: ``ratio * x + (1 - ratio) * other`` in float32,
    clamped to [0, 255], truncated for uint8."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    out = tf.cast(ratio, tf.float32) * x + tf.cast(1.0 - ratio, tf.float32) * other
    out = tf.clip_by_value(out, 0.0, 255.0)
    return tf.floor(out) if exact else out


def _grayscale(x, exact):
    """torchvision's ``rgb_to_grayscale`` (H, W, 1) of RGB ``x``."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    r, g, b = tf.unstack(x, axis=-1)
    gray = (np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b)[..., None]
    return tf.floor(gray) if exact else gray


def _brightness(x, m, exact):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return _blend(x, tf.zeros_like(x), 1.0 + m, exact)


def _color(x, m, exact):
    if x.shape[-1] == 1:
        return x  # torchvision leaves a greyscale image as it is
    return _blend(x, _grayscale(x, exact), 1.0 + m, exact)


def _contrast(x, m, exact):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    gray = _grayscale(x, exact) if x.shape[-1] == 3 else x
    # torch sums in float32 and divides by the count: the sum of integers is
    # exact below 2**24 (in float64 here, whatever the order).
    total = tf.cast(tf.reduce_sum(tf.cast(gray, tf.float64)), tf.float32)
    mean = total / np.float32(gray.shape[0] * gray.shape[1])
    return _blend(x, mean, 1.0 + m, exact)


def _sharpness(x, m, exact):
    """Blend with the 3x3 smoothing (1 around, 5 in the centre, / 13) of the
    interior, the one-pixel border kept, as torchvision's
    ``_blurred_degenerate_image``."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w, c = x.shape
    if h <= 2 or w <= 2:
        return x
    if exact:
        # TensorFlow kernels (see UNCOMPILED_OPS): one depthwise convolution
        # (nine shifted slices, a kernel each, cost 3x as much). The sums of
        # integer pixels are exact in float32.
        kernel = np.ones((3, 3, 1, 1), np.float32)
        kernel[1, 1] = 5.0
        kernel = np.tile(kernel, (1, 1, c, 1))
        total = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    else:
        # XLA-compiled: shifted slices fuse into one loop, where XLA:CPU's
        # depthwise convolution is 20x slower.
        rows = x[:-2] + x[1:-1] + x[2:]
        total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * x[1:-1, 1:-1]
    # total / 13 is never within 1/26 of a tie: rounding it matches torch's
    # float32 convolution rounded to uint8.
    smooth = total / 13.0
    if exact:
        smooth = tf.round(smooth)
    border = np.ones((h, w, 1), np.float32)
    border[1:-1, 1:-1] = 0.0
    blurred = x * border + tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])  # no select: slow on CPU
    return _blend(x, blurred, 1.0 + m, exact)


def _as_uint8(x, exact):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.cast(x if exact else tf.round(x), tf.uint8)


def _posterize(x, m, exact):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    shift = 8 - tf.cast(m, tf.int32)
    mask = tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(255, shift), shift), tf.uint8)
    return tf.cast(tf.bitwise.bitwise_and(_as_uint8(x, exact), mask), tf.float32)


def _solarize(x, m, exact):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    above = tf.cast(x >= tf.cast(m, tf.float32), tf.float32)
    return x + above * (255.0 - 2.0 * x)  # exact on 0..255; a select is 5x slower on CPU


def _autocontrast(x, m, exact):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w, c = x.shape
    rows = tf.reshape(x, [h, w * c])  # rows first: reducing (0, 1) at once is 3x slower
    lo = tf.reduce_min(tf.reshape(tf.reduce_min(rows, axis=0), [w, c]), axis=0)
    hi = tf.reduce_max(tf.reshape(tf.reduce_max(rows, axis=0), [w, c]), axis=0)
    flat = hi == lo  # torchvision: a non-finite scale -> minimum 0, scale 1
    scale = tf.where(flat, 1.0, 255.0 / tf.where(flat, 1.0, hi - lo))
    lo = tf.where(flat, 0.0, lo)
    out = tf.clip_by_value((x - lo) * scale, 0.0, 255.0)
    return tf.floor(out) if exact else out


def _equalize(x, m, exact):
    """Per channel, torchvision's ``_scale_channel``: the lookup table of the
    cumulative histogram in steps of (pixels less the top value's) // 255; a
    channel with step 0 kept (its table the identity).

    Two XLA programs, the table and the lookup: compiled as one, XLA fuses
    the table's computation into the lookup's gather and recomputes it for
    every pixel (twice the time on a 224x224 image)."""
    index, table = _compiled(_equalize_table)(x, exact)
    return _compiled(_lookup)(table, index)


def _equalize_table(x, exact):
    """(``index``: (H, W, C) int32, each pixel's bin in channel-major order;
    ``table``: (C * 256,) int32, :func:`_equalize`'s lookup table)."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    h, w, c = x.shape
    values = tf.cast(_as_uint8(x, exact), tf.int32)
    index = values + 256 * tf.range(c, dtype=tf.int32)  # (H, W, C): channel c's bins
    counts = tf.raw_ops.DenseBincount(  # tf.math.bincount's, with a static size (XLA)
        input=tf.reshape(index, [-1]), size=256 * c, weights=tf.zeros([0], tf.int32)
    )
    hist = tf.reshape(counts, [c, 256])
    bins = tf.range(256, dtype=tf.int32)
    top = tf.reduce_max(bins * tf.cast(hist > 0, tf.int32), axis=1)  # the top value present
    top_count = tf.gather(hist, top, batch_dims=1)
    step = (h * w - top_count) // 255  # (C,)
    safe = tf.maximum(step, 1)[:, None]
    lut = (tf.cumsum(hist, axis=1) + safe // 2) // safe
    lut = tf.clip_by_value(tf.pad(lut, [[0, 0], [1, 0]])[:, :-1], 0, 255)
    changed = tf.cast(step > 0, tf.int32)[:, None]  # (C, 1): step 0 keeps the channel
    return index, tf.reshape(bins + (lut - bins) * changed, [-1])


def _lookup(table, index):
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.cast(tf.gather(table, index), tf.float32)


@functools.cache
def _compiled(fn):
    """``fn`` as an XLA-compiled ``tf.function``, made once per process."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    return tf.function(fn, jit_compile=True, autograph=False)  # see tf_setup.without_autograph


def _identity(x, m, exact):
    return x


_OP_FNS = {
    "Identity": _identity,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}
