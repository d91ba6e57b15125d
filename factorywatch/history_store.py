"""Alert history store: alert events, ALERT verdicts, operator feedback and recent readings.

SQLite is the embedded default (``run/history.sqlite``); PostgreSQL when a URL is
configured (``FACTORYWATCH_HISTORY_URL=postgresql+psycopg://...``). SQLAlchemy Core speaks
both dialects; every insert is idempotent (a redelivered message is stored once), so several
recorders, or the recorder and the web view, may write the same fact. Times are Unix seconds.
What is done with the rows read (episodes, training rows) is :mod:`factorywatch.history_episodes`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final, Literal

import sqlalchemy as sa
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.dialects import postgresql, sqlite

from factorywatch.contracts import (
    DEFAULT_MAX_FUTURE_SKEW_S,
    AlertEvent,
    FeedbackCommand,
    Telemetry,
    Verdict,
)
from factorywatch.errors import FactorywatchError
from factorywatch.history_episodes import (
    Episode,
    episodes,
    is_ai4i,
    training_rows,
    write_ai4i_csv,
    write_channels_csv,
)

DEFAULT_URL: Final = "sqlite:///run/history.sqlite"


#: how ``export_training`` wrote a machine's readings
Layout = Literal["ai4i", "channels"]


class HistoryError(FactorywatchError):
    """The history database cannot be used (unsupported URL, unreachable, refused)."""


def _why(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's message (one line), without SQLAlchemy's statement dump."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def sqlite_path(url: str) -> Path | None:
    """The file of an ``sqlite:///`` URL (None for PostgreSQL or an in-memory database)."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return None
    # a URI form (sqlite:///file:path?mode=ro&uri=true) names the same file
    return Path(url.removeprefix("sqlite:///").split("?", 1)[0].removeprefix("file:"))


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


