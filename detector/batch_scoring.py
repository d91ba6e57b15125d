"""The detector's pure scoring of a batch: decode -> validate -> features -> score -> verdicts.

No paho, no files, no logging: values in, values out. The MQTT shell feeds it raw
``(topic, payload, received_at)`` triples and publishes what comes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from factorywatch import contracts
from factorywatch.contracts import (
    AI4I_CHANNELS,
    DEFAULT_MAX_FUTURE_SKEW_S,
    MAX_DETAIL,
    MAX_TOPIC,
    PRODUCT_TYPE,
    Calibration,
    Contribution,
    DeadLetter,
    Telemetry,
    Verdict,
)
from factorywatch.detector.registry import Registry
from factorywatch.errors import PayloadError
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.envelope import outside_parts
from factorywatch.model.fastforest import FlatForest
from factorywatch.model.features import PRODUCT_TYPE_COLUMN, TYPE_CODE, compute_features
from factorywatch.model.forest_stack import ForestStack
from factorywatch.model.pipeline import Z_CLIP, Pipeline, State
from factorywatch.model.scoring import explain
from factorywatch.topics import Topics
from factorywatch.verdict_codec import build_verdict

Clock = Callable[[], float]
#: the stopwatch a verdict's ``latency_ms`` is measured with (its shell hands it to the engine)
STOPWATCH: Clock = time.perf_counter
#: (machine, line) -> (channels, attributes) a reading of that machine must carry
Requirements = Callable[[str, str], tuple[Sequence[str], Sequence[str]]]
#: model_version of a CALIBRATING verdict (no model has judged the reading)
CALIBRATING_VERSION = "calibrating"
# The model version a machine's window state was built by (in the state itself).
MODEL_KEY = "model"


@dataclass(frozen=True, slots=True)
class Received:
    """A raw message as a transport received it; ``token`` is the transport's handle to ack."""

    topic: str
    payload: bytes
    received_at: float  # wall clock, Unix seconds
    received_perf: float  # perf_counter at receipt, for processing latency
    token: Any = None


def required_attributes(channels: Sequence[str]) -> tuple[str, ...]:
    """Attributes a model on ``channels`` needs: the AI4I preset's strain ratio needs the
    product type."""
    return (PRODUCT_TYPE,) if set(channels) & set(AI4I_CHANNELS) else ()


