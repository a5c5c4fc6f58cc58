"""RandAugment and TrivialAugment-wide (resnet_jax.data.autoaugment) against
torchvision's: the magnitude tables, every op at several magnitudes and both
signs, the float32 path, the seeded draws, graph mode and the config check."""

# torch before TensorFlow: torch imported after TensorFlow can crash the process.
import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (before TensorFlow too)
from torchvision.transforms import InterpolationMode
from torchvision.transforms import _functional_tensor as F_t
from torchvision.transforms import autoaugment as tv_aa

from resnet_jax.data import autoaugment as aa
from resnet_jax.data import tf_setup
from resnet_jax.errors import UserError

tf_setup.configure_tensorflow()
import tensorflow as tf  # noqa: E402  (after configure_tensorflow)

H, W = 32, 40  # non-square: an H/W swap shows
TEST_BINS = (0, 4, 9, 20, 30)  # 20: ShearX/Y at 0.2 and Rotate at 90 degrees, full of ties


def _image(channels: int = 3) -> np.ndarray:
    """(H, W, C) uint8: one full-range channel, one bell-shaped (Equalize has
    work), one constant (AutoContrast's flat case, Equalize's step 0)."""
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (H, W))
    bell = np.clip(rng.normal(100, 25, (H, W)), 0, 255).round()
    flat = np.full((H, W), 77)
    image = np.stack([full, bell, flat], -1).astype(np.uint8)
    return image[..., 1:2] if channels == 1 else image


def _torchvision_space(policy: str, height: int, width: int) -> dict:
    if policy == "randaugment":
        return tv_aa.RandAugment()._augmentation_space(31, (height, width))
    return tv_aa.TrivialAugmentWide()._augmentation_space(31)


def _torchvision_op(image: np.ndarray, op: str, magnitude: float, record=None) -> np.ndarray:
    """torchvision's ``_apply_op`` on the CHW tensor of ``image`` (HWC), back to HWC;
    ``record`` (a dict) gets the inverse affine matrix of a geometric op."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    affine, rotate = F_t.affine, F_t.rotate

    def recording(fn):
        def wrapped(img, matrix, **kwargs):
            if record is not None:
                record["matrix"] = matrix
            return fn(img, matrix=matrix, **kwargs)

        return wrapped

    F_t.affine, F_t.rotate = recording(affine), recording(rotate)
    try:
        out = tv_aa._apply_op(tensor, op, magnitude, InterpolationMode.NEAREST, None)
    finally:
        F_t.affine, F_t.rotate = affine, rotate
    return out.numpy().transpose(1, 2, 0)


def _ties(matrix, height: int, width: int) -> np.ndarray:
    """(H, W) bool: output pixels whose source coordinate under torchvision's
    inverse affine ``matrix`` (centred frame) is within 1e-4 of k + 0.5 on an
    axis, where nearest sampling is decided by float32 round-off."""
    m = np.asarray(matrix, np.float64)
    j, i = np.meshgrid(np.arange(width), np.arange(height))
    xc, yc = j - width / 2 + 0.5, i - height / 2 + 0.5
    sx = m[0] * xc + m[1] * yc + m[2] + width / 2 - 0.5
    sy = m[3] * xc + m[4] * yc + m[5] + height / 2 - 0.5

    def tie(s):
        return np.abs(s - np.floor(s) - 0.5) < 1e-4

    return tie(sx) | tie(sy)


def _cases(policy: str, op: str, bins=TEST_BINS):
    """(bin, signed magnitude) of ``op`` in torchvision's table of ``policy``."""
    magnitudes, signed = _torchvision_space(policy, H, W)[op]
    if magnitudes.ndim == 0:
        return [(0, 0.0)]
    return [
        (b, sign * float(magnitudes[b].item()))
        for b in bins
        for sign in ((1.0, -1.0) if signed else (1.0,))
    ]


@pytest.mark.parametrize("size", [(H, W), (224, 224), (331, 331), (17, 500), (375, 500)])
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_augmentation_space_matches_torchvision(policy, size):
    mine = aa.augmentation_space(policy, *size)
    theirs = _torchvision_space(policy, *size)
    assert tuple(mine) == tuple(theirs) == aa.OPS
    for op, (magnitudes, signed) in theirs.items():
        assert mine[op][1] == signed, op
        assert (op in aa.SIGNED_OPS) == signed, op
        np.testing.assert_array_equal(mine[op][0], magnitudes.numpy().astype(np.float32), op)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("op", aa.OPS)
