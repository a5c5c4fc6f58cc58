"""Test set-up: 8 simulated CPU devices and the JAX backend for Keras.

Both must be set before jax or keras is imported anywhere.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache for the whole session, shared by the train.py
# subprocesses (tests/helpers.py) and this process: a program compiles once.
# Under pytest-xdist (`-n 2`) the workers inherit the controller's variable,
# so they share its cache, and only the controller removes it.
_CACHE = os.path.join(
    os.environ.get("PYTEST_CACHE_ROOT", "/tmp"), f"resnet_jax_test_cache_{os.getpid()}"
)
os.environ.setdefault("RESNET_JAX_TEST_COMPILE_CACHE", _CACHE)
# Every program goes into it, however quick its compile: the tests compile the
# same small programs in many processes and many fresh jit objects (train.py
# and launch keep the cache's 0.5 s minimum unless this variable is set).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["RESNET_JAX_TEST_COMPILE_CACHE"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )


def pytest_unconfigure(config):
    import shutil

    if os.environ["RESNET_JAX_TEST_COMPILE_CACHE"] == _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


# The quick tier (`pytest -m "not slow"`) leaves out these modules whole: each
# runs the real training loop, train.py or evaluate in subprocesses, several
# processes, or a storage emulator. Single slow tests elsewhere carry
# @pytest.mark.slow themselves.
SLOW_MODULES = (
    "tests/test_cli.py",
    "tests/test_evaluate.py",
    "tests/test_experiments.py",
    "tests/test_benchmarks_grain.py",
    "tests/data/test_corrupt_data.py",
    "tests/data/test_imagenet.py",
    "tests/data/test_prefetch.py",
    "tests/training/test_finetune.py",
    "tests/training/test_multiprocess.py",
    "tests/training/test_reliability.py",
    "tests/training/test_remote.py",
    "tests/training/test_resume.py",
    "tests/training/test_train.py",
)


def pytest_collection_modifyitems(config, items):
    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for item in items:
        if os.path.relpath(str(item.path), root) in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
