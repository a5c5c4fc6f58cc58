"""The Flax NNX example of docs/models.md (``flax.nnx.bridge``), run as written.

The code block after ``<!-- nnx-example -->`` in docs/models.md is executed; its
results are checked against the same network and step in Linen + optax.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.helpers import ROOT

MARKER = "<!-- nnx-example -->"
PAGE = os.path.join("docs", "models.md")


def nnx_example() -> str:
    """The python block that follows the marker in docs/models.md."""
    with open(os.path.join(ROOT, PAGE)) as f:
        text = f.read()
    assert text.count(MARKER) == 1, f"{PAGE} must hold {MARKER} once"
    m = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.DOTALL)
    assert m, f"no ```python block right after {MARKER}"
    return m.group(1)


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _differs(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_docs_nnx_example():
    ns: dict = {}
    exec(compile(nnx_example(), f"{PAGE}:nnx-example", "exec"), ns)
    linen_model, variables, x = ns["linen_model"], ns["variables"], ns["x"]

    # The loaded variables are the NNX module's, and inference equals Linen's.
    expected = linen_model.apply(variables, x, train=False)
    np.testing.assert_array_equal(ns["logits"], expected)
    assert ns["logits"].shape == (x.shape[0], 10)

    # One step: params and BatchNorm statistics change, as in Linen + optax.
    new = ns["new_variables"]
    assert set(new) == {"params", "batch_stats"}
    assert _differs(new["params"], variables["params"])
    assert _differs(new["batch_stats"], variables["batch_stats"])

    def loss_fn(params):
        logits, updates = linen_model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            ns["images"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, ns["labels"]).mean()
        return loss, updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    tx = optax.sgd(0.1, momentum=0.9)
    updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    np.testing.assert_allclose(ns["loss"], loss, rtol=1e-5)
    _close(new["params"], params, rtol=1e-4, atol=1e-6)
    _close(new["batch_stats"], stats, rtol=1e-5, atol=1e-6)
    # The NNX module now computes what Linen computes with the new variables.
    np.testing.assert_allclose(
        ns["model"](x, train=False),
        linen_model.apply(new, x, train=False),
        rtol=1e-5,
        atol=1e-5,
    )
    assert isinstance(jnp.asarray(ns["loss"]), jax.Array)