class Decoder:
    """Turns raw messages into validated readings or raises ``PayloadError`` with a reason."""

    def __init__(
        self,
        topics: Topics,
        *,
        channels: Sequence[str],
        max_clock_skew_s: float,
        max_future_skew_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
        machines: frozenset[str] | None = None,
        registry: Registry | None = None,
        attributes: Sequence[str] | None = None,
        requirements: Requirements | None = None,
    ) -> None:
        self.topics = topics
        self.channels = tuple(channels)
        if attributes is None:
            attributes = required_attributes(self.channels)
        self.attributes = tuple(attributes)
        self.max_clock_skew_s = max_clock_skew_s  # how far in the past
        self.max_future_skew_s = max_future_skew_s
        self.machines = machines
        self.registry = registry
        #: per machine (and line): the channels and attributes its model needs, when machines
        #: are served by different models (the router); None: ``channels`` for every machine
        self.requirements = requirements

    def decode(self, msg: Received) -> Telemetry:
        """Validate one message; the machine id in the topic is the one trusted.

        Times are checked against ``msg.received_at`` (the receiver's clock at receipt).
        """
        line, machine = self.topics.parse_telemetry(msg.topic)
        reading = contracts.decode(
            Telemetry,
            msg.payload,
            now=msg.received_at,
            max_future_s=self.max_future_skew_s,
            max_past_s=self.max_clock_skew_s,
        )
        return self._check(reading, line, machine)

    def decode_batch(self, msg: Received) -> list[Telemetry | PayloadError]:
        """Validate a gateway's batch: each reading is accepted or rejected on its own.

        A payload that is not a batch at all raises ``PayloadError``; otherwise the result
        has one entry per reading, in order, either the reading or why it was rejected.
        """
        line, gateway = self.topics.parse_batch(msg.topic)
        readings = contracts.decode_batch(
            msg.payload,
            now=msg.received_at,
            max_future_s=self.max_future_skew_s,
            max_past_s=self.max_clock_skew_s,
        )
        return [
            r if isinstance(r, PayloadError) else self._checked(r, line, gateway) for r in readings
        ]

    def _checked(self, reading: Telemetry, line: str, gateway: str) -> Telemetry | PayloadError:
        try:
            return self._check(reading, line, None, sender=gateway)
        except PayloadError as error:
            return error

    def _check(
        self, reading: Telemetry, line: str, machine: str | None, sender: str | None = None
    ) -> Telemetry:
        """Checks beyond the schema: topic agreement, registry, clock, channels.

        ``sender`` is the topic's last level (the login): the machine, or the gateway.
        """
        if reading.line != line or (machine is not None and reading.machine_id != machine):
            raise PayloadError(
                "topic_mismatch",
                f"payload says {reading.line}/{reading.machine_id}, "
                f"topic says {line}/{machine or '<gateway>'}",
            )
        if self.machines is not None and reading.machine_id not in self.machines:
            raise PayloadError(
                "unknown_machine", f"machine {reading.machine_id!r} is not registered"
            )
        if self.registry is not None:
            refused = self.registry.check(sender or reading.machine_id, reading.machine_id, line)
            if refused is not None:
                who = sender or reading.machine_id
                detail = self.registry.refusal(who, reading.machine_id, reading.line, refused)
                raise PayloadError(refused, detail)
        channels: Sequence[str] = self.channels
        attributes: Sequence[str] = self.attributes
        if self.requirements is not None:
            channels, attributes = self.requirements(reading.machine_id, reading.line)
        missing = [c for c in channels if c not in reading.readings]
        if missing:
            raise PayloadError("missing_channel", f"reading lacks channels {missing}")
        absent = [a for a in attributes if a not in reading.attributes]
        if absent:
            raise PayloadError("missing_channel", f"reading lacks attributes {absent}")
        if PRODUCT_TYPE in attributes and reading.attributes[PRODUCT_TYPE] not in TYPE_CODE:
            raise PayloadError(
                "schema", f"attribute product_type must be one of {sorted(TYPE_CODE)}"
            )
        return reading


def dead_letter(msg: Received, error: PayloadError) -> DeadLetter:
    """The dead-letter record for a rejected message."""
    return DeadLetter(
        reason=error.reason,
        detail=error.detail[:MAX_DETAIL],
        topic=msg.topic[:MAX_TOPIC],
        payload_bytes=len(msg.payload),
        payload_excerpt=msg.payload[:200].decode("utf-8", errors="replace"),
        received_at=msg.received_at,
    )


def score(
    model: LoadedModel,
    readings: Sequence[Telemetry],
    received_perf: Sequence[float],
    *,
    explain_top_k: int,
    perf_clock: Clock = time.perf_counter,
    states: dict[str, State] | None = None,
) -> list[Verdict]:
    """Score a batch of readings with one vectorised call; one verdict per reading.

    A verdict is ALERT when its score is above the model's threshold, when a channel is
    outside the training envelope (``outside_training`` names them) or when the machine's
    recent scores are unusual for it (``surprise``, generic models with the rule).

    A generic model (``card.pipeline``) computes each reading's features with the pipeline's
    streaming ``step`` over its machine's window state, in batch order: ``states`` maps
    machine id -> state (default: the model's own ``states``, until the engine keeps them).
    """
    if not readings:
        return []
    card = model.card
    if model.pipeline is not None:
        return _score_pipeline(
            model,
            readings,
            received_perf,
            explain_top_k=explain_top_k,
            perf_clock=perf_clock,
            states=model.states if states is None else states,
        )
    channels = card.channels
    # One array for every channel (its columns are views): one numpy call, not one per channel
    values = np.array([[r.readings[ch] for ch in channels] for r in readings], dtype=np.float64)
    columns = {ch: values[:, j] for j, ch in enumerate(channels)}
    # A reading without a (known) product type scores with code NaN: the decoder refuses
    # such readings for models that need it, so this only reaches features that ignore it.
    columns[PRODUCT_TYPE_COLUMN] = np.fromiter(
        (TYPE_CODE.get(r.attributes.get(PRODUCT_TYPE, ""), np.nan) for r in readings),
        np.float64,
        len(readings),
    )
    matrix = compute_features(columns, card.features)
    scores = model.scorer.score(matrix)
    return _verdicts(
        model,
        readings,
        received_perf,
        columns=columns,
        matrix=matrix,
        scores=scores,
        surprises=[None] * len(readings),
        explain_top_k=explain_top_k,
        perf_clock=perf_clock,
    )


