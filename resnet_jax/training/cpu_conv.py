"""A convolution whose gradients XLA:CPU runs fast inside loops.

XLA:CPU runs a convolution with its fast (Eigen) kernels only when the
convolution is canonical: NHWC input, HWIO kernel, NHWC output. Its
``ConvCanonicalization`` pass rewrites the other layouts into canonical ones,
but only for the top-level convolutions of a program (its header: "all
top-level convolutions"), not those inside a loop body. The gradients JAX
derives for an NHWC/HWIO convolution are not canonical (the input gradient's
kernel is HWOI, the kernel gradient's dimension labels ``f01b_i01o->01bf``),
so inside the ``lax.scan`` of gradient accumulation they run in XLA's generic
loop emitter: the ResNet-20 train step with ``grad_accum_steps=2`` ran 50x
slower than without on the 2-core development machine (BENCHMARKS.md).

:func:`conv_general_dilated` computes the same convolution and writes both
gradients as canonical convolutions (transposing their operands), so the
loop runs on the fast kernels too. The trainer passes it to the network on the
CPU when ``grad_accum_steps > 1`` (:func:`resnet_jax.training.recipe.resolve_conv`);
other backends canonicalise convolutions themselves. Values agree with
``lax.conv_general_dilated``'s to float32 round-off (the sums run in another
order); grouped, dilated or non-NHWC convolutions fall back to it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_CANONICAL = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kw,
):
    """``lax.conv_general_dilated``, with canonical gradient convolutions
    when the convolution is a plain 2-D NHWC/HWIO one with explicit padding."""
    plain = (
        lhs.ndim == 4
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CANONICAL)
        and feature_group_count == 1
        and not kw
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and not isinstance(padding, str)
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kw,
        )
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=_CANONICAL, precision=precision
    )


def _conv_fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, dy):
    x, w = residuals
    # The input gradient: JAX's own transpose of the same convolution written
    # with an HWOI kernel, which transposes to a convolution with HWIO.
    _, vjp = jax.vjp(
        lambda x: lax.conv_general_dilated(
            x,
            jnp.swapaxes(w, 2, 3),
            strides,
            padding,
            dimension_numbers=("NHWC", "HWOI", "NHWC"),
            precision=precision,
        ),
        x,
    )
    (dx,) = vjp(dy)
    # The kernel gradient, dw[a, b, i, o] = sum over n, p, q of
    # x_padded[n, p*s + a, q*s + b, i] * dy[n, p, q, o]: a canonical convolution
    # of x with its channels as the batch and its batch as the channels, by dy
    # as the kernel, dilated by the strides. The high padding makes the output
    # the kernel's size (negative where the forward pass dropped rows).
    pads = [
        (lo, k + (m - 1) * s - n - lo)
        for k, s, (lo, _), n, m in zip(w.shape[:2], strides, padding, x.shape[1:3], dy.shape[1:3])
    ]
    dw = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),
        jnp.transpose(dy, (1, 2, 0, 3)),
        (1, 1),
        pads,
        rhs_dilation=strides,
        dimension_numbers=_CANONICAL,
        precision=precision,
    )
    return dx, jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
