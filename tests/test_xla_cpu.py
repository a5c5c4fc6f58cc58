"""resnet_jax.xla_cpu: the XLA:CPU flags train.py and the benchmarks set."""

import os
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import xla_cpu

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_configure_appends_flags_and_keeps_the_users(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    flags = xla_cpu.configure(devices=2)
    assert flags.split() == [
        "--xla_dump_to=/tmp/x",
        "--xla_force_host_platform_device_count=2",
        f"{YNN}=-individual_convolution",
    ]
    assert os.environ["XLA_FLAGS"] == flags
    monkeypatch.setenv("XLA_FLAGS", f"{YNN}=")  # the user's own YNNPACK setting wins
    assert xla_cpu.configure() == f"{YNN}="
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_cpu.configure(conv="ynn") == ""


@pytest.mark.parametrize("kw", [{"conv": "onednn"}, {"devices": -1}])
def test_configure_rejects_bad_values(kw, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(ValueError, match="must be"):
        xla_cpu.configure(**kw)


def test_eigen_convolutions_replace_ynnpack_and_give_the_same_gradients(tmp_path):
    code = (
        "import sys; from resnet_jax import xla_cpu; xla_cpu.configure(conv=sys.argv[1]); "
        "import jax, jax.numpy as jnp, numpy as np, resnet_jax as rj; "
        "m = rj.create_model('resnet8', num_classes=10); x = jnp.ones((4, 16, 16, 3)); "
        "v = m.init(jax.random.key(0), x); "
        "f = lambda p: jnp.sum(m.apply({**v, 'params': p}, x, train=True, "
        "mutable=['batch_stats'])[0] ** 2); "
        "c = jax.jit(jax.grad(f)).lower(v['params']).compile(); "
        "print(c.as_text().count('__ynn_fusion')); "
        "np.save(sys.argv[2], np.concatenate([a.ravel() for a in jax.tree.leaves(c(v['params']))]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    grads, ynn_fusions = {}, {}
    for conv in ("eigen", "ynn"):
        path = tmp_path / f"{conv}.npy"
        run = subprocess.run(
            [sys.executable, "-c", code, conv, str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        ynn_fusions[conv] = int(run.stdout.split()[-1])
        grads[conv] = np.load(path)
    # The convolutions leave YNNPACK (its dots and elementwise fusions stay).
    assert 0 < ynn_fusions["eigen"] < ynn_fusions["ynn"], ynn_fusions
    scale = np.abs(grads["ynn"]).max()
    assert scale > 0
    np.testing.assert_allclose(grads["eigen"], grads["ynn"], rtol=1e-4, atol=1e-5 * scale)