def _score_pipeline(
    model: LoadedModel,
    readings: Sequence[Telemetry],
    received_perf: Sequence[float],
    *,
    explain_top_k: int,
    perf_clock: Clock,
    states: dict[str, State],
) -> list[Verdict]:
    """Scores of a generic model: streaming features per machine, one scorer call."""
    pipeline = model.pipeline
    assert pipeline is not None
    version = model.card.version
    keyed = [_window_state(states, r.machine_id, version) for r in readings]
    named = np.array(
        [
            pipeline.step_features(state, r.readings, r.attributes)
            for state, r in zip(keyed, readings, strict=True)
        ],
        dtype=np.float64,
    )
    raw = model.scorer.score(pipeline.project(named))
    scores = np.array(
        [pipeline.smooth_step(state, v) for state, v in zip(keyed, raw.tolist(), strict=True)],
        dtype=np.float64,
    )
    surprises = _surprises(pipeline, keyed, scores.tolist())
    columns = {
        ch: np.fromiter((r.readings[ch] for r in readings), np.float64, len(readings))
        for ch in model.card.channels
    }
    return _verdicts(
        model,
        readings,
        received_perf,
        columns=columns,
        matrix=named,
        scores=scores,
        surprises=surprises,
        explain_top_k=explain_top_k,
        perf_clock=perf_clock,
    )


def _surprises(
    pipeline: Pipeline, keyed: Sequence[State], scores: Sequence[float]
) -> list[float | None]:
    """Per reading, its surprise when the rule makes it an ALERT (``Pipeline.surprise_step``
    over its machine's state, after ``smooth_step``), else None."""
    if pipeline.spec.surprise is None:
        return [None] * len(scores)
    step = pipeline.surprise_step
    return [step(state, v) for state, v in zip(keyed, scores, strict=True)]


def _window_state(states: dict[str, State], machine: str, version: str) -> State:
    """``machine``'s window state for the model ``version`` (another model's: started over)."""
    state = states.setdefault(machine, {})
    if state.get(MODEL_KEY) != version:
        state.clear()
        state[MODEL_KEY] = version
    return state


def _contributions(
    features: Sequence[str], row: npt.NDArray[np.float64], top: Sequence[tuple[int, float]]
) -> list[Contribution]:
    """An alerting row's explanation: its top features' values and z-scores."""
    # Not validated: a feature may overflow to inf, which encodes as null.
    return [
        Contribution.model_construct(feature=features[j], value=float(row[j]), z=round(z, 3))
        for j, z in top
    ]