def test_op_matches_torchvision_on_uint8(op, channels):
    """Colour ops and translations: exact. Shear and rotation: exact except at
    sampling ties (a source coordinate at k + 0.5), which torchvision's float32
    grid resolves by round-off; there the pixel may be the neighbour."""
    image = _image(channels)
    graph = tf.function(lambda x, m: aa.apply_op(x, op, m))  # as in tf.data
    checked = 0
    for policy in ("randaugment", "trivialaugment"):
        for b, magnitude in _cases(policy, op):
            record = {}
            ref = _torchvision_op(image, op, magnitude, record)
            out = aa.apply_op(tf.constant(image), op, magnitude)
            assert out.dtype == tf.uint8 and out.shape == image.shape
            if channels == 3:
                in_graph = graph(tf.constant(image), tf.constant(magnitude, tf.float64))
                np.testing.assert_array_equal(in_graph.numpy(), out.numpy())
            bad = np.any(out.numpy() != ref, axis=-1)
            where = f"{policy} {op} bin {b} magnitude {magnitude}"
            if op in ("ShearX", "ShearY", "Rotate"):
                ties = _ties(record["matrix"], H, W)
                assert not (bad & ~ties).any(), f"{where}: differs off the ties"
                assert bad.mean() <= 0.15, f"{where}: {bad.mean():.1%} of pixels differ"
            else:
                assert not bad.any(), f"{where}: {bad.sum()} pixels differ"
            checked += 1
    assert checked >= (2 if op in ("Identity", "AutoContrast", "Equalize") else 10)


def test_the_ops_are_not_identities():
    """The comparison above would pass for an op that did nothing if
    torchvision's did nothing too: each op changes this image."""
    image = _image()
    for op in aa.OPS[1:]:
        magnitude = 0.0 if op in ("AutoContrast", "Equalize") else _cases("randaugment", op)[-2][1]
        if op == "Posterize":
            magnitude = 4.0
        out = aa.apply_op(tf.constant(image), op, magnitude).numpy()
        assert not np.array_equal(out, image), op


