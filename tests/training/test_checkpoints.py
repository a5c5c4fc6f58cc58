"""resnet_jax.training.checkpoints: saving a state that lives on every device."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.training import checkpoints

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_a_replicated_state_saves_without_compiling_and_restores_on_every_device(tmp_path):
    """In one process each array is written whole: orbax's replica-parallel
    default sliced every array on device, an XLA compile per shape."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = [(3, 3, 16, 16), (16,), (64, 10), (10,), (7, 5)]
    state = {
        f"a{i}": jax.device_put(jnp.arange(np.prod(s), dtype=jnp.float32).reshape(s), replicated)
        for i, s in enumerate(shapes)
    }
    compiles = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            compiles.append(duration)

    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", async_save=False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt.save(1, state, {"fingerprint": {}})
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert jax.device_count() == 8 and compiles == []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    restored, _ = ckpt.restore_latest(abstract, {})
    ckpt.close()
    for name, value in state.items():
        assert restored[name].sharding == replicated
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))
