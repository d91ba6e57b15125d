"""The operator-facing subcommands: ``history``, ``notify``, ``web`` and ``threshold`` (wired
into the CLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from factorywatch.cli_common import broker_options, broker_settings, stop_on_signals
from factorywatch.settings import BrokerSettings, DataSettings

#: The first bytes of every SQLite database file (export never writes over one).
SQLITE_MAGIC = b"SQLite format 3\x00"


def _broker(args: argparse.Namespace, default_user: str) -> BrokerSettings:

    broker = broker_settings(args)
    if broker.secrets_dir is not None and broker.username is None:
        broker = broker.with_overrides(username=default_user)
    return broker


def _history_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("history database (env FACTORYWATCH_HISTORY_*)")
    group.add_argument("--db", help="SQLAlchemy URL (default sqlite:///run/history.sqlite)")
    group.add_argument("--db-schema", help="PostgreSQL schema of the tables")


def _history_settings(args: argparse.Namespace) -> Any:
    from factorywatch.history_store import HistorySettings  # noqa: PLC0415

    settings = HistorySettings()
    given = {"url": args.db, "db_schema": args.db_schema}
    return settings.model_validate(
        {**settings.model_dump(), **{k: v for k, v in given.items() if v is not None}}
    )


def _open_store(args: argparse.Namespace) -> Any:
    from factorywatch.history_store import HistoryStore  # noqa: PLC0415

    return HistoryStore.from_settings(_history_settings(args))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- history --------------------------------------------------------------------------------
def add_history(sub: Any) -> None:
    """``factorywatch history [record|export|prune]``."""

    p = sub.add_parser("history", help="alert history: show, record, export, prune")
    _history_options(p)
    p.add_argument("--machine", help="only this machine")
    p.add_argument("--since", default="24h", help="how far back (30m, 24h, 7d; default 24h)")
    p.add_argument("--json", action="store_true", help="one JSON object per alert")
    p.set_defaults(func=cmd_history)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    rec = actions.add_parser("record", help="store alert events, ALERT verdicts, feedback")
    broker_options(rec)
    _history_options(rec)
    rec.add_argument("--client-id", default="factorywatch-recorder", help="durable session id")
    rec.add_argument("--no-readings", action="store_true", help="do not store readings")
    rec.set_defaults(func=cmd_history_record)
    exp = actions.add_parser("export", help="a machine's trainable readings as an AI4I CSV")
    _history_options(exp)
    exp.add_argument("--machine", required=True, help="the machine")
    exp.add_argument("--since", default="7d", help="how far back (default 7d)")
    exp.add_argument(
        "--false-alarms-as-normal",
        action="store_true",
        help="keep the readings of alerts operators marked false alarms (as normal data)",
    )
    exp.add_argument("--csv", type=Path, required=True, help="output file")
    exp.add_argument(
        "--force", action="store_true", help="overwrite an existing CSV (never a database)"
    )
    exp.set_defaults(func=cmd_history_export)
    prune = actions.add_parser("prune", help="apply the retention now")
    _history_options(prune)
    prune.set_defaults(func=cmd_history_prune)


def cmd_history(args: argparse.Namespace) -> int:
    """``factorywatch history --machine M --since 24h``: the alerts, newest first."""
    from factorywatch.history_episodes import parse_since  # noqa: PLC0415

    since = parse_since(args.since, time.time())
    store = _open_store(args)
    try:
        alerts = store.alerts(args.machine, since=since)
    finally:
        store.close()
    if args.json:
        for ep in alerts:
            print(json.dumps(ep.as_dict()))
        return 0
    what = args.machine or "all machines"
    print(f"{len(alerts)} alert(s) on {what} since {_when(since)} UTC")
    if alerts:
        print(
            f"{'raised (UTC)':<20} {'cleared':<20} {'machine':<12} {'peak':>6}  "
            f"{'acknowledged':<14} {'label':<12} alert"
        )
    for ep in alerts:
        peak = f"{ep.peak_score:.3f}" if ep.peak_score is not None else "-"
        cleared = "open" if ep.open else _when(ep.cleared_at)
        print(
            f"{_when(ep.raised_at):<20} {cleared:<20} {ep.machine_id:<12} {peak:>6}  "
            f"{ep.acknowledged_by or '-':<14} {ep.label or '-':<12} {ep.alert_id}"
        )
    return 0


def cmd_history_record(args: argparse.Namespace) -> int:
    """``factorywatch history record``: run the recorder until SIGTERM/SIGINT."""
    from factorywatch.detector.registry import Registry  # noqa: PLC0415
    from factorywatch.history_recorder import Recorder  # noqa: PLC0415
    from factorywatch.history_store import HistoryStore  # noqa: PLC0415

    history = _history_settings(args)
    if args.no_readings:
        history = history.model_copy(update={"record_readings": False})
    broker = _broker(args, "history")
    # The detector's registry: readings it would refuse for their sender are not stored.
    registry = Registry.locate(None, broker.secrets_dir)
    store = HistoryStore.from_settings(history)
    try:
        # Its own account (monitor rights): a login is a client id, one connection each.
        recorder = Recorder(broker, store, history, client_id=args.client_id, registry=registry)
        recorder.run(stop_on_signals())
    finally:
        store.close()
    return 0


def cmd_history_export(args: argparse.Namespace) -> int:
    """``factorywatch history export``: readings to refit a machine's model on.

    The CSV is written beside its target and moved into place only when it holds readings:
    an existing file is replaced only with ``--force``, and never when it is a database.
    """
    from factorywatch.history_episodes import parse_since  # noqa: PLC0415
    from factorywatch.history_store import HistoryError  # noqa: PLC0415
    from factorywatch.settings import DetectorSettings  # noqa: PLC0415

    since = parse_since(args.since, time.time())
    settings = _history_settings(args)
    _check_export_target(args.csv, force=args.force, db_url=settings.url)
    store = _open_store(args)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    partial = args.csv.with_name(f".{args.csv.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", newline="") as out:
            rows, layout = store.export_training(
                args.machine,
                out,
                since=since,
                false_alarms_as_normal=args.false_alarms_as_normal,
                window=DetectorSettings().alert_n,
            )
        if not rows:
            known = store.reading_machines()
            raise HistoryError(
                f"no trainable readings of {args.machine!r} since {_when(since)} UTC: "
                f"{args.csv} left as it was (machines with readings: "
                f"{', '.join(known[:20]) or 'none'}{' ...' if len(known) > 20 else ''})"
            )
        partial.replace(args.csv)
    finally:
        partial.unlink(missing_ok=True)
        store.close()
    print(f"{rows} readings of {args.machine} written to {args.csv}", file=sys.stderr)
    if layout == "ai4i":
        refit = f"factorywatch train --dataset {args.csv} --no-verify"
    else:  # any other machine: its channels over time, refit as its own model
        refit = (
            f"factorywatch train --csv {args.csv} --time-column ts --missing ffill "
            f"--machine {args.machine}"
        )
    print(f"refit with: {refit}", file=sys.stderr)
    return 0


def _check_export_target(path: Path, *, force: bool, db_url: str) -> None:
    """Refuse to write a CSV over a database (ever) or an existing file (without force)."""
    from factorywatch.history_store import HistoryError, sqlite_path  # noqa: PLC0415

    if path.is_dir():
        raise HistoryError(f"{path} is a directory: give the CSV file to write")
    database = sqlite_path(db_url)
    if database is not None and path.resolve() == database.resolve():
        raise HistoryError(f"{path} is the history database: refusing to write a CSV over it")
    if not path.exists():
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise HistoryError(f"{path} cannot be read: {exc}") from None
    if head == SQLITE_MAGIC:
        raise HistoryError(f"{path} is an SQLite database: refusing to write a CSV over it")
    if not force:
        raise HistoryError(f"{path} exists: pass --force to overwrite it")


def cmd_history_prune(args: argparse.Namespace) -> int:
    """``factorywatch history prune``."""
    history = _history_settings(args)
    store = _open_store(args)
    try:
        gone = store.prune(
            time.time(),
            retention_days=history.retention_days,
            readings_retention_days=history.readings_retention_days,
        )
    finally:
        store.close()
    print(f"{gone} rows older than the retention deleted")
    return 0


# -- notify ---------------------------------------------------------------------------------
def add_notify(sub: Any) -> None:
    """``factorywatch notify``."""

    p = sub.add_parser("notify", help="push raised/cleared alerts to Prometheus Alertmanager")
    broker_options(p)
    p.add_argument("--alertmanager-url", help="default http://127.0.0.1:9093")
    p.add_argument("--resend", type=float, help="re-send open alerts every N s (default 60)")
    p.add_argument("--web-url", help="link notifications to this factorywatch web address")
    p.add_argument("--label", action="append", default=[], help="extra label k=v (repeatable)")
    p.add_argument(
        "--critical-z",
        type=float,
        help="an anomaly is critical when a driving feature's |z| reaches this (default 4), "
        "else a warning",
    )
    p.set_defaults(func=cmd_notify)


def cmd_notify(args: argparse.Namespace) -> int:
    """``factorywatch notify``: run until SIGTERM/SIGINT."""
    from factorywatch.notify import Notifier, NotifySettings  # noqa: PLC0415

    base = NotifySettings()
    given = {
        "alertmanager_url": args.alertmanager_url,
        "resend_s": args.resend,
        "web_url": args.web_url,
        "labels": ",".join(args.label) or None,
        "critical_z": args.critical_z,
    }
    settings = NotifySettings.model_validate(
        {**base.model_dump(), **{k: v for k, v in given.items() if v is not None}}
    )
    Notifier(_broker(args, "notify"), settings).run(stop_on_signals())  # viewer rights
    return 0


# -- web ------------------------------------------------------------------------------------
def add_web(sub: Any) -> None:
    """``factorywatch web``."""

    p = sub.add_parser("web", help="web view: live tiles, alerts, machine pages, history")
    broker_options(p)
    _history_options(p)
    p.add_argument("--bind", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--passwd-file", type=Path, help="broker password file (<secrets-dir>/passwd)")
    p.add_argument("--no-history", action="store_true", help="no history store (live only)")
    p.add_argument(
        "--admins",
        help="operators who may also add and remove broker accounts in the view (comma-separated)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="model versions shown, promoted and rolled back per machine "
        "(default FACTORYWATCH_MODEL_DIR, else model/artifacts)",
    )
    p.add_argument(
        "--broker-pid-file",
        type=Path,
        help="reload.pid of `broker serve` / `demo` (run/broker/reload.pid): SIGHUP it after "
        "an account change",
    )
    p.add_argument(
        "--alertmanager-url",
        help="the Alertmanager notify posts to (the view warns when its receivers are empty)",
    )
    p.set_defaults(func=cmd_web)


def cmd_web(args: argparse.Namespace) -> int:
    """``factorywatch web``: serve until SIGTERM/SIGINT."""
    from factorywatch.history_store import HistoryStore  # noqa: PLC0415
    from factorywatch.web.app import WebSettings, build_context, serve  # noqa: PLC0415

    base = WebSettings()
    given = {
        "host": args.bind,
        "port": args.http_port,
        "passwd_file": args.passwd_file,
        "alertmanager_url": args.alertmanager_url,
        "admins": args.admins,
        "model_dir": args.model_dir or base.model_dir or DataSettings().model_dir,
        "broker_reload_pid_file": args.broker_pid_file,
    }
    settings = WebSettings.model_validate(
        {
            **base.model_dump(),
            **{k: v for k, v in given.items() if v is not None},
        }
    )

    store = None if args.no_history else HistoryStore.from_settings(_history_settings(args))
    try:
        ctx = build_context(settings, broker_settings(args), store)
    except BaseException:
        if store is not None:
            store.close()
        raise
    # uvicorn handles SIGTERM/SIGINT itself, then re-raises the signal to the handler it
    # found: ours, so a clean shutdown exits 0 rather than dying of the signal.
    stop_on_signals()
    serve(ctx)
    return 0


# -- threshold ------------------------------------------------------------------------------
def add_threshold(sub: Any) -> None:
    """``factorywatch threshold MACHINE --line L --widen|--reset|--recalibrate --by NAME``."""
    p = sub.add_parser(
        "threshold",
        help="widen or reset one machine's own threshold, or recalibrate it on its next readings "
        "(the detector records who and when)",
    )
    p.add_argument("machine", help="machine id")
    p.add_argument("--line", required=True, help="the machine's line")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--widen", action="store_true", help="raise it one step (a machine alarming too often)"
    )
    what.add_argument("--reset", action="store_true", help="back to its model's threshold")
    what.add_argument(
        "--recalibrate",
        action="store_true",
        help="its normal operation has changed: clear its alert and fit it a new model on its "
        "next readings (as many as its model was trained on; CALIBRATING meanwhile)",
    )
    p.add_argument("--by", required=True, help="who makes the change (recorded)")
    p.add_argument("--note", help="why (recorded)")
    broker_options(p)
    p.set_defaults(func=cmd_threshold)


def cmd_threshold(args: argparse.Namespace) -> int:
    """Publish one ``ThresholdCommand`` (QoS 1) and wait for the broker to take it."""
    from factorywatch.contracts import ThresholdCommand  # noqa: PLC0415
    from factorywatch.errors import BrokerError  # noqa: PLC0415
    from factorywatch.mqtt import connected_client, reason_failed  # noqa: PLC0415
    from factorywatch.topics import Topics  # noqa: PLC0415

    broker = _broker(args, "operator")
    topics = Topics(broker.topic_root)
    command = ThresholdCommand(
        machine_id=args.machine,
        action="widen" if args.widen else "recalibrate" if args.recalibrate else "reset",
        by=args.by,
        at=time.time(),
        note=args.note,
    )
    topic = topics.threshold(args.line, args.machine)
    client = connected_client(broker, f"threshold-{os.getpid()}")
    refused: list[Any] = []
    client.on_publish = lambda _c, _u, _mid, reason, _p: (
        refused.append(reason) if reason_failed(reason) else None
    )
    try:
        info = client.publish(topic, command.encode(), qos=1)
        info.wait_for_publish(timeout=10.0)
        if not info.is_published() or refused:
            why = f" ({refused[0]})" if refused else ""
            raise BrokerError(f"the broker did not take the command on {topic}{why}")
    finally:
        client.disconnect()
        client.loop_stop()
    print(f"{command.action} sent for {args.machine} on {topic}; its state topic shows the change")
    return 0
