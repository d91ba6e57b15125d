"""Alert history's pure part: durations, alert episodes and the rows a refit may train on.

The store that keeps the history (SQLite or PostgreSQL) is :mod:`factorywatch.history_store`;
this module has no I/O: :func:`parse_since`, :func:`episodes`, :func:`training_rows` and
:func:`write_ai4i_csv` (to a stream the caller opened) take values and return values.
"""

from __future__ import annotations

import bisect
import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Final

_SINCE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The longest ``--since`` accepted: further back than any retention (and any datetime).
MAX_SINCE_S: Final = 100 * 365 * 86400
# The AI4I layout `factorywatch train --dataset FILE --no-verify` reads.
AI4I_HEADER: Final = (
    "UDI",
    "Product ID",
    "Type",
    "Air temperature [K]",
    "Process temperature [K]",
    "Rotational speed [rpm]",
    "Torque [Nm]",
    "Tool wear [min]",
    "Machine failure",
    "TWF",
    "HDF",
    "PWF",
    "OSF",
    "RNF",
)
_PRODUCT_TYPES: Final = frozenset({"L", "M", "H"})
_AI4I_CHANNELS: Final = (
    "air_temperature_k",
    "process_temperature_k",
    "rotational_speed_rpm",
    "torque_nm",
    "tool_wear_min",
)


def parse_since(text: str, now: float) -> float:
    """``"24h"`` / ``"30m"`` / ``"7d"`` / ``"90s"`` / ``"2w"`` -> the Unix time that long ago."""
    match = _SINCE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use a number and s, m, h, d or w (24h)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > MAX_SINCE_S:
        raise ValueError(f"duration {text!r} is too long: at most 100 years ({MAX_SINCE_S}s)")
    return max(now - seconds, 0.0)


@dataclass
class Episode:
    """One alert from raise to clear, with who acknowledged it and how it was labelled."""

    alert_id: str
    machine_id: str
    line: str
    raised_at: float | None = None
    cleared_at: float | None = None
    raised_seq: int | None = None
    cleared_seq: int | None = None
    peak_score: float | None = None
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    label: str | None = None
    labelled_by: str | None = None
    note: str | None = None
    explanation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def open(self) -> bool:
        """True while a raised alert has not cleared (a label for an alert whose raise was
        never recorded, e.g. an unknown alert id, is not an open alert)."""
        return self.raised_at is not None and self.cleared_at is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "open": self.open}


def episodes(events: Iterable[dict[str, Any]], feedback: Iterable[dict[str, Any]]) -> list[Episode]:
    """Group alert events (and feedback) by ``alert_id``; newest raise first."""
    by_id: dict[str, Episode] = {}
    for ev in sorted(events, key=lambda e: float(e["at"])):
        alert_id = ev.get("alert_id")
        if not alert_id:
            continue
        ep = by_id.setdefault(alert_id, Episode(alert_id, ev["machine_id"], ev["line"]))
        kind = ev["event"]
        if kind == "ALERT_RAISED":
            ep.raised_at = float(ev["at"])
            ep.raised_seq = ev.get("seq")
            ep.explanation = list(ev.get("explanation") or [])
        elif kind == "ALERT_CLEARED":
            ep.cleared_at = float(ev["at"])
            ep.cleared_seq = ev.get("seq")
        elif kind == "ALERT_ACKNOWLEDGED":
            ep.acknowledged_by = ev.get("acknowledged_by")
            ep.acknowledged_at = float(ev["at"])
        if ev.get("peak_score") is not None:
            ep.peak_score = max(ep.peak_score or 0.0, float(ev["peak_score"]))
    for fb in feedback:
        # labelled before (or without) its events being recorded: an episode of its own
        ep = by_id.setdefault(fb["alert_id"], Episode(fb["alert_id"], fb["machine_id"], fb["line"]))
        ep.label, ep.labelled_by, ep.note = fb["label"], fb["by"], fb.get("note")
    # one batch of readings may raise and clear with the same detector time: seq breaks ties
    return sorted(
        by_id.values(), key=lambda e: (e.raised_at or 0.0, e.raised_seq or 0), reverse=True
    )


