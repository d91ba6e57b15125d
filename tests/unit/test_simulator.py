"""The machine simulator follows the AI4I generation rules and injects the documented faults."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from factorywatch.contracts import (
    AIR_TEMPERATURE,
    ANOMALY_KINDS,
    PROCESS_TEMPERATURE,
    ROTATIONAL_SPEED,
    TOOL_WEAR,
    TORQUE,
    AnomalyKind,
    Telemetry,
)
from factorywatch.sensors.simulator import MachineSimulator

T0 = 1.7e9
WEAR_STEP = {"L": 2.0, "M": 3.0, "H": 5.0}
OVERSTRAIN_LIMIT = {"L": 11_000.0, "M": 12_000.0, "H": 13_000.0}


def stream(seed: int, n: int, **kwargs: float) -> list[Telemetry]:
    """``n`` consecutive readings of one simulated machine."""
    sim = MachineSimulator("mill-01", "line1", seed=seed, **kwargs)  # type: ignore[arg-type]
    return [sim.next(T0 + i) for i in range(n)]


def column(readings: list[Telemetry], channel: str) -> np.ndarray:
    """One channel of ``readings`` as an array."""
    return np.array([r.readings[channel] for r in readings])


def power_w(r: Telemetry) -> float:
    """Mechanical power of a reading: torque times angular speed."""
    return r.readings[TORQUE] * r.readings[ROTATIONAL_SPEED] * 2 * math.pi / 60


@pytest.fixture(scope="module")
def normal() -> list[Telemetry]:
    """5000 anomaly-free readings of one machine."""
    return stream(seed=11, n=5000)


@pytest.fixture(scope="module")
def fleet() -> list[list[Telemetry]]:
    """50 independent machines x 100 readings (5000 readings with independent walks)."""
    return [stream(seed=1000 + k, n=100) for k in range(50)]


# -- determinism and metadata ----------------------------------------------------------------


def test_same_seed_gives_identical_readings() -> None:
    """Two simulators with one seed produce byte-identical messages, anomalies included."""
    a = stream(seed=42, n=500, anomaly_rate=0.1)
    b = stream(seed=42, n=500, anomaly_rate=0.1)
    assert [r.encode() for r in a] == [r.encode() for r in b]


def test_different_seeds_give_different_readings() -> None:
    """Another seed gives another sequence."""
    assert [r.readings for r in stream(1, 50)] != [r.readings for r in stream(2, 50)]


def test_sequence_numbers_timestamps_and_ids() -> None:
    """Readings carry consecutive sequence numbers from seq_start, the given ts and ids."""
    sim = MachineSimulator("mill-07", "line3", seed=0, seq_start=100)
    readings = [sim.next(T0 + 0.5 * i) for i in range(20)]
    assert [r.seq for r in readings] == list(range(100, 120))
    assert [r.ts for r in readings] == [T0 + 0.5 * i for i in range(20)]
    assert {(r.machine_id, r.line) for r in readings} == {("mill-07", "line3")}


def test_normal_readings_carry_the_ai4i_channels_and_no_ground_truth(
    normal: list[Telemetry],
) -> None:
    """With anomaly_rate 0 every reading has the five channels and ``injected`` None."""
    channels = {AIR_TEMPERATURE, PROCESS_TEMPERATURE, ROTATIONAL_SPEED, TORQUE, TOOL_WEAR}
    assert all(set(r.readings) == channels for r in normal)
    assert all(r.injected is None for r in normal)


# -- the AI4I generation rules ---------------------------------------------------------------


def test_air_temperature_mean_and_spread(fleet: list[list[Telemetry]]) -> None:
    """Air temperature averages 300 K (+-1.5) with a standard deviation of about 2 K."""
    air = np.concatenate([column(m, AIR_TEMPERATURE) for m in fleet])
    assert abs(air.mean() - 300.0) < 1.5
    assert 1.5 < air.std() < 2.6


def test_process_air_difference_mean_and_spread(fleet: list[list[Telemetry]]) -> None:
    """Process minus air temperature averages 10 K (+-0.5) with a spread of about 1 K."""
    diff = np.concatenate(
        [column(m, PROCESS_TEMPERATURE) - column(m, AIR_TEMPERATURE) for m in fleet]
    )
    assert abs(diff.mean() - 10.0) < 0.5
    assert 0.7 < diff.std() < 1.3


def test_one_machine_temperatures_stay_plausible(normal: list[Telemetry]) -> None:
    """A single long stream keeps both temperatures in a physically plausible band."""
    air = column(normal, AIR_TEMPERATURE)
    diff = column(normal, PROCESS_TEMPERATURE) - air
    assert abs(air.mean() - 300.0) < 5.0
    assert air.min() > 290.0
    assert air.max() < 310.0
    assert diff.min() > 6.0
    assert diff.max() < 14.0


def test_torque_distribution(normal: list[Telemetry]) -> None:
    """Torque is about N(40, 10) Nm and never negative."""
    torque = column(normal, TORQUE)
    assert abs(torque.mean() - 40.0) < 2.0
    assert 8.0 < torque.std() < 12.0
    assert torque.min() >= 3.8


def test_speed_falls_with_torque(normal: list[Telemetry]) -> None:
    """Rotational speed is strongly anti-correlated with torque and stays in the data's range."""
    speed = column(normal, ROTATIONAL_SPEED)
    torque = column(normal, TORQUE)
    assert np.corrcoef(speed, torque)[0, 1] < -0.8
    assert np.percentile(speed, 1) > 1150.0
    assert np.median(speed) == pytest.approx(1500.0, abs=100.0)