def _verdicts(
    model: LoadedModel,
    readings: Sequence[Telemetry],
    received_perf: Sequence[float],
    *,
    columns: dict[str, npt.NDArray[np.float64]],
    matrix: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    surprises: Sequence[float | None],
    explain_top_k: int,
    perf_clock: Clock,
) -> list[Verdict]:
    """Thresholds, envelope, surprise and explanations -> one verdict per reading."""
    card = model.card
    threshold = card.threshold
    rows = len(readings)
    outside = card.envelope.outside(columns, rows) if card.envelope else [None] * rows
    done = perf_clock()
    values = scores.tolist()
    alerting = [
        i
        for i, v in enumerate(values)
        if v > threshold or outside[i] is not None or surprises[i] is not None
    ]
    explanations: dict[int, list[Contribution]] = {}
    if explain_top_k and alerting:
        top = explain(matrix[alerting], model.center, model.scale, explain_top_k)
        for i, contributions in zip(alerting, top, strict=True):
            explanations[i] = _contributions(card.features, matrix[i], contributions)
    flagged = set(alerting)
    return [
        build_verdict(
            reading.machine_id,
            reading.line,
            reading.seq,
            reading.ts,
            "ALERT" if i in flagged else "NORMAL",
            value,
            threshold,
            card.version,
            round((done - received_perf[i]) * 1000.0, 3),
            explanations.get(i),
            outside[i],
            surprises[i],
        )
        for i, (reading, value) in enumerate(zip(readings, values, strict=True))
    ]


@dataclass(frozen=True, slots=True)
class Part:
    """Readings that all route to one model, and the window states of their machines."""

    model: LoadedModel
    readings: Sequence[Telemetry]
    received_perf: Sequence[float]
    states: dict[str, State]


def stackable(model: LoadedModel) -> bool:
    """Whether ``score_parts`` can score this model's readings (a windowed flat forest)."""
    return model.pipeline is not None and isinstance(model.scorer, FlatForest)


def score_parts(
    parts: Sequence[Part],
    stack: ForestStack,
    *,
    explain_top_k: int,
    perf_clock: Clock = time.perf_counter,
) -> list[list[Verdict]]:
    """Score parts routed to different windowed forests together; one verdict list per part.

    Each verdict is what ``score(part.model, part.readings, ...)`` gives (bit-identical
    scores, statuses and explanations; only ``latency_ms`` differs), but the fixed costs
    are paid once: one forest walk for every row (``stack``, which learns the forests it
    lacks), one envelope check and one explanation call. The whitening's matrix product
    stays one call per part: BLAS rounds a product differently for different row counts.
    """
    for part in parts:
        if not stackable(part.model):
            raise ValueError(f"model {part.model.version} is not a windowed flat forest")
    parts = [p for p in parts if p.readings]
    if not parts:
        return []
    named_rows: list[list[float]] = []
    keyed: list[State] = []
    for part in parts:
        pipeline = part.model.pipeline
        assert pipeline is not None
        version = part.model.card.version
        for r in part.readings:
            state = _window_state(part.states, r.machine_id, version)
            keyed.append(state)
            named_rows.append(pipeline.step_features(state, r.readings, r.attributes))
    counts = [len(p.readings) for p in parts]
    bounds = np.cumsum([0, *counts]).tolist()
    raw = np.empty(len(named_rows), dtype=np.float64)
    widths: dict[int, list[int]] = {}  # features per row -> parts (one forest walk each)
    for k in range(len(parts)):
        widths.setdefault(len(named_rows[bounds[k]]), []).append(k)
    if len(widths) == 1:  # as usual: one matrix, each part a view of its rows
        named = np.array(named_rows, dtype=np.float64)
        named_parts = [named[bounds[k] : bounds[k + 1]] for k in range(len(parts))]
    else:
        named_parts = [
            np.array(named_rows[bounds[k] : bounds[k + 1]], dtype=np.float64)
            for k in range(len(parts))
        ]
    for chosen in widths.values():
        raw_part = _stacked_raw(parts, chosen, named_parts, stack)
        at = 0
        for k in chosen:
            raw[bounds[k] : bounds[k + 1]] = raw_part[at : at + counts[k]]
            at += counts[k]
    values = raw.tolist()
    scores: list[float] = []
    surprises: list[float | None] = []
    for k, part in enumerate(parts):
        pipeline = part.model.pipeline
        assert pipeline is not None
        smooth = pipeline.smooth_step
        part_scores = [smooth(keyed[i], values[i]) for i in range(bounds[k], bounds[k + 1])]
        scores += part_scores
        surprises += _surprises(pipeline, keyed[bounds[k] : bounds[k + 1]], part_scores)
    return _stacked_verdicts(
        parts,
        counts,
        named_parts,
        scores,
        surprises,
        explain_top_k=explain_top_k,
        perf_clock=perf_clock,
    )


