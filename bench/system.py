"""System figures for the benchmark: per-process CPU and peak memory, machine-wide busy time.

Read from ``/proc`` (Linux), so the benchmark needs no extra dependency; ``environment()``
records where and how the figures were taken.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from factorywatch.broker import mosquitto_binary


def proc_status_mb(pid: int, field: str) -> float | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak resident memory) in MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024.0 if found else None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (``/proc/stat``, not idle/iowait)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuWindow:
    """CPU seconds of the processes involved in one measurement, over a wall-clock window.

    A name may stand for several processes (shards): their CPU seconds are added up.
    """

    pids: dict[str, list[int]]
    start_wall: float = 0.0
    start: dict[str, float | None] | None = None
    result: dict[str, float | None] | None = None
    start_busy: float | None = None
    used_s: dict[str, float] | None = None

    def begin(self) -> None:
        """Start the window."""
        self.start_wall = time.perf_counter()
        self.start = {name: self._cpu(pid) for name, pid in self.pids.items()}
        self.start_busy = system_busy_s()

    def end(self, subscriber_cpu_s: float | None = None) -> dict[str, float | None]:
        """Close it: CPU use of each process in % of one core over the window."""
        wall = max(time.perf_counter() - self.start_wall, 1e-9)
        start = self.start or {}
        out: dict[str, float | None] = {}
        self.used_s = {}
        for name, pid in self.pids.items():
            before, after = start.get(name), self._cpu(pid)
            if before is None or after is None:
                out[name] = None
            else:
                self.used_s[name] = after - before
                out[name] = (after - before) / wall * 100
        if subscriber_cpu_s is not None:  # whole life of the subscriber (start-up included)
            out["subscriber"] = subscriber_cpu_s / wall * 100
        busy = system_busy_s()
        if busy is not None and self.start_busy is not None:
            # everything else on the machine (other users' processes, the kernel's own work)
            ours = sum(v for v in out.values() if v is not None)
            out["other"] = max(0.0, (busy - self.start_busy) / wall * 100 - ours)
        self.result = {k: (None if v is None else round(v, 1)) for k, v in out.items()}
        return self.result

    def per_message_us(self, name: str, messages: int) -> float | None:
        """CPU microseconds process ``name`` spent per message in the window."""
        used = (self.used_s or {}).get(name)
        return round(used / messages * 1e6, 1) if used is not None and messages else None

    @staticmethod
    def _cpu(pids: list[int]) -> float | None:
        total = 0.0
        for pid in pids:
            if pid == os.getpid():
                times = os.times()
                used: float | None = times.user + times.system
            else:
                used = proc_cpu_s(pid)
            if used is None:
                return None
            total += used
        return total


def environment(command: str, load_at_start: Sequence[float]) -> dict[str, Any]:
    """Where and how the figures were measured."""
    version = subprocess.run(
        [mosquitto_binary(), "-h"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"mosquitto version (\S+)", version)
    cpu_model = None
    try:
        model_line = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = model_line.group(1).strip() if model_line else None
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "paho_mqtt": metadata.version("paho-mqtt"),
        "gmqtt": _version("gmqtt"),
        "mosquitto": found.group(1) if found else None,
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(v, 2) for v in load_at_start],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "command": command,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
