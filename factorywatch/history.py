"""Alert history: alert events, ALERT verdicts, operator feedback and recent readings.

SQLite is the embedded default (``run/history.sqlite``); PostgreSQL when a URL is
configured (``FACTORYWATCH_HISTORY_URL=postgresql+psycopg://...``). SQLAlchemy Core speaks
both dialects; every insert is idempotent (a redelivered message is stored once), so several
recorders, or the recorder and the web view, may write the same fact. Times are Unix seconds.

The pure part — :func:`parse_since`, :func:`episodes`, :func:`training_rows` — has no I/O.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import sqlalchemy as sa
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.dialects import postgresql, sqlite

from factorywatch.contracts import AlertEvent, FeedbackCommand, Telemetry, Verdict
from factorywatch.errors import FactorywatchError

DEFAULT_URL: Final = "sqlite:///run/history.sqlite"
_SINCE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
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
_AI4I_CHANNELS: Final = (
    "air_temperature_k",
    "process_temperature_k",
    "rotational_speed_rpm",
    "torque_nm",
    "tool_wear_min",
)


class HistoryError(FactorywatchError):
    """The history database cannot be used (unsupported URL, unreachable, refused)."""


class HistorySettings(BaseSettings):
    """Where and how long the alert history is kept (``FACTORYWATCH_HISTORY_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYWATCH_HISTORY_", env_file=".env", extra="ignore"
    )

    url: str = Field(
        default=DEFAULT_URL,
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    db_schema: str | None = Field(
        default=None, description="PostgreSQL schema of the tables (created if missing)"
    )
    retention_days: float = Field(default=90.0, gt=0, description="events, verdicts, feedback")
    readings_retention_days: float = Field(
        default=7.0, gt=0, description="recorded readings (the refit material)"
    )
    record_readings: bool = Field(
        default=True, description="also store every reading (needed for the training export)"
    )


def parse_since(text: str, now: float) -> float:
    """``"24h"`` / ``"30m"`` / ``"7d"`` / ``"90s"`` / ``"2w"`` -> the Unix time that long ago."""
    match = _SINCE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use a number and s, m, h, d or w (24h)")
    return now - float(match.group(1)) * _UNIT_S[match.group(2)]


# -- the pure part ---------------------------------------------------------------------------
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
        """True while the alert has not cleared."""
        return self.cleared_at is None

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
    """Write readings in the AI4I layout (``Machine failure`` 0); return the row count."""
    writer = csv.writer(out)
    writer.writerow(AI4I_HEADER)
    count = 0
    for count, r in enumerate(rows, start=1):
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


# -- the store (I/O) -------------------------------------------------------------------------
def _tables(metadata: sa.MetaData) -> dict[str, sa.Table]:
    events = sa.Table(
        "fw_alert_events",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("alert_id", sa.String(128)),
        sa.Column("seq", sa.BigInteger),
        sa.Column("peak_score", sa.Float),
        sa.Column("acknowledged_by", sa.String(64)),
        sa.Column("payload", sa.Text, nullable=False),
        # what makes an event itself: one batch can raise and clear at the same detector time
        sa.Column("event_key", sa.String(255), nullable=False),
        sa.UniqueConstraint("machine_id", "event_key", name="uq_fw_alert_events"),
        sa.Index("ix_fw_alert_events_machine_at", "machine_id", "at"),
    )
    verdicts = sa.Table(
        "fw_alert_verdicts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("reading_ts", sa.Float, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.UniqueConstraint("machine_id", "seq", name="uq_fw_alert_verdicts"),
        sa.Index("ix_fw_alert_verdicts_machine_ts", "machine_id", "reading_ts"),
    )
    readings = sa.Table(
        "fw_readings",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("product_type", sa.String(1), nullable=False),
        sa.Column("readings", sa.Text, nullable=False),
        sa.UniqueConstraint("machine_id", "seq", name="uq_fw_readings"),
        sa.Index("ix_fw_readings_machine_ts", "machine_id", "ts"),
    )
    feedback = sa.Table(
        "fw_feedback",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("alert_id", sa.String(128), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("by", sa.String(64), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("at", sa.Float, nullable=False),
        sa.UniqueConstraint("machine_id", "alert_id", name="uq_fw_feedback"),
    )
    return {"events": events, "verdicts": verdicts, "readings": readings, "feedback": feedback}


class HistoryStore:
    """The alert history database (SQLite or PostgreSQL) behind a few typed methods."""

    def __init__(self, url: str = DEFAULT_URL, *, schema: str | None = None) -> None:
        if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise HistoryError(
                f"unsupported history database URL {url.split(':', 1)[0]!r}: use "
                "sqlite:///path or postgresql+psycopg://user@host/db"
            )
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url)
        self.dialect = self.engine.dialect.name
        self.schema = schema
        self._metadata = sa.MetaData(schema=schema)
        self._t = _tables(self._metadata)
        try:
            with self.engine.begin() as conn:
                if schema is not None:
                    conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
                self._metadata.create_all(conn)
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            safe = self.engine.url.render_as_string(hide_password=True)
            raise HistoryError(
                f"history database {safe} unusable: {getattr(exc, 'orig', None) or exc}"
            ) from exc

    @classmethod
    def from_settings(cls, settings: HistorySettings) -> HistoryStore:
        """Open the store the settings name."""
        return cls(settings.url, schema=settings.db_schema)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    # -- writing (idempotent) ----------------------------------------------------------------
    def _insert(
        self, table: str, rows: list[dict[str, Any]], *, upsert: Sequence[str] = ()
    ) -> None:
        if not rows:
            return
        t = self._t[table]
        stmt: Any = (sqlite.insert(t) if self.dialect == "sqlite" else postgresql.insert(t)).values(
            rows
        )
        unique = next(c for c in t.constraints if isinstance(c, sa.UniqueConstraint))
        if upsert:
            stmt = stmt.on_conflict_do_update(
                index_elements=[c.name for c in unique.columns],
                set_={col: getattr(stmt.excluded, col) for col in upsert},
            )
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=[c.name for c in unique.columns])
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def add_events(self, events: Sequence[AlertEvent]) -> None:
        """Store alert events (a redelivered one is stored once)."""
        self._insert(
            "events",
            [
                {
                    "machine_id": e.machine_id,
                    "line": e.line,
                    "event": e.event,
                    "at": e.at,
                    "alert_id": e.alert_id,
                    "seq": e.seq,
                    "peak_score": e.peak_score,
                    "acknowledged_by": e.acknowledged_by,
                    "payload": e.model_dump_json(exclude_none=True),
                    "event_key": f"{e.event}|{e.at!r}|{e.alert_id}|{e.seq}",
                }
                for e in events
            ],
        )

    def add_verdicts(self, verdicts: Sequence[Verdict]) -> None:
        """Store ALERT verdicts (NORMAL ones are ignored: the readings table covers them)."""
        self._insert(
            "verdicts",
            [
                {
                    "machine_id": v.machine_id,
                    "line": v.line,
                    "seq": v.seq,
                    "reading_ts": v.reading_ts,
                    "score": v.score,
                    "threshold": v.threshold,
                    "model_version": v.model_version,
                    "payload": v.model_dump_json(exclude_none=True),
                }
                for v in verdicts
                if v.status == "ALERT"
            ],
        )

    def add_readings(self, readings: Sequence[Telemetry]) -> None:
        """Store readings (the material a machine's model can be refitted on)."""
        self._insert(
            "readings",
            [
                {
                    "machine_id": r.machine_id,
                    "line": r.line,
                    "seq": r.seq,
                    "ts": r.ts,
                    "product_type": r.product_type,
                    "readings": json.dumps(r.readings, allow_nan=False),
                }
                for r in readings
            ],
        )

    def add_feedback(self, line: str, commands: Sequence[FeedbackCommand]) -> None:
        """Store operator labels; a later label of the same alert replaces the earlier one."""
        self._insert(
            "feedback",
            [
                {
                    "machine_id": c.machine_id,
                    "line": line,
                    "alert_id": c.alert_id,
                    "label": c.label,
                    "by": c.by,
                    "note": c.note,
                    "at": c.at,
                }
                for c in commands
            ],
            upsert=("label", "by", "note", "at"),
        )

    def prune(self, now: float, *, retention_days: float, readings_retention_days: float) -> int:
        """Delete what is older than the retention; return how many rows went."""
        cut, rcut = now - retention_days * 86400, now - readings_retention_days * 86400
        t = self._t
        with self.engine.begin() as conn:
            gone = conn.execute(sa.delete(t["events"]).where(t["events"].c.at < cut)).rowcount
            gone += conn.execute(
                sa.delete(t["verdicts"]).where(t["verdicts"].c.reading_ts < cut)
            ).rowcount
            gone += conn.execute(sa.delete(t["feedback"]).where(t["feedback"].c.at < cut)).rowcount
            gone += conn.execute(sa.delete(t["readings"]).where(t["readings"].c.ts < rcut)).rowcount
        return int(gone)

    # -- reading -----------------------------------------------------------------------------
    def events(
        self, machine: str | None = None, *, since: float = 0.0, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """Alert events since ``since`` (all machines or one), oldest first."""
        t = self._t["events"]
        query = sa.select(t.c.payload).where(t.c.at >= since)
        if machine is not None:
            query = query.where(t.c.machine_id == machine)
        query = query.order_by(t.c.at, t.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [json.loads(row.payload) for row in conn.execute(query)]

    def alert_verdicts(
        self, machine: str | None = None, *, since: float = 0.0, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """ALERT verdicts since ``since``, oldest first."""
        t = self._t["verdicts"]
        query = sa.select(t.c.payload).where(t.c.reading_ts >= since)
        if machine is not None:
            query = query.where(t.c.machine_id == machine)
        query = query.order_by(t.c.reading_ts, t.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [json.loads(row.payload) for row in conn.execute(query)]

    def feedback(self, machine: str | None = None, *, since: float = 0.0) -> list[dict[str, Any]]:
        """Operator labels given since ``since``."""
        t = self._t["feedback"]
        query = sa.select(t).where(t.c.at >= since)
        if machine is not None:
            query = query.where(t.c.machine_id == machine)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query.order_by(t.c.at))]

    def readings(
        self, machine: str, *, since: float = 0.0, limit: int = 1_000_000
    ) -> list[dict[str, Any]]:
        """One machine's recorded readings since ``since``, in ``seq`` order."""
        t = self._t["readings"]
        query = (
            sa.select(t)
            .where(t.c.machine_id == machine, t.c.ts >= since)
            .order_by(t.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                {**row._mapping, "readings": json.loads(row.readings)}
                for row in conn.execute(query)
            ]

    def alerts(self, machine: str | None = None, *, since: float = 0.0) -> list[Episode]:
        """Alert episodes (raise .. clear) with acknowledgement and label, newest first."""
        return episodes(self.events(machine, since=since), self.feedback(machine, since=since))

    def counts(self) -> dict[str, int]:
        """Rows per table (for logs and tests)."""
        with self.engine.connect() as conn:
            return {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                for name, t in self._t.items()
            }

    def export_training(
        self,
        machine: str,
        out: IO[str],
        *,
        since: float,
        false_alarms_as_normal: bool,
        window: int,
    ) -> int:
        """Write the machine's trainable readings as an AI4I CSV; return the row count.

        ``window``: the detector's n (readings its k-of-n raise looks back over).
        """
        alert_seqs = {int(v["seq"]) for v in self.alert_verdicts(machine, limit=10_000_000)}
        rows = training_rows(
            self.readings(machine, since=since),
            self.alerts(machine),
            alert_seqs,
            window=window,
            false_alarms_as_normal=false_alarms_as_normal,
        )
        return write_ai4i_csv(rows, out)