def _stacked_raw(
    parts: Sequence[Part],
    chosen: Sequence[int],
    named_parts: Sequence[npt.NDArray[np.float64]],
    stack: ForestStack,
) -> npt.NDArray[np.float64]:
    """Raw forest scores of the rows of parts ``chosen`` (same feature width), in order."""
    named = np.concatenate([named_parts[k] for k in chosen])
    counts = [named_parts[k].shape[0] for k in chosen]
    whitenings = [parts[k].model.pipeline.whitening for k in chosen]  # type: ignore[union-attr]
    forests = np.repeat(
        [stack.add(parts[k].model.scorer) for k in chosen],  # type: ignore[arg-type]
        counts,
    )
    white = [i for i, w in enumerate(whitenings) if w is not None]
    if not white:
        return stack.score(named, forests)
    offsets = np.cumsum([0, *counts]).tolist()
    every = len(white) == len(chosen)
    rows = (
        np.arange(named.shape[0])
        if every
        else np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in white])
    )
    spans = [counts[i] for i in white]
    matrices = [w for w in whitenings if w is not None]
    mean = np.repeat(np.array([m for m, _, _ in matrices]), spans, axis=0)
    scale = np.repeat(np.array([s for _, s, _ in matrices]), spans, axis=0)
    # Elementwise steps on every row at once give each element what ``Pipeline.project``
    # gives it; the product runs per part, on the row count of the per-model path.
    z = (named[rows] - mean) / scale
    bounds = np.cumsum([0, *spans]).tolist()
    turned = _turn(z, bounds, [rotation for _, _, rotation in matrices])
    clipped = np.clip(turned, -Z_CLIP, Z_CLIP)
    if every:
        return stack.score(clipped, forests)
    projected = named.copy()
    projected[rows] = clipped
    return stack.score(projected, forests)


def _turn(
    z: npt.NDArray[np.float64], bounds: Sequence[int], rotations: Sequence[npt.NDArray[np.float64]]
) -> npt.NDArray[np.float64]:
    """Rows ``bounds[k]:bounds[k + 1]`` of ``z`` times ``rotations[k]``, as one call per part.

    The parts of one row (a model per machine) go in one stacked ``matmul``, whose every
    item is the same one-row product a call of its own makes; a part of several rows keeps
    its call (BLAS rounds a product of n rows differently for different n).
    """
    widths = {r.shape for r in rotations}
    if len(widths) != 1:
        return np.concatenate([z[bounds[k] : bounds[k + 1]] @ r for k, r in enumerate(rotations)])
    turned = np.empty((z.shape[0], rotations[0].shape[1]), dtype=np.float64)
    singles = [k for k in range(len(rotations)) if bounds[k + 1] - bounds[k] == 1]
    if singles:
        at = np.asarray([bounds[k] for k in singles])
        stacked = np.array([rotations[k] for k in singles])
        turned[at] = np.matmul(z[at][:, None, :], stacked)[:, 0, :]
    if len(singles) < len(rotations):
        for k, rotation in enumerate(rotations):
            if bounds[k + 1] - bounds[k] != 1:
                turned[bounds[k] : bounds[k + 1]] = z[bounds[k] : bounds[k + 1]] @ rotation
    return turned


