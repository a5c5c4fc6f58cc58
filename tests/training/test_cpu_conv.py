"""The CPU trainer's convolution under gradient accumulation: the same values
and gradients as ``lax.conv_general_dilated``, and only canonical convolutions
(the ones XLA:CPU runs on its fast kernels) inside the accumulation loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import resnet_jax as rj
from resnet_jax.training import cpu_conv

DN = ("NHWC", "HWIO", "NHWC")
CANONICAL = "b01f_01io->b01f"


@pytest.mark.parametrize(
    "channels, features, kernel, stride, pad, size",
    [
        (3, 8, 3, 1, 1, 8),
        (8, 16, 3, 2, 1, 8),
        (8, 16, 3, 2, 1, 9),  # the last row of the padded input is never read
        (8, 16, 1, 2, 0, 9),  # a strided 1x1 projection shortcut
        (3, 8, 7, 2, 3, 11),  # the ImageNet stem
        (4, 4, 3, 1, 0, 6),  # no padding
    ],
)
def test_values_and_gradients_equal_lax(channels, features, kernel, stride, pad, size):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.normal(size=(3, size, size + 1, channels)), jnp.float32)
    w = jnp.asarray(rs.normal(size=(kernel, kernel, channels, features)), jnp.float32)
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    y, ref_vjp = jax.vjp(
        lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=DN), x, w
    )
    got, vjp = jax.vjp(
        lambda x, w: cpu_conv.conv_general_dilated(x, w, *args, dimension_numbers=DN), x, w
    )
    np.testing.assert_array_equal(got, y)
    dy = jnp.asarray(rs.normal(size=y.shape), jnp.float32)
    for ref, new in zip(ref_vjp(dy), vjp(dy), strict=True):
        assert ref.shape == new.shape
        np.testing.assert_allclose(new, ref, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


def test_grouped_convolutions_fall_back_to_lax():
    """ResNeXt's grouped convolutions: lax's own program, bit for bit."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.normal(size=(2, 8, 8, 8)), jnp.float32)
    w = jnp.asarray(rs.normal(size=(3, 3, 2, 8)), jnp.float32)
    args = ((1, 1), ((1, 1), (1, 1)))
    kw = dict(dimension_numbers=DN, feature_group_count=4)
    for f in (lax.conv_general_dilated, cpu_conv.conv_general_dilated):
        y, vjp = jax.vjp(lambda x, w: f(x, w, *args, **kw), x, w)  # noqa: B023
        if f is lax.conv_general_dilated:
            ref = (y, *vjp(jnp.ones_like(y)))
    for a, b in zip(ref, (y, *vjp(jnp.ones_like(y))), strict=True):
        np.testing.assert_array_equal(a, b)


def _dim_labels(conv):
    """The dimension labels of the compiled convolutions of a ResNet-8
    gradient accumulated over two micro-batches in a ``lax.scan``."""
    m = rj.create_model("resnet8", num_classes=10, conv_general_dilated=conv)
    x = jnp.ones((8, 16, 16, 3))
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), x[:2]))

    def grad(p, stats, xb):
        def loss(p):
            variables = {"params": p, "batch_stats": stats}
            out, _ = m.apply(variables, xb, train=True, mutable=["batch_stats"])
            return jnp.mean(out**2)

        return jax.grad(loss)(p)

    def accumulated(p, stats, x):
        body = lambda c, xb: (jax.tree.map(jnp.add, c, grad(p, stats, xb)), None)  # noqa: E731
        return lax.scan(body, jax.tree.map(jnp.zeros_like, p), x.reshape(2, 4, 16, 16, 3))[0]

    text = jax.jit(accumulated).lower(v["params"], v["batch_stats"], x).compile().as_text()
    return set(re.findall(r"convolution\(.*dim_labels=([^,\s]+)", text))


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="XLA:CPU's canonical form")
def test_only_canonical_convolutions_inside_the_accumulation_loop():
    assert _dim_labels(cpu_conv.conv_general_dilated) == {CANONICAL}
    assert _dim_labels(None) - {CANONICAL}  # lax's gradients are not, inside the loop


def test_the_trainer_picks_it_on_the_cpu_under_accumulation_only():
    from configs import cifar10
    from resnet_jax.training import recipe

    c = cifar10.get_config()
    assert recipe.resolve_conv(c, "cpu") is None
    c.grad_accum_steps = 2
    assert recipe.resolve_conv(c, "cpu") is cpu_conv.conv_general_dilated
    assert recipe.resolve_conv(c, "gpu") is None
    assert (
        recipe.model_from_config(c, 10, conv=recipe.resolve_conv(c, "cpu")).conv_general_dilated
        is cpu_conv.conv_general_dilated
    )


def test_a_convolution_that_is_not_callable_is_refused():
    with pytest.raises(ValueError, match="conv_general_dilated='eigen' is not callable"):
        rj.create_model("resnet8", conv_general_dilated="eigen")