def test_product_type_mix(normal: list[Telemetry]) -> None:
    """Product types come in the data's 60/30/10 mix of L/M/H."""
    counts: Counter[str] = Counter(r.attributes["product_type"] for r in normal)
    shares = {t: counts[t] / len(normal) for t in "LMH"}
    assert shares["L"] == pytest.approx(0.6, abs=0.03)
    assert shares["M"] == pytest.approx(0.3, abs=0.03)
    assert shares["H"] == pytest.approx(0.1, abs=0.02)


def test_tool_wear_step_follows_previous_product_type(normal: list[Telemetry]) -> None:
    """Wear grows by 2/3/5 min for the previous reading's L/M/H, or resets to 0."""
    resets = 0
    for prev, cur in itertools.pairwise(normal):
        step = cur.readings[TOOL_WEAR] - prev.readings[TOOL_WEAR]
        if cur.readings[TOOL_WEAR] == 0.0:
            resets += 1
            continue
        assert step == WEAR_STEP[prev.attributes["product_type"]], (prev, cur)
    assert resets > 20


def test_tool_is_replaced_between_200_and_240_minutes(normal: list[Telemetry]) -> None:
    """Wear never reaches 240 min, and it resets only once it would reach 200 min."""
    wear = column(normal, TOOL_WEAR)
    assert wear.min() == 0.0
    assert wear.max() < 240.0
    replaced_at = [
        prev.readings[TOOL_WEAR] + WEAR_STEP[prev.attributes["product_type"]]
        for prev, cur in itertools.pairwise(normal)
        if cur.readings[TOOL_WEAR] == 0.0
    ]
    assert replaced_at
    assert min(replaced_at) >= 200.0
    # Replacement points spread over the 200-240 window rather than sitting at one value.
    assert max(replaced_at) - min(replaced_at) > 20.0


# -- forced anomalies ------------------------------------------------------------------------


def forced(kind: AnomalyKind, n: int = 300, seed: int = 5) -> list[Telemetry]:
    """``n`` readings each forced to be a one-reading anomaly of ``kind``."""
    sim = MachineSimulator("mill-01", "line1", seed=seed)
    return [sim.next(T0 + i, inject=kind) for i in range(n)]


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_forced_anomaly_is_marked_as_ground_truth(kind: AnomalyKind) -> None:
    """Every forced reading is marked with the injected kind."""
    assert {r.injected for r in forced(kind, n=20)} == {kind}


def test_forced_rpm_spike_reads_2800_rpm() -> None:
    """An rpm spike is the prototype's 2800 rpm reading."""
    assert {r.readings[ROTATIONAL_SPEED] for r in forced("rpm_spike")} == {2800.0}


def test_forced_heat_dissipation_meets_the_hdf_rule() -> None:
    """Heat-dissipation faults have process-air difference < 8.6 K and speed < 1380 rpm."""
    for r in forced("heat_dissipation"):
        assert r.readings[PROCESS_TEMPERATURE] - r.readings[AIR_TEMPERATURE] < 8.6, r
        assert r.readings[ROTATIONAL_SPEED] < 1380.0, r


def test_forced_power_meets_the_pwf_rule() -> None:
    """Power faults have power < 3500 W or > 9000 W, and both sides occur."""
    powers = [power_w(r) for r in forced("power")]
    assert all(p < 3500.0 or p > 9000.0 for p in powers)
    assert any(p < 3500.0 for p in powers)
    assert any(p > 9000.0 for p in powers)


def test_forced_overstrain_meets_the_osf_rule() -> None:
    """Overstrain faults have wear x torque above the product type's limit."""
    readings = forced("overstrain")
    for r in readings:
        strain = r.readings[TOOL_WEAR] * r.readings[TORQUE]
        assert strain > OVERSTRAIN_LIMIT[r.attributes["product_type"]], r
    assert {r.product_type for r in readings} == {"L", "M", "H"}