def _tv_float(image: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    """torchvision's op on the float tensor image / 255 (its float scale), times 255."""
    if op == "Solarize":
        magnitude /= 255.0
    return _torchvision_op(image.astype(np.float32) / 255.0, op, magnitude) * 255.0


@pytest.mark.parametrize(
    "op", ["Brightness", "Color", "Contrast", "Sharpness", "Solarize", "AutoContrast"]
)
def test_float_ops_follow_torchvision_float_formulas(op):
    """A float32 image with fractional values: torchvision's float path on the
    0..255 scale (no truncation to uint8)."""
    rng = np.random.default_rng(1)
    image = np.clip(_image().astype(np.float32) + rng.uniform(-0.5, 0.5, (H, W, 3)), 0, 255)
    image = image.astype(np.float32)
    for _, magnitude in _cases("trivialaugment", op, bins=(4, 20, 30)):
        out = aa.apply_op(tf.constant(image), op, magnitude)
        assert out.dtype == tf.float32
        np.testing.assert_allclose(
            out.numpy(), _tv_float(image, op, magnitude), atol=2e-3, err_msg=op
        )


@pytest.mark.parametrize("op", aa.OPS)
def test_float_of_integers_is_close_to_uint8(op):
    """Geometric ops, Posterize, Solarize, Equalize: the uint8 result; the
    blends differ by their truncation (and Contrast's truncated grey mean)."""
    image = _image()
    for _, magnitude in _cases("trivialaugment", op, bins=(9, 30)):
        as_uint8 = aa.apply_op(tf.constant(image), op, magnitude).numpy().astype(np.float32)
        as_float = aa.apply_op(tf.constant(image.astype(np.float32)), op, magnitude).numpy()
        blend = op in ("Brightness", "Color", "Contrast", "Sharpness", "AutoContrast")
        np.testing.assert_allclose(as_float, as_uint8, atol=2.0 if blend else 0.0, err_msg=op)


def test_float_input_is_clipped():
    image = np.full((H, W, 3), 300.0, np.float32)
    image[0] = -5.0
    out = aa.augment(tf.constant(image), tf.constant([3, 4], tf.int64), "trivialaugment").numpy()
    assert out.min() >= 0.0 and out.max() <= 255.0


def _seed(i: int):
    return tf.constant([i, 1000 + i], tf.int64)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_same_seed_same_output_different_seeds_differ(policy):
    image = tf.constant(_image())
    first = aa.augment(image, _seed(1), policy).numpy()
    np.testing.assert_array_equal(first, aa.augment(image, _seed(1), policy).numpy())
    outputs = {aa.augment(image, _seed(i), policy).numpy().tobytes() for i in range(8)}
    assert len(outputs) >= 5


def test_empty_policy_is_the_identity():
    for image in (tf.constant(_image()), tf.constant(_image().astype(np.float32) + 0.25)):
        out = aa.augment(image, _seed(0), "")
        assert out.dtype == image.dtype
        np.testing.assert_array_equal(out.numpy(), image.numpy())


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_shape_and_dtype_kept(policy, channels, dtype):
    image = tf.constant(_image(channels).astype(dtype))
    for i in range(3):
        out = aa.augment(image, _seed(i), policy, num_ops=3, magnitude=30)
        assert out.shape == image.shape and out.dtype == image.dtype


def test_randaugment_applies_ops_of_the_list_at_the_fixed_magnitude():
    """With one op, each output is one of the 14 ops at bin ``magnitude`` with
    either sign, and the draws reach many of the ops."""
    image = _image()
    magnitude = 17
    candidates = {}
    for op in aa.OPS:
        for _, value in _cases("randaugment", op, bins=(magnitude,)):
            out = aa.apply_op(tf.constant(image), op, value).numpy().tobytes()
            candidates.setdefault(out, (op, np.sign(value)))
    seen = set()
    for i in range(40):
        out = aa.augment(tf.constant(image), _seed(i), "randaugment", 1, magnitude)
        key = out.numpy().tobytes()
        assert key in candidates, f"seed {i}: not an op of the list at bin {magnitude}"
        seen.add(candidates[key])
    assert len({op for op, _ in seen}) >= 9, seen
    assert {sign for op, sign in seen if op in aa.SIGNED_OPS} == {-1.0, 1.0}, seen


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_draws_are_uniform(policy):
    """Ops uniform over the 14 (with replacement), bins fixed (RandAugment) or
    uniform over the 31 (TrivialAugment), signs fair; a pure function of the seed."""
    n = 1400
    seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(7, tf.int64))], 1)
    draw = tf.function(
        lambda s: tf.map_fn(
            lambda x: aa.sample_ops(x, policy, 2, 13), s, fn_output_signature=tf.int32
        )
    )
    rows = draw(seeds).numpy()
    np.testing.assert_array_equal(rows, draw(seeds).numpy())
    assert rows.shape == ((n, 2, 3) if policy == "randaugment" else (n, 1, 3))
    ops, bins, negate = rows.reshape(-1, 3).T
    counts = np.bincount(ops, minlength=len(aa.OPS))
    expected = len(ops) / len(aa.OPS)
    assert len(counts) == len(aa.OPS) and counts.min() > 0.6 * expected, counts
    assert counts.max() < 1.4 * expected, counts
    if policy == "randaugment":
        assert set(bins) == {13}
        assert (rows[:, 0, 0] != rows[:, 1, 0]).mean() > 0.8  # the two ops drawn apart
    else:
        bin_counts = np.bincount(bins, minlength=31)
        assert len(bin_counts) == 31 and bin_counts.min() > 0.4 * n / 31, bin_counts
    assert 0.4 < negate.mean() < 0.6 and set(negate) == {0, 1}


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_runs_in_dataset_map_as_in_eager(dtype):
    """Graph mode (tf.data), the same outputs as eager for the same seeds."""
    images = np.stack([_image()] * 4).astype(dtype)
    if dtype == np.float32:
        images += np.random.default_rng(2).uniform(0, 1, images.shape).astype(np.float32)
    seeds = np.array([[i, 1000 + i] for i in range(4)], np.int64)
    for policy in ("randaugment", "trivialaugment"):
        ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
            lambda x, s, policy=policy: aa.augment(x, s, policy)
        )
        for got, image, seed in zip(ds.as_numpy_iterator(), images, seeds, strict=True):
            want = aa.augment(tf.constant(image), tf.constant(seed), policy).numpy()
            if dtype == np.uint8:
                np.testing.assert_array_equal(got, want)
            else:  # graph optimisations may round float32 differently
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    "policy, num_ops, magnitude, key",
    [
        ("autoaugment", 2, 9, "auto_augment"),
        ("RandAugment", 2, 9, "auto_augment"),
        (None, 2, 9, "auto_augment"),
        ("randaugment", 0, 9, "randaugment_num_ops"),
        ("randaugment", -1, 9, "randaugment_num_ops"),
        ("randaugment", 1.5, 9, "randaugment_num_ops"),
        ("randaugment", 2, -1, "randaugment_magnitude"),
        ("randaugment", 2, 31, "randaugment_magnitude"),
        ("trivialaugment", 2, 9.0, "randaugment_magnitude"),
    ],
)
def test_check_refuses_bad_values(policy, num_ops, magnitude, key):
    with pytest.raises(UserError, match=key) as info:
        aa.check(policy, num_ops, magnitude)
    assert "valid" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=key):
        aa.augment(tf.constant(_image()), _seed(0), policy, num_ops, magnitude)


def test_check_accepts_good_values():
    for policy in aa.POLICIES:
        aa.check(policy, 1, 0)
        aa.check(policy, 2, 9)
        aa.check(policy, 4, 30)