def training_rows(
    readings: Sequence[dict[str, Any]],
    alerts: Sequence[Episode],
    alert_seqs: set[int],
    *,
    window: int,
    false_alarms_as_normal: bool,
) -> list[dict[str, Any]]:
    """The readings of one machine that may be trained on as normal data (pure).

    ``readings`` in ``seq`` order. An alert spans its readings from the raise to the clear
    (by ``seq``; to the end when still open); a reading scored ALERT among the ``window``
    readings before a raise (the detector's k-of-n window) belongs to that alert too. Such
    readings are left out — unless the alert was labelled ``false_alarm`` and
    ``false_alarms_as_normal`` is set: operators said it was normal operation. Any other
    reading scored ALERT is left out; everything else is kept.
    """
    spans = sorted(
        (ep.raised_seq, ep.cleared_seq, ep.label) for ep in alerts if ep.raised_seq is not None
    )
    seqs = [int(r["seq"]) for r in readings]

    def owner(index: int) -> tuple[bool, str | None]:
        """(belongs to an alert or is anomalous, the label of its alert)."""
        seq = seqs[index]
        for lo, hi, label in spans:
            if lo <= seq and (hi is None or seq <= hi):
                return True, label
        if seq in alert_seqs:
            following = [(lo, label) for lo, _hi, label in spans if lo > seq]
            if following and bisect.bisect_left(seqs, following[0][0]) - index < window:
                return True, following[0][1]
            return True, None
        return False, None

    kept = []
    for index, r in enumerate(readings):
        inside, label = owner(index)
        if inside and not (false_alarms_as_normal and label == "false_alarm"):
            continue
        kept.append(r)
    return kept


def write_ai4i_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """Write readings in the AI4I layout (``Machine failure`` 0); return the row count.

    A reading without every AI4I channel or product type (another kind of machine, or one
    the detector refused as ``missing_channel``) has no AI4I row and is left out.
    """
    writer = csv.writer(out)
    writer.writerow(AI4I_HEADER)
    count = 0
    usable = (
        r
        for r in rows
        if r["product_type"] in _PRODUCT_TYPES and all(c in r["readings"] for c in _AI4I_CHANNELS)
    )
    for count, r in enumerate(usable, start=1):
        ch = r["readings"]
        writer.writerow(
            [
                count,
                f"{r['product_type']}{r['seq']}",
                r["product_type"],
                *(ch[c] for c in _AI4I_CHANNELS),
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        )
    return count


def is_ai4i(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether these are an AI4I machine's readings: most of them have the AI4I channels and
    product type (the AI4I layout; ``write_ai4i_csv`` leaves the others out)."""
    shaped = sum(
        r["product_type"] in _PRODUCT_TYPES and all(c in r["readings"] for c in _AI4I_CHANNELS)
        for r in rows
    )
    return bool(rows) and 2 * shaped >= len(rows)


def write_channels_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """Write readings of any machine as ``ts`` (ISO 8601, UTC), ``seq`` and one column per
    channel (every channel any reading has, in first-seen order; blank where a reading lacks
    one): the layout ``train --csv FILE --time-column ts`` reads. Returns the row count."""
    kept = list(rows)
    channels = list(dict.fromkeys(c for r in kept for c in r["readings"]))
    writer = csv.writer(out)
    writer.writerow(["ts", "seq", *channels])
    for r in kept:
        ch = r["readings"]
        stamp = datetime.fromtimestamp(float(r["ts"]), UTC).isoformat(timespec="milliseconds")
        writer.writerow([stamp, r["seq"], *(ch.get(c, "") for c in channels)])
    return len(kept)
