"""A bare paho relay: the ceiling a detector on this broker and machine can hope to reach.

``python -m bench.relay --port P --root R`` subscribes ``<R>/telemetry/+/+`` at QoS 1 and
republishes every payload unchanged to ``<R>/alerts/<line>/<machine>/verdict`` at QoS 1: no
decoding, no validation, no scoring. ``--lines L1,L2`` subscribes those lines only (a shard,
like ``factorywatch detect --lines``). It prints ``relay_subscribed`` once the broker granted
the subscription and its counters when SIGTERM (or SIGINT) stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import uuid
from collections.abc import Sequence
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from factorywatch import mqtt as fwmqtt
from factorywatch import runtime
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

READY: str = "relay_subscribed"


class Relay:
    """Republishes each telemetry payload to its machine's verdict topic."""

    def __init__(
        self, settings: BrokerSettings, client_id: str, lines: Sequence[str] | None = None
    ) -> None:
        self.topics = Topics(settings.topic_root)
        self.filters = self.topics.input_filters(list(lines) if lines else None)
        self.settings = settings
        self._prefix = f"{settings.topic_root}/telemetry/"
        self._out = f"{settings.topic_root}/alerts/"
        self.relayed = 0
        self.refused = 0
        self.subscribed = threading.Event()
        self.waiter = fwmqtt.ConnectWaiter()
        self.client = fwmqtt.new_client(settings, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.waiter.record(reason)
        if not reason.is_failure:
            client.subscribe([(f, fwmqtt.QOS) for f in self.filters])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(fwmqtt.reason_failed(code) for code in codes):
            print(f"relay_subscribe_refused {[str(c) for c in codes]}", flush=True)
            return
        self.subscribed.set()
        print(READY, flush=True)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # <root>/telemetry/<line>/<machine> -> <root>/alerts/<line>/<machine>/verdict
        topic = msg.topic
        if not topic.startswith(self._prefix):
            return
        client.publish(
            f"{self._out}{topic[len(self._prefix) :]}/verdict", msg.payload, qos=fwmqtt.QOS
        )
        self.relayed += 1

    def _on_publish(self, _c: mqtt.Client, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        if fwmqtt.reason_failed(reason):
            self.refused += 1

    def run(self, stop: threading.Event) -> None:
        """Connect, relay until ``stop`` is set, then disconnect."""
        fwmqtt.connect(self.client, self.settings, self.waiter)
        stop.wait()
        self.client.disconnect()
        self.client.loop_stop()
        print(f"relay_stopped relayed={self.relayed} refused={self.refused}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.relay``."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True, help="topic root")
    parser.add_argument("--client-id", default=None, help="MQTT client id (default: random)")
    parser.add_argument("--lines", default=None, help="comma-separated lines (default: all)")
    args = parser.parse_args(argv)
    settings = BrokerSettings().with_overrides(host=args.host, port=args.port, topic_root=args.root)
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    lines = [x for x in (args.lines or "").split(",") if x]
    client_id = args.client_id or f"bench-relay-{uuid.uuid4().hex[:8]}"
    relay = Relay(settings, client_id, lines or None)
    runtime.settle_heap()  # as the detector does: the ceiling gets every process-level tuning
    relay.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