def test_forced_tool_wear_meets_the_twf_rule() -> None:
    """Tool-wear faults have at least 245 min of wear."""
    assert min(r.readings[TOOL_WEAR] for r in forced("tool_wear")) >= 245.0


def test_forced_stuck_sensor_reads_zero_torque() -> None:
    """A stuck torque sensor reads exactly 0 Nm."""
    assert {r.readings[TORQUE] for r in forced("stuck_sensor")} == {0.0}


@pytest.mark.parametrize("kind", ["rpm_spike", "stuck_sensor", "tool_wear"])
def test_forced_anomaly_changes_only_its_own_channels(kind: AnomalyKind) -> None:
    """Against a twin with the same seed, a forced point fault changes only its channel."""
    changed = {"rpm_spike": ROTATIONAL_SPEED, "stuck_sensor": TORQUE, "tool_wear": TOOL_WEAR}
    plain = MachineSimulator("mill-01", "line1", seed=9).next(T0)
    faulty = MachineSimulator("mill-01", "line1", seed=9).next(T0, inject=kind)
    differs = {ch for ch in plain.readings if plain.readings[ch] != faulty.readings[ch]}
    assert differs == {changed[kind]}


def test_forced_drift_raises_process_temperature() -> None:
    """A forced drift reading has a higher process temperature than its unforced twin."""
    plain = MachineSimulator("mill-01", "line1", seed=9).next(T0)
    drifted = MachineSimulator("mill-01", "line1", seed=9).next(T0, inject="drift")
    assert drifted.injected == "drift"
    assert drifted.readings[PROCESS_TEMPERATURE] >= plain.readings[PROCESS_TEMPERATURE] + 2.0


def test_forced_anomalies_do_not_disturb_tool_wear_state() -> None:
    """After a forced overstrain, wear continues from the machine's real state."""
    sim = MachineSimulator("mill-01", "line1", seed=3)
    first = sim.next(T0)
    sim.next(T0 + 1, inject="overstrain")
    third = sim.next(T0 + 2)
    assert third.readings[TOOL_WEAR] <= first.readings[TOOL_WEAR] + 10.0


# -- the anomaly rate ------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "seed"), [(0.02, 1), (0.02, 2), (0.1, 3)])
def test_anomaly_rate_sets_the_anomalous_share(rate: float, seed: int) -> None:
    """Over 20,000 readings the share marked anomalous is within rate +- 50 %."""
    readings = stream(seed=seed, n=20_000, anomaly_rate=rate)
    share = sum(r.injected is not None for r in readings) / len(readings)
    assert rate * 0.5 <= share <= rate * 1.5
    assert len({r.injected for r in readings} - {None}) >= 5


def test_single_kind_anomalies_only_inject_that_kind() -> None:
    """Restricting ``anomalies`` to one kind injects only that kind."""
    sim = MachineSimulator("m", "l", seed=4, anomaly_rate=0.2, anomalies=["stuck_sensor"])
    kinds = {sim.next(T0 + i).injected for i in range(2000)}
    assert kinds == {None, "stuck_sensor"}


def test_stuck_sensor_episodes_last_several_readings() -> None:
    """A stuck-sensor episode keeps torque at 0 for 5 to 15 consecutive readings."""
    sim = MachineSimulator("m", "l", seed=8, anomaly_rate=0.1, anomalies=["stuck_sensor"])
    flags = [sim.next(T0 + i).readings[TORQUE] == 0.0 for i in range(5000)]
    runs: list[int] = []
    length = 0
    for flag in [*flags, False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    assert runs
    # Two episodes can start back to back, so a run is a sum of 5..15-reading episodes.
    assert min(runs) >= 5


def test_zero_rate_never_injects() -> None:
    """anomaly_rate 0 produces no anomalies at all."""
    assert all(r.injected is None for r in stream(seed=6, n=3000, anomaly_rate=0.0))


def test_unknown_anomaly_kind_raises() -> None:
    """An unknown anomaly kind is refused with ValueError, at construction or when forced."""
    with pytest.raises(ValueError, match="unknown anomaly kinds"):
        MachineSimulator("m", "l", anomalies=["rpm_spike", "meteor_strike"])
    sim = MachineSimulator("m", "l", seed=0)
    with pytest.raises(ValueError, match="injected"):
        sim.next(T0, inject="meteor_strike")  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [-0.01, 1.01])
def test_anomaly_rate_outside_unit_interval_raises(rate: float) -> None:
    """An anomaly rate outside [0, 1] is refused with ValueError."""
    with pytest.raises(ValueError, match="anomaly rate"):
        MachineSimulator("m", "l", anomaly_rate=rate)