def _stacked_verdicts(
    parts: Sequence[Part],
    counts: Sequence[int],
    named_parts: Sequence[npt.NDArray[np.float64]],
    scores: Sequence[float],
    surprises: Sequence[float | None],
    *,
    explain_top_k: int,
    perf_clock: Clock,
) -> list[list[Verdict]]:
    """``_verdicts`` of several parts at once: thresholds, envelopes, centres per row."""
    cards = [p.model.card for p in parts]
    readings = [r for p in parts for r in p.readings]
    perfs = [t for p in parts for t in p.received_perf]
    part_of = np.repeat(np.arange(len(parts)), counts)
    outside = _outside(parts, counts, readings)
    done = perf_clock()
    thresholds = [c.threshold for c in cards]
    owners = part_of.tolist()
    alerting = [
        i
        for i, v in enumerate(scores)
        if v > thresholds[owners[i]] or outside[i] is not None or surprises[i] is not None
    ]
    explanations: dict[int, list[Contribution]] = {}
    if explain_top_k and alerting:
        starts = np.cumsum([0, *counts]).tolist()
        by_width: dict[int, list[int]] = {}  # features per row -> alerting rows
        for i in alerting:
            by_width.setdefault(named_parts[owners[i]].shape[1], []).append(i)
        for rows in by_width.values():
            matrix = np.array([named_parts[owners[i]][i - starts[owners[i]]] for i in rows])
            center = np.array([parts[owners[i]].model.center for i in rows], dtype=np.float64)
            scale = np.array([parts[owners[i]].model.scale for i in rows], dtype=np.float64)
            top = explain(matrix, center, scale, explain_top_k)
            for row, i, contributions in zip(matrix, rows, top, strict=True):
                explanations[i] = _contributions(cards[owners[i]].features, row, contributions)
    flagged = set(alerting)
    out: list[list[Verdict]] = [[] for _ in parts]
    for i, (reading, value) in enumerate(zip(readings, scores, strict=True)):
        k = owners[i]
        out[k].append(
            build_verdict(
                reading.machine_id,
                reading.line,
                reading.seq,
                reading.ts,
                "ALERT" if i in flagged else "NORMAL",
                value,
                thresholds[k],
                cards[k].version,
                round((done - perfs[i]) * 1000.0, 3),
                explanations.get(i),
                outside[i],
                surprises[i],
            )
        )
    return out


def _outside(
    parts: Sequence[Part], counts: Sequence[int], readings: Sequence[Telemetry]
) -> list[list[str] | None]:
    """Per row, the channels outside its model's training envelope (one check if they agree)."""
    cards = [p.model.card for p in parts]
    envelopes = [c.envelope for c in cards]
    channels = cards[0].channels
    same = all(e is not None for e in envelopes) and all(
        c.channels == channels and c.envelope.channels == envelopes[0].channels  # type: ignore[union-attr]
        for c in cards
    )
    if same:
        columns = {
            ch: np.fromiter((r.readings[ch] for r in readings), np.float64, len(readings))
            for ch in channels
        }
        return outside_parts(envelopes, counts, columns)  # type: ignore[arg-type]
    out: list[list[str] | None] = []
    for part, card in zip(parts, cards, strict=True):
        n = len(part.readings)
        if card.envelope is None:
            out += [None] * n
            continue
        columns = {
            ch: np.fromiter((r.readings[ch] for r in part.readings), np.float64, n)
            for ch in card.channels
        }
        out += card.envelope.outside(columns, n)
    return out


def calibrating_verdicts(
    readings: Sequence[Telemetry],
    received_perf: Sequence[float],
    progress: Sequence[Calibration],
    *,
    perf_clock: Clock = time.perf_counter,
) -> list[Verdict]:
    """CALIBRATING verdicts: no model judged these readings; ``progress`` says how far."""
    done = perf_clock()
    return [
        Verdict.model_validate(
            {
                "machine_id": reading.machine_id,
                "line": reading.line,
                "seq": reading.seq,
                "reading_ts": reading.ts,
                "status": "CALIBRATING",
                "score": 0.0,
                "threshold": 0.0,
                "model_version": CALIBRATING_VERSION,
                "latency_ms": round((done - perf) * 1000.0, 3),
                "calibration": calibration,
            }
        )
        for reading, perf, calibration in zip(readings, received_perf, progress, strict=True)
    ]
