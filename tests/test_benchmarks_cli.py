"""The benchmark scripts meet a bad model, batch or step count with one line
(exit status 2) before JAX starts, as train.py does."""

import pytest

from tests.test_commands import one_line_error, run_command

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "args, says",
    [
        (["--model", "resnet19"], "Unknown model 'resnet19'"),
        (["--batch-size", "0"], "--batch-size=0 must be a positive integer"),
        (["--steps", "-3"], "--steps=-3 must be a positive integer"),
        (["--repeats", "0"], "--repeats=0 must be a positive integer"),
        (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    ],
)
def test_bad_arguments_are_one_line(args, says):
    out = run_command("benchmarks.throughput", *args, "--results=")
    assert says in one_line_error(out)
