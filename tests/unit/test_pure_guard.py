"""The guard that keeps the pure tests pure (tests/conftest.py, ``tests.support``): a test
here that reaches for the AI4I dataset or starts a subprocess fails, saying what it did."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import reference_data_dir, reference_file


def test_reaching_for_the_dataset_fails_the_test() -> None:
    """Looking up the AI4I folder or a file in it fails this test with the way out."""
    for reach in (reference_data_dir, lambda: reference_file("ai4i2020.csv")):
        with pytest.raises(pytest.fail.Exception) as failed:
            reach()
        message = str(failed.value)
        assert "test_pure_guard.py::test_reaching_for_the_dataset_fails_the_test" in message
        assert "reached for the AI4I dataset" in message
        assert "small_model_dir" in message


def test_starting_a_subprocess_fails_the_test() -> None:
    """subprocess.run (every subprocess starts through Popen) fails this test before the
    child starts, naming the command."""
    with pytest.raises(pytest.fail.Exception, match=r"started a subprocess .*'-c', 'pass'"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