def _machine_table(metadata: sa.MetaData, name: str, *more: sa.schema.SchemaItem) -> sa.Table:
    """A table keyed by machine: ``id``, ``machine_id`` and ``line`` first, then ``more``."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        *more,
    )


def _tables(metadata: sa.MetaData) -> dict[str, sa.Table]:
    events = _machine_table(
        metadata,
        "fw_alert_events",
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
    verdicts = _machine_table(
        metadata,
        "fw_alert_verdicts",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("reading_ts", sa.Float, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.UniqueConstraint("machine_id", "seq", name="uq_fw_alert_verdicts"),
        sa.Index("ix_fw_alert_verdicts_machine_ts", "machine_id", "reading_ts"),
    )
    readings = _machine_table(
        metadata,
        "fw_readings",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("product_type", sa.String(1), nullable=False),
        sa.Column("readings", sa.Text, nullable=False),
        sa.UniqueConstraint("machine_id", "seq", name="uq_fw_readings"),
        sa.Index("ix_fw_readings_machine_ts", "machine_id", "ts"),
    )
    feedback = _machine_table(
        metadata,
        "fw_feedback",
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
        database = sqlite_path(url)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        # pre-ping: a connection the server dropped (a PostgreSQL restart) is replaced before
        # use instead of failing the next write.
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        self.dialect = self.engine.dialect.name
        self.schema = schema
        self._metadata = sa.MetaData(schema=schema)
        self._t = _tables(self._metadata)
        try:
            try:
                self._create_tables()
            except sa.exc.SQLAlchemyError as exc:
                # Another process (compose starts the recorder and the web view together)
                # created a table between this one's check and its CREATE: look again.
                if "already exists" not in str(exc) and not isinstance(exc, sa.exc.IntegrityError):
                    raise
                self._create_tables()
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            safe = self.engine.url.render_as_string(hide_password=True)
            raise HistoryError(
                f"history database {safe} unusable: {getattr(exc, 'orig', None) or exc}"
            ) from exc

    def _create_tables(self) -> None:
        with self.engine.begin() as conn:
            if self.schema is not None:
                conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
            self._metadata.create_all(conn)

    @classmethod
    def from_settings(cls, settings: HistorySettings) -> HistoryStore:
        """Open the store the settings name."""
        return cls(settings.url, schema=settings.db_schema)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def check_writable(self) -> None:
        """Raise ``HistoryError`` unless a row can be written (read-only file or role, a
        full disk): the recorder asks at start, not at its first flush."""
        t = self._t["feedback"]
        probe = {
            "machine_id": "-",
            "line": "-",
            "alert_id": "-",
            "label": "-",
            "by": "-",
            "at": 0.0,
        }
        try:
            with self.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    conn.execute(sa.insert(t).values(probe))
                finally:
                    transaction.rollback()
        except sa.exc.SQLAlchemyError as exc:
            raise HistoryError(
                f"history database {self._safe_url} not writable: {_why(exc)}"
            ) from exc

    @property
    def _safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _unreachable(self, what: str) -> Iterator[None]:
        """An error of the database rather than of the rows (lost connection, read-only, no
        privilege) as ``HistoryError``: the caller keeps its data and tries again later.
        What is about the rows (a value out of range or too long, a constraint) passes."""
        try:
            yield
        except (sa.exc.DataError, sa.exc.IntegrityError):
            raise
        except sa.exc.DBAPIError as exc:
            raise HistoryError(f"history database {self._safe_url} {what}: {_why(exc)}") from exc

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
        with self._unreachable("unavailable"), self.engine.begin() as conn:
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
                    "product_type": r.product_type or "",  # "" = none (any-machine readings)
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
        """Delete what is older than the retention, and what is stamped further ahead of
        ``now`` than the door lets in (rows a clock in the future wrote before the bound
        existed would otherwise outlive every retention); return how many rows went."""
        cut, rcut = now - retention_days * 86400, now - readings_retention_days * 86400
        ahead = now + DEFAULT_MAX_FUTURE_SKEW_S
        t = self._t
        gone = 0
        with self._unreachable("unavailable"), self.engine.begin() as conn:
            for table, column, oldest in (
                ("events", "at", cut),
                ("verdicts", "reading_ts", cut),
                ("feedback", "at", cut),
                ("readings", "ts", rcut),
            ):
                c = t[table].c[column]
                gone += conn.execute(sa.delete(t[table]).where((c < oldest) | (c > ahead))).rowcount
        return int(gone)

    # -- reading -----------------------------------------------------------------------------
    def _select(
        self,
        table: str,
        *,
        since_column: str,
        since: float,
        machine: str | None,
        order_by: Sequence[str],
        limit: int | None = None,
        payload_only: bool = False,
    ) -> list[dict[str, Any]]:
        """The one query builder: rows of ``table`` whose ``since_column`` >= ``since``
        (one machine's or all), ordered; the stored JSON payloads alone when ``payload_only``."""
        t = self._t[table]
        query = sa.select(t.c.payload if payload_only else t).where(t.c[since_column] >= since)
        if machine is not None:
            query = query.where(t.c.machine_id == machine)
        query = query.order_by(*(t.c[name] for name in order_by))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            if payload_only:
                return [json.loads(row.payload) for row in conn.execute(query)]
            return [dict(row._mapping) for row in conn.execute(query)]

    def events(
        self, machine: str | None = None, *, since: float = 0.0, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """Alert events since ``since`` (all machines or one), oldest first."""
        return self._select(
            "events",
            since_column="at",
            since=since,
            machine=machine,
            order_by=("at", "id"),
            limit=limit,
            payload_only=True,
        )

    def alert_verdicts(
        self, machine: str | None = None, *, since: float = 0.0, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """ALERT verdicts since ``since``, oldest first."""
        return self._select(
            "verdicts",
            since_column="reading_ts",
            since=since,
            machine=machine,
            order_by=("reading_ts", "id"),
            limit=limit,
            payload_only=True,
        )

    def feedback(self, machine: str | None = None, *, since: float = 0.0) -> list[dict[str, Any]]:
        """Operator labels given since ``since``."""
        return self._select(
            "feedback", since_column="at", since=since, machine=machine, order_by=("at",)
        )

    def readings(
        self, machine: str, *, since: float = 0.0, limit: int = 1_000_000
    ) -> list[dict[str, Any]]:
        """One machine's recorded readings since ``since``, in ``seq`` order."""
        rows = self._select(
            "readings",
            since_column="ts",
            since=since,
            machine=machine,
            order_by=("seq",),
            limit=limit,
        )
        return [{**row, "readings": json.loads(row["readings"])} for row in rows]

    def alerts(self, machine: str | None = None, *, since: float = 0.0) -> list[Episode]:
        """Alert episodes (raise .. clear) with acknowledgement and label, newest first."""
        return episodes(self.events(machine, since=since), self.feedback(machine, since=since))

    def reading_machines(self) -> list[str]:
        """The machines with recorded readings, sorted."""
        t = self._t["readings"]
        with self.engine.connect() as conn:
            query = sa.select(t.c.machine_id).distinct().order_by(t.c.machine_id)
            return [str(m) for m in conn.execute(query).scalars()]

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
    ) -> tuple[int, Layout]:
        """Write the machine's trainable readings as a CSV; return the row count and layout.

        An AI4I machine's (every reading with the AI4I channels and product type) in the AI4I
        layout ``train --dataset`` reads, any other machine's as its channels over time
        (``write_channels_csv``, for ``train --csv``). ``window``: the detector's n (readings
        its k-of-n raise looks back over).
        """
        alert_seqs = {int(v["seq"]) for v in self.alert_verdicts(machine, limit=10_000_000)}
        rows = training_rows(
            self.readings(machine, since=since),
            self.alerts(machine),
            alert_seqs,
            window=window,
            false_alarms_as_normal=false_alarms_as_normal,
        )
        if is_ai4i(rows):
            return write_ai4i_csv(rows, out), "ai4i"
        return write_channels_csv(rows, out), "channels"
