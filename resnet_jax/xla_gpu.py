"""XLA settings for NVIDIA GPUs, asked for by the trainer (set before JAX starts).

* ``--xla_gpu_enable_latency_hiding_scheduler=true``: lets XLA overlap the
  gradient all-reduce with the backward pass. NVIDIA's JAX containers set it
  by default, and JAX's GPU performance guide recommends it for data-parallel
  training.
* ``deterministic=True`` adds ``--xla_gpu_deterministic_ops=true``: cuDNN and
  XLA's scatter otherwise use atomics, whose order (and so the last bits of
  the result) varies between runs. Bit-exact resume on a GPU needs it; it
  costs speed.

A flag the user already put in ``XLA_FLAGS`` is left as they set it. This
module imports nothing from JAX.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
DETERMINISTIC_FLAGS = ("--xla_gpu_deterministic_ops=true",)
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def gpu_is_the_platform() -> bool:
    """Whether JAX will run on an NVIDIA GPU, judged before it starts:
    ``JAX_PLATFORMS`` names cuda/gpu first, or (unset) a CUDA plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() in ("cuda", "gpu")
    return any(importlib.util.find_spec(m) is not None for m in _GPU_PLUGINS)


def configure(defaults: bool = True, deterministic: bool = False) -> str:
    """Appends the GPU flags to ``XLA_FLAGS`` and returns the new value."""
    current = os.environ.get("XLA_FLAGS", "")
    wanted = (DEFAULT_FLAGS if defaults else ()) + (DETERMINISTIC_FLAGS if deterministic else ())
    extra = [f for f in wanted if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ["XLA_FLAGS"]


def nvidia_gpus_on_this_machine(root: str = "/") -> int:
    """Number of NVIDIA GPUs the driver reports (``/proc/driver/nvidia/gpus``),
    whatever JAX was installed with; 0 without the driver."""
    path = os.path.join(root, "proc", "driver", "nvidia", "gpus")
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


def cpu_fallback_warning(platform: str, root: str = "/") -> str | None:
    """A message when the machine has an NVIDIA GPU but JAX runs on the CPU."""
    n = nvidia_gpus_on_this_machine(root)
    if platform != "cpu" or n == 0:
        return None
    return (
        f"This machine has {n} NVIDIA GPU(s) but JAX is running on the CPU: the installed "
        'jaxlib has no CUDA support. Install it with pip install "jax[cuda13]==VERSION" '
        "(or cuda12; docs/accelerators.md#installing-for-gpus-and-tpus), or set JAX_PLATFORMS=cpu to "
        "train on the CPU on purpose."
    )
