"""XLA:CPU settings for training on a CPU host (they must be set before JAX starts).

Two settings made the ResNet-20 train step faster on the 2-core development
machine (BENCHMARKS.md):

* ``devices=K``: split the CPU into K XLA devices (one per core). The batch is
  sharded over them, so each core runs its part of every convolution; XLA:CPU
  otherwise runs a convolution's kernel gradient on about one core.
* ``conv="eigen"`` (default): XLA:CPU's Eigen convolutions instead of YNNPACK's
  (XLA's default in jax 0.10); YNNPACK keeps the dots and elementwise work.

The trainer sets them only when the CPU is the platform
(:func:`cpu_is_the_platform`); they would change nothing on a GPU or TPU. The YNNPACK flag is an experimental XLA option (present in jax 0.10.2,
pinned in requirements.txt); if another JAX version rejects it ("Unknown flags
in XLA_FLAGS"), ``conv="ynn"`` (``train.py --cpu_conv=ynn``) leaves it out.
This module imports nothing from JAX.
"""

from __future__ import annotations

import importlib.util
import os

CONV_BACKENDS = ("eigen", "ynn")
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# Modules whose presence means JAX will pick an accelerator over the CPU.
_ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)


def cpu_is_the_platform() -> bool:
    """Whether JAX will run on the CPU, judged before it starts.

    ``JAX_PLATFORMS`` decides when set (its first entry); otherwise the CPU is
    the platform when no GPU or TPU plugin is installed. The trainer applies
    :func:`configure` only then, so a GPU or TPU host never gets CPU flags.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_PLUGINS)


def configure(devices: int = 0, conv: str = "eigen") -> str:
    """Appends the XLA:CPU flags to ``XLA_FLAGS`` and returns the new value.

    Call it before the first JAX computation (JAX reads ``XLA_FLAGS`` when it
    starts its backends). ``devices > 0`` overrides a device count already in
    ``XLA_FLAGS`` (XLA takes the last one); a YNNPACK fusion setting already
    there is left as it is.
    """
    if conv not in CONV_BACKENDS:
        raise ValueError(f"conv must be one of {CONV_BACKENDS}, got {conv!r}.")
    if devices < 0:
        raise ValueError(f"devices must be >= 0 (0 keeps one CPU device), got {devices}.")
    current = os.environ.get("XLA_FLAGS", "")
    extra = []
    if devices:
        extra.append(f"--xla_force_host_platform_device_count={devices}")
    if conv == "eigen" and _YNN_FLAG not in current:
        extra.append(f"{_YNN_FLAG}=-individual_convolution")
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ["XLA_FLAGS"]
