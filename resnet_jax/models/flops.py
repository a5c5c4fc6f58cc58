"""Counting multiply-accumulates from the traced computation.

The count reads the shapes of every convolution and matrix product in the
jaxpr of the forward pass, so it does not trust the model code's own
arithmetic. Like the paper's Table 1, every kernel tap counts, including taps
that fall on zero padding (XLA's compiled ``cost_analysis`` skips those, so
it reports fewer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _eqn_macs(eqn) -> int:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out = eqn.outvars[0].aval
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        # Each output element takes (kernel taps x input channels per group) MACs.
        return math.prod(out.shape) * (math.prod(rhs.shape) // rhs.shape[out_feature_dim])
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        out = eqn.outvars[0].aval
        return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    return 0


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def jaxpr_macs(jaxpr) -> int:
    """Multiply-accumulates of every convolution and dot product in a jaxpr."""
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _sub_jaxprs(eqn):
            total += repeat * jaxpr_macs(sub)
    return total


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 224, 224, 3),
    variables: Any = None,
    dtype: Any = jnp.float32,
) -> int:
    """Multiply-accumulates of one inference forward pass of ``model``.

    Nothing is computed or allocated: parameters come from ``jax.eval_shape``
    and the forward pass is only traced, so ResNet-1202 costs a second.

    Args:
      model: a Flax module called as ``model.apply(variables, x, train=False)``.
      input_shape: NHWC shape; the count covers the whole batch.
      variables: optional variables (or their shapes); by default abstract ones.
      dtype: input dtype.

    Returns:
      The number of multiply-accumulates (the paper's "FLOPs").
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    if variables is None:
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return jaxpr_macs(closed.jaxpr)
