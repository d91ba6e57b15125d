"""What every command-line module shares: the broker options, their settings, the stop signal.

``cli.py``, ``opscli.py`` and ``clusterdeploy.py`` each import this (and no longer one
another): it imports none of them.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

import structlog

from factorywatch.settings import BrokerSettings

log = structlog.get_logger("factorywatch")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C): the roles shut down cleanly on it."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def broker_options(parser: argparse.ArgumentParser) -> None:
    """The broker option group (``--host``, ``--port``, ``--topic-root``, logins, TLS)."""
    group = parser.add_argument_group("broker (env FACTORYWATCH_MQTT_*)")
    group.add_argument("--host", help="broker host (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="broker port (default 1883)")
    group.add_argument("--topic-root", help="topic prefix (default 'factory')")
    group.add_argument("--username", help="MQTT username")
    group.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    group.add_argument(
        "--secrets-dir", type=Path, help="directory of <user>.password files (broker init)"
    )
    group.add_argument("--tls-ca", type=Path, help="CA file; turns TLS on")
    group.add_argument(
        "--mqtt-protocol",
        choices=("5", "3.1.1"),
        help="MQTT version (default 5; 3.1.1 for a NATS cluster's MQTT listener, which "
        "refuses MQTT 5) [FACTORYWATCH_MQTT_PROTOCOL]",
    )


def broker_settings(args: argparse.Namespace) -> BrokerSettings:
    """The broker settings: the environment's, overridden by the broker options given."""
    return BrokerSettings().with_overrides(
        host=args.host,
        port=args.port,
        topic_root=args.topic_root,
        username=args.username,
        password_file=args.password_file,
        secrets_dir=args.secrets_dir,
        tls_ca=args.tls_ca,
        protocol=args.mqtt_protocol,
    )
