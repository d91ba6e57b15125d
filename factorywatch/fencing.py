"""One identity, one process: a client that another process with its identity replaced stops.

Mosquitto gives a client id to the newest connection and closes the older one (2.0.11 closes
the socket without a DISCONNECT reason), so two detectors started with one identity would
reconnect in turn and kick each other off for ever, both scoring. The fence settles it,
newest wins, with no clock comparison:

- each process publishes a *lease* (a random token, retained, QoS 1) on
  ``<root>/status/<role>/<id>/lease`` on connecting until it has received it back, and
  subscribes to it on every connect (so the broker sends the retained lease again);
- a lease with another token that arrives *after* our own came back was published after
  ours: a newer process holds the identity. We stop taking messages (they stay
  unacknowledged and go to the newer process) and call ``on_fenced``, whose owner shuts
  down (its next reconnect would kick the newer process off again).

A lease that arrives before ours came back is an older process's (dead, or about to be
fenced by ours) and is ignored. After losing its connection a fenced-in client waits
``SETTLE_S`` before reconnecting: at once, it would kick the newer process off before that
one's lease reached the broker, and the two would fight (measured: > 30 s without the
pause when both reconnect at once).

Detectors (``<root>/status/detector/<id>/lease``) and sensors
(``<root>/status/sensor/<machine id>/lease``) are fenced alike. The lease's own PUBACKs and
SUBACKs are the fence's: the owner's ``on_publish`` / ``on_subscribe`` never see them.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

# Pause after losing the connection before reconnecting: long enough for the process that
# took our identity over to publish its lease (a few ms), short beside the reconnect backoff.
SETTLE_S = 1.0


class Fence:
    """Wraps a paho client's callbacks (call before connecting)."""

    def __init__(
        self,
        client: mqtt.Client,
        lease_topic: str,
        on_fenced: Callable[[str], None],
        *,
        settle_s: float = SETTLE_S,
    ) -> None:
        self.client = client
        self.settle_s = settle_s
        self.topic = lease_topic
        self.on_fenced = on_fenced
        self.token = uuid.uuid4().hex
        self.echoed = False
        self.fenced = False
        self._sub_mids: set[int] = set()
        self._pub_mids: set[int] = set()
        self._connect: Any = client.on_connect
        self._message: Any = client.on_message
        self._subscribe: Any = client.on_subscribe
        self._disconnect: Any = client.on_disconnect
        self._publish: Any = client.on_publish
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

    def lease(self) -> bytes:
        """Our lease: the token, plus who holds it (for people reading the topic)."""
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": time.time(),
            }
        ).encode()

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connect is not None:
            self._connect(c, u, flags, reason, props)
        if getattr(reason, "is_failure", False) or self.fenced:
            return
        # QoS 0: a lease must never be redelivered from the shared session to another process
        # (a QoS 1 lease left unacknowledged by a kicked-off process would reach the newer
        # one later and fence it too).
        _, mid = c.subscribe(self.topic, qos=0)
        if mid is not None:
            self._sub_mids.add(mid)
        if not self.echoed:  # until the broker has it (we may be kicked off before)
            # paho calls on_publish on this same thread, so the mid is known before its PUBACK
            self._pub_mids.add(c.publish(self.topic, self.lease(), qos=1, retain=True).mid)

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        if mid in self._pub_mids:
            self._pub_mids.discard(mid)
            return
        if self._publish is not None:
            self._publish(c, u, mid, reason, props)

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._disconnect is not None:
            self._disconnect(c, u, flags, reason, props)
        if getattr(reason, "value", 0) != 0 and not self.fenced:
            # Lost, not left: maybe a newer process took our identity. Reconnecting at once
            # would kick it off before its lease reaches the broker; give it that time.
            time.sleep(self.settle_s)

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, codes: Any, props: Any) -> None:
        if mid in self._sub_mids:
            self._sub_mids.discard(mid)
            return
        if self._subscribe is not None:
            self._subscribe(c, u, mid, codes, props)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topic:
            self._on_lease(c, bytes(msg.payload))
            if msg.qos:
                c.ack(msg.mid, msg.qos)
            return
        if self.fenced:
            return  # left unacknowledged: the broker gives it to the process that holds the id
        if self._message is not None:
            self._message(c, u, msg)

    def _on_lease(self, c: mqtt.Client, payload: bytes) -> None:
        try:
            token = json.loads(payload).get("token")
        except (ValueError, AttributeError):
            return  # not a lease (e.g. a cleared retained message)
        if token == self.token:
            self.echoed = True
        elif self.echoed and not self.fenced:
            self.fenced = True
            self.on_fenced(f"a newer process holds this identity: {payload.decode()[:200]}")
