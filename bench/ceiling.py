"""Mosquitto's own ceiling, measured with Debian's C clients (no Python anywhere in the path).

Two figures, both QoS 1 on the same broker the Python runs use:

* one hop: ``mosquitto_pub -l`` -> broker -> ``mosquitto_sub`` (what the broker and
  libmosquitto move when nobody republishes);
* C relay: ``mosquitto_pub -l`` -> broker -> ``mosquitto_sub | mosquitto_pub -l`` -> broker
  -> ``mosquitto_sub``: the same two hops as ``bench.relay``, done in C, so the Python
  relays and the detector can be read against it.

Every subscriber is set up first as a persistent session (``-c -x``) by a ``mosquitto_sub -E``
that exits once its SUBACK came back; the measuring subscriber then resumes that session, so
nothing published after the set-up can be missed and no wait is a guess. Time = from starting
the publisher to the exit of the last subscriber (``-C N``: after the N-th message).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.system import proc_cpu_s

MAX_INFLIGHT = 1000  # as our own publishers (paho's defaults) and the broker's limit


@dataclass(frozen=True)
class CeilingRun:
    """One C measurement."""

    path: str
    messages: int
    seconds: float
    relay_cpu_s: float | None = None  # the C relay's two processes (None: no relay in the path)

    @property
    def msgs_per_s(self) -> float:
        """Messages per second end to end."""
        return round(self.messages / self.seconds, 1) if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The row for the report."""
        return {
            "path": self.path,
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "msgs_per_s": self.msgs_per_s,
            "relay_cpu_us_per_msg": self.relay_cpu_us_per_msg,
        }

    @property
    def relay_cpu_us_per_msg(self) -> float | None:
        """CPU microseconds the C relay (``mosquitto_sub | mosquitto_pub``) spent per message."""
        if self.relay_cpu_s is None or not self.messages:
            return None
        return round(self.relay_cpu_s / self.messages * 1e6, 1)


def c_clients() -> tuple[str, str]:
    """Paths of ``mosquitto_pub`` and ``mosquitto_sub`` (Debian's mosquitto-clients)."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if pub is None or sub is None:
        raise SystemExit(
            "error: mosquitto_pub/mosquitto_sub not found: `apt-get install mosquitto-clients` "
            "(scripts/ensure-mosquitto.sh installs it)"
        )
    return pub, sub


class CeilingProbe:
    """Runs the C measurements against a broker on ``127.0.0.1:port``."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.pub, self.sub = c_clients()
        workdir.mkdir(parents=True, exist_ok=True)

    def _common(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-V", "5", "-q", "1"]

    def _session(self, client_id: str, topic: str) -> list[str]:
        return [*self._common(), "-i", client_id, "-c", "-x", "3600", "-t", topic]

    def _subscribe_first(self, client_id: str, topic: str) -> None:
        """Create the persistent session and its subscription; returns after the SUBACK."""
        subprocess.run([self.sub, *self._session(client_id, topic), "-E"], check=True, timeout=30)

    def _payload_file(self, payloads: list[bytes]) -> Path:
        path = self.workdir / f"payloads-{len(payloads)}.txt"
        if not path.is_file():
            path.write_bytes(b"\n".join(p.replace(b"\n", b" ") for p in payloads) + b"\n")
        return path

    def one_hop(self, payloads: list[bytes]) -> CeilingRun:
        """C publisher -> broker -> C subscriber."""
        tag = uuid.uuid4().hex[:8]
        topic, sub_id = f"ceiling{tag}/in", f"ceiling-sub-{tag}"
        self._subscribe_first(sub_id, topic)
        return self._timed(
            "one hop (C pub -> C sub)",
            payloads=payloads,
            publish_topic=topic,
            sub_id=sub_id,
            sub_topic=topic,
            relay=[],
        )

    def c_relay(self, payloads: list[bytes]) -> CeilingRun:
        """C publisher -> broker -> ``mosquitto_sub | mosquitto_pub -l`` -> broker -> C sub."""
        tag = uuid.uuid4().hex[:8]
        inbound, outbound = f"ceiling{tag}/in", f"ceiling{tag}/out"
        relay_id, sub_id = f"ceiling-relay-{tag}", f"ceiling-sub-{tag}"
        self._subscribe_first(relay_id, inbound)
        self._subscribe_first(sub_id, outbound)
        relay_in = subprocess.Popen(
            [self.sub, *self._session(relay_id, inbound)], stdout=subprocess.PIPE
        )
        relay_out = subprocess.Popen(
            [self.pub, *self._common(), "-M", str(MAX_INFLIGHT), "-t", outbound, "-l"],
            stdin=relay_in.stdout,
        )
        assert relay_in.stdout is not None
        relay_in.stdout.close()  # the pipe now belongs to the two children
        try:
            return self._timed(
                "C relay (C pub -> mosquitto_sub | mosquitto_pub -> C sub)",
                payloads=payloads,
                publish_topic=inbound,
                sub_id=sub_id,
                sub_topic=outbound,
                relay=[relay_in, relay_out],
            )
        finally:
            for proc in (relay_in, relay_out):
                proc.terminate()
                proc.wait(10)

    def _timed(
        self,
        path: str,
        *,
        payloads: list[bytes],
        publish_topic: str,
        sub_id: str,
        sub_topic: str,
        relay: list[subprocess.Popen[bytes]],
    ) -> CeilingRun:
        count = len(payloads)
        source = self._payload_file(payloads)
        cpu_before = [proc_cpu_s(p.pid) for p in relay]
        with source.open("rb") as stdin:
            started = time.perf_counter()
            receiver = subprocess.Popen(
                [self.sub, *self._session(sub_id, sub_topic), "-C", str(count)],
                stdout=subprocess.DEVNULL,
            )
            publisher = subprocess.Popen(
                [self.pub, *self._common(), "-M", str(MAX_INFLIGHT), "-t", publish_topic, "-l"],
                stdin=stdin,
            )
            try:
                receiver.wait(max(60.0, count / 500.0))
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
                raise RuntimeError(f"{path}: not all {count} messages arrived") from None
            finally:
                publisher.wait(30)
            seconds = time.perf_counter() - started
        cpu_after = [proc_cpu_s(p.pid) for p in relay]
        relay_cpu: float | None = None
        if relay and None not in cpu_before and None not in cpu_after:
            relay_cpu = sum(a or 0.0 for a in cpu_after) - sum(b or 0.0 for b in cpu_before)
        if receiver.returncode != 0 or any(p.poll() not in (None, 0) for p in relay):
            raise RuntimeError(f"{path}: a C client failed (exit {receiver.returncode})")
        return CeilingRun(path, count, seconds, relay_cpu)
