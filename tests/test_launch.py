"""resnet_jax.launch: what the start-up path keeps off the screen, and the compilation cache it sets up."""

import asyncio
import gc
import logging
import os
import subprocess
import sys

import pytest

from resnet_jax import launch
from resnet_jax.errors import UserError


def _unretrieved_failed_task():
    """Makes asyncio report a failed task whose exception nobody retrieved, as
    orbax leaves its sibling reads of a damaged checkpoint."""

    async def fails():
        raise ValueError("OUT_OF_RANGE: a truncated array file")

    async def main():
        asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0)  # the task runs and fails; nobody awaits it

    asyncio.run(main())
    gc.collect()  # asyncio reports it when the task is collected


def test_unretrieved_task_reports_are_dropped_and_other_asyncio_messages_pass(caplog):
    asyncio_log = logging.getLogger("asyncio")
    before = list(asyncio_log.filters)
    try:
        with caplog.at_level(logging.ERROR):
            _unretrieved_failed_task()
        assert any("never retrieved" in r.getMessage() for r in caplog.records)  # as it was
        caplog.clear()
        launch.drop_unretrieved_task_noise()
        launch.drop_unretrieved_task_noise()  # idempotent: one filter
        assert len(asyncio_log.filters) == len(before) + 1
        with caplog.at_level(logging.ERROR):
            _unretrieved_failed_task()
            asyncio_log.error("another asyncio error")
        assert [r.getMessage() for r in caplog.records] == ["another asyncio error"]
    finally:
        asyncio_log.filters[:] = before


def test_the_compilation_cache_keeps_quick_programs_only_when_jax_is_told_to(tmp_path):
    """launch keeps programs of 0.5 s or more, unless JAX's own variable is set."""
    code = (
        "import jax\n"
        "from resnet_jax import launch\n"
        f"launch.start(launch.Options(compilation_cache_dir={str(tmp_path)!r}), log_level=None)\n"
        "print(jax.config.jax_compilation_cache_dir,"
        " jax.config.jax_persistent_cache_min_compile_time_secs)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    seen = {}
    for value in (None, "0", "2.5"):
        env.pop(launch.MIN_COMPILE_TIME_ENV, None)
        if value is not None:
            env[launch.MIN_COMPILE_TIME_ENV] = value
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        seen[value] = out.stdout.split()
    assert seen == {
        None: [str(tmp_path), "0.5"],
        "0": [str(tmp_path), "0.0"],
        "2.5": [str(tmp_path), "2.5"],
    }


def test_run_freezes_the_heap_when_main_ends_however_it_ends():
    """The exit then skips Python's final collection of every object."""

    def refused():
        raise UserError("a mistake")

    try:
        assert launch.run("t", lambda: 7) == 7
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        with pytest.raises(SystemExit) as e:
            launch.run("t", refused)
        assert e.value.code == 2 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
