"""Pure parts of the live scenario evaluation: machine ids from run names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from factorywatch.live_evaluation import machine_name
from factorywatch.model.recording import Recording


def _rec(name: str) -> Recording:
    return Recording(
        path=Path(f"/runs/{name}.csv"),
        sha256="-",
        channels=["a"],
        columns={"a": np.zeros(3)},
    )


def test_machine_name_makes_a_valid_id_from_the_run_name() -> None:
    """A run's file name becomes its machine id; characters an id cannot hold become '-'."""
    assert machine_name(_rec("step_change_1")) == "step_change_1"
    assert machine_name(_rec("Pump 3 (night)")) == "Pump-3--night-"
    assert machine_name(_rec("_hidden")) == "hidden"


def test_machine_name_is_always_a_valid_id() -> None:
    """Nothing an id can start with, or a name too long: still a valid id, never a crash."""
    assert machine_name(_rec("___")) == "run"
    assert machine_name(_rec("x" * 70)) == "x" * 64
