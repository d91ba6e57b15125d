"""A simulated milling machine following the AI4I 2020 generation rules (pure).

Normal readings: air temperature is a mean-reverting random walk (mean 300 K, sd 2 K),
process temperature = air + 10 K + a second walk (sd 1 K), torque ~ N(40, 10) Nm (>0),
speed falls with torque as in the data (rpm ~ 5870 * torque^-0.368, 3.6 % noise), tool wear
grows by 2/3/5 min for L/M/H products and the tool is replaced at a random 200-240 min.

Anomalies (each marked in the message as ground truth): ``rpm_spike`` (the prototype's
2800 rpm), ``heat_dissipation``, ``power``, ``overstrain``, ``tool_wear``, ``stuck_sensor``
(a dead torque transducer reading 0 for several readings) and ``drift`` (process temperature
drifting upward over tens of readings).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from factorywatch.contracts import (
    AIR_TEMPERATURE,
    ANOMALY_KINDS,
    PROCESS_TEMPERATURE,
    PRODUCT_TYPE,
    ROTATIONAL_SPEED,
    TOOL_WEAR,
    TORQUE,
    AnomalyKind,
    ProductType,
    Telemetry,
)

AIR_MEAN_K: Final = 300.0
AIR_SD_K: Final = 2.0
AIR_PHI: Final = 0.99942  # lag-1 autocorrelation of the data's air temperature
DIFF_MEAN_K: Final = 10.0
DIFF_SD_K: Final = 1.0
DIFF_PHI: Final = 0.9975
SPEED_SCALE: Final = 5870.0
SPEED_EXPONENT: Final = -0.368
SPEED_NOISE: Final = 0.0357
WEAR_STEP: Final = {"L": 2, "M": 3, "H": 5}
TYPE_WEIGHTS: Final = (("L", 0.6), ("M", 0.3), ("H", 0.1))
SPIKE_RPM: Final = 2800.0
_EPISODE_LENGTH: Final = {"stuck_sensor": (5, 15), "drift": (40, 80)}
DRIFT_MAX_K: Final = 8.0


def _speed_for(torque: float) -> float:
    return float(SPEED_SCALE * torque**SPEED_EXPONENT)


def _torque_for(speed: float) -> float:
    return float((speed / SPEED_SCALE) ** (1.0 / SPEED_EXPONENT))


@dataclass
class _Values:
    """The physical values of one reading, before rounding."""

    air: float
    process: float
    speed: float
    torque: float
    wear: float


@dataclass
class _Episode:
    kind: AnomalyKind
    left: int
    length: int


class MachineSimulator:
    """Generates one machine's readings; deterministic for a given seed."""

    def __init__(
        self,
        machine_id: str,
        line: str,
        *,
        seed: int | None = None,
        anomaly_rate: float = 0.0,
        anomalies: Sequence[str] = ANOMALY_KINDS,
        seq_start: int = 0,
    ) -> None:
        unknown = set(anomalies) - set(ANOMALY_KINDS)
        if unknown:
            raise ValueError(f"unknown anomaly kinds {sorted(unknown)}; known: {ANOMALY_KINDS}")
        if not 0.0 <= anomaly_rate <= 1.0:
            raise ValueError(f"anomaly rate must be in [0, 1], got {anomaly_rate}")
        self.machine_id = machine_id
        self.line = line
        self.anomaly_rate = anomaly_rate
        self.anomalies: tuple[AnomalyKind, ...] = tuple(anomalies)  # type: ignore[arg-type]
        self.seq = seq_start
        self._rng = random.Random(seed)
        self._air_walk = self._rng.gauss(0.0, 1.0)
        self._diff_walk = self._rng.gauss(0.0, 1.0)
        self._wear = 0.0
        self._replace_at = self._rng.uniform(200.0, 240.0)
        self._episode: _Episode | None = None

    def _step_state(self, product: ProductType) -> tuple[float, float, float]:
        rng = self._rng
        self._air_walk = AIR_PHI * self._air_walk + math.sqrt(1 - AIR_PHI**2) * rng.gauss(0, 1)
        self._diff_walk = DIFF_PHI * self._diff_walk + math.sqrt(1 - DIFF_PHI**2) * rng.gauss(0, 1)
        air = AIR_MEAN_K + AIR_SD_K * self._air_walk
        process = air + DIFF_MEAN_K + DIFF_SD_K * self._diff_walk
        wear = self._wear
        self._wear += WEAR_STEP[product]
        if self._wear >= self._replace_at:
            self._wear = 0.0
            self._replace_at = rng.uniform(200.0, 240.0)
        return air, process, wear

    def _start_episode(self) -> None:
        # Episodes start with probability rate / mean length, so about ``anomaly_rate`` of
        # all readings are anomalous whatever mix of point and long anomalies is chosen.
        if self._episode is not None or not self.anomalies:
            return
        kind = self._rng.choice(self.anomalies)
        low, high = _EPISODE_LENGTH.get(kind, (1, 1))
        if self._rng.random() < self.anomaly_rate * 2.0 / (low + high):
            length = self._rng.randint(low, high)
            self._episode = _Episode(kind=kind, left=length, length=length)

    def next(self, ts: float, inject: AnomalyKind | None = None) -> Telemetry:
        """The next reading at event time ``ts``; ``inject`` forces a one-reading anomaly."""
        rng = self._rng
        product: ProductType = rng.choices(
            [t for t, _ in TYPE_WEIGHTS], weights=[w for _, w in TYPE_WEIGHTS]
        )[0]  # type: ignore[assignment]
        air, process, wear = self._step_state(product)
        torque = max(3.8, rng.gauss(40.0, 10.0))
        values = _Values(
            air, process, _speed_for(torque) * math.exp(rng.gauss(0, SPEED_NOISE)), torque, wear
        )
        if inject is None:
            self._start_episode()
        kind = inject or (self._episode.kind if self._episode else None)
        if kind is not None:
            self._apply(kind, values)
        if self._episode is not None and inject is None:
            self._episode.left -= 1
            if self._episode.left <= 0:
                self._episode = None
        reading = Telemetry(
            machine_id=self.machine_id,
            line=self.line,
            seq=self.seq,
            ts=ts,
            attributes={PRODUCT_TYPE: product},
            readings={
                AIR_TEMPERATURE: round(values.air, 2),
                PROCESS_TEMPERATURE: round(values.process, 2),
                ROTATIONAL_SPEED: round(values.speed, 1),
                TORQUE: round(values.torque, 2),
                TOOL_WEAR: round(values.wear, 1),
            },
            injected=kind,
        )
        self.seq += 1
        return reading

    def _apply(self, kind: AnomalyKind, v: _Values) -> None:
        """Turn normal values into the physical condition of anomaly ``kind`` (in place)."""
        rng = self._rng
        if kind == "rpm_spike":
            v.speed = SPIKE_RPM
        elif kind == "heat_dissipation":
            v.process = v.air + rng.uniform(7.0, 8.5)
            v.speed = rng.uniform(1200.0, 1370.0)
            v.torque = _torque_for(v.speed)
        elif kind == "power":
            if rng.random() < 0.5:  # overload: high torque at high speed
                v.torque = rng.uniform(62.0, 75.0)
                v.speed = rng.uniform(1450.0, 1700.0)
            else:  # underpowered: low torque at low-ish speed
                v.torque = rng.uniform(4.0, 12.0)
                v.speed = rng.uniform(1500.0, 2200.0)
        elif kind == "overstrain":
            v.wear = rng.uniform(200.0, 240.0)
            v.torque = 13_000.0 / v.wear * rng.uniform(1.1, 1.4)
            v.speed = _speed_for(v.torque)
        elif kind == "tool_wear":
            v.wear = rng.uniform(245.0, 290.0)
        elif kind == "stuck_sensor":
            v.torque = 0.0
        elif kind == "drift":
            # Inside an episode the offset grows; a forced single reading gets the full drift.
            episode = self._episode
            progress = 1.0 - episode.left / episode.length if episode is not None else 1.0
            v.process += DRIFT_MAX_K * (0.25 + 0.75 * progress)
