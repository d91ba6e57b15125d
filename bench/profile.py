"""``python -m bench.profile``: where the detector's CPU goes under load, sampled by py-spy.

Starts its own Mosquitto and a model as ``bench.run`` does, runs one detector throughput
measurement (10 machines, QoS 1, the same load generator) with ``py-spy record`` attached to
the detector, and summarises the samples: how many fall in the transport (the mqtt5 driver by
default, paho-mqtt with ``--transport paho``), in our code and elsewhere,
and the heaviest functions (inclusive and self). Writes ``<out>/profile.md`` and the raw
collapsed stacks ``<out>/profile-detector.txt`` (for flamegraph tools). Figures depend on the
machine: nothing is asserted.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import harness as bench_run
from factorywatch.launch import Launched

OWN_PREFIXES: Final = ("detector/", "factorywatch/", "model/", "sensors/")
SAMPLE_RATE_HZ: Final = 250


def _function(frame: str) -> str:
    """``func (paho/mqtt/client.py:1625)`` -> ``func (paho/mqtt/client.py)``."""
    name, _, location = frame.partition(" (")
    path = location.rstrip(")").rpartition(":")[0] or location.rstrip(")")
    return f"{name} ({path})" if path else name


def _owner(function: str) -> str | None:
    path = function.rpartition(" (")[2].rstrip(")")
    # py-spy names installed packages relative to sys.path, or from site-packages/ on
    path = path.removeprefix("site-packages/")
    if path.startswith("paho/"):
        return "paho-mqtt"
    # the default transport: the compiled codec's package and our driver around it
    if path.startswith("mqtt5/") or path.endswith("detector/mqtt5_transport.py"):
        return "mqtt5 driver"
    if path.startswith(OWN_PREFIXES):
        return "factorywatch"
    return None


def _where(frames: Sequence[str]) -> str:
    """Whose work a sample is: the innermost frame that is the transport's or ours decides.

    pydantic called by the decoder counts as ours; ``threading.Condition`` made inside
    paho's ``publish`` counts as paho's.
    """
    for frame in reversed(frames):
        owner = _owner(frame)
        if owner is not None:
            return owner
    return "other"


#: the detector's CPU split (``split_of``): per part, (file suffix, function names or None for
#: every function of the file); the innermost frame that matches decides
SPLIT_PARTS: Final = ("transport", "decode", "engine", "scoring", "publish")
_SPLIT_RULES: Final[tuple[tuple[str, str, frozenset[str] | None], ...]] = (
    # building a verdict's bytes and queuing its PUBLISH
    ("publish", "factorywatch/verdict_codec.py", None),
    ("publish", "detector/mqtt5_transport.py", frozenset({"publish", "_send_publish", "_release"})),
    ("publish", "detector/transport.py", frozenset({"send"})),
    ("publish", "detector/mqtt_transport.py", frozenset({"publish"})),
    # features, the forest, thresholds, envelope and explanations
    (
        "scoring",
        "detector/batch_scoring.py",
        frozenset({"score", "_score_pipeline", "_verdicts", "_contributions", "score_parts"}),
    ),
    ("scoring", "model/", None),
    # payload -> validated reading
    ("decode", "detector/ingest.py", None),
    ("decode", "detector/batch_scoring.py", None),
    ("decode", "factorywatch/contracts.py", None),
    ("decode", "detector/sparkplug.py", None),
    # socket, packets, acks, the wait for them
    ("transport", "detector/mqtt5_transport.py", None),
    ("transport", "mqtt5/", None),
    ("transport", "paho/", None),
    ("transport", "detector/mqtt_transport.py", None),
    ("transport", "selectors.py", None),
    # the rest of the detector: engine, alert state, runner, loop, checkpoint, metrics
    ("engine", "detector/", None),
    ("engine", "factorywatch/", None),
)


def split_of(frames: Sequence[str]) -> str:
    """Which part of the detector a sample is (``SPLIT_PARTS``, else ``other``): the innermost
    frame a rule of ``_SPLIT_RULES`` matches decides (numpy under the features is scoring,
    pydantic under the decoder is decoding, orjson under the verdict codec is publishing)."""
    for frame in reversed(frames):
        name, _, location = frame.partition(" (")
        path = location.rstrip(")").removeprefix("site-packages/")
        for part, suffix, names in _SPLIT_RULES:
            matches = path.startswith(suffix) if suffix.endswith("/") else path.endswith(suffix)
            if suffix.endswith("/") and not matches:
                matches = f"/{suffix}" in path
            if matches and (names is None or name.rpartition(".")[2] in names):
                return part
    return "other"


@dataclass
class Profile:
    """Collapsed stacks summed up: samples by where the innermost frame is, and by function."""

    samples: int = 0
    by_where: Counter[str] = field(default_factory=Counter)
    #: samples by part of the detector (``split_of``)
    split: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Profile:
        """Read py-spy's ``--format raw`` output (``frame;frame;... count`` per line).

        Frames are reduced to ``function (file)`` so that one function's lines add up.
        """
        profile = cls()
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_function(f) for f in stack.split(";") if f]
            if not frames:
                continue
            profile.samples += n
            profile.by_where[_where(frames)] += n
            profile.split[split_of(frames)] += n
            profile.self_time[frames[-1]] += n
            for frame in set(frames):
                profile.inclusive[frame] += n
        return profile

    def markdown(self, top: int = 25) -> list[str]:
        """Tables: share by where, then the heaviest functions inclusive and self."""
        total = max(1, self.samples)
        out = [
            f"{self.samples:,} samples at {SAMPLE_RATE_HZ} Hz (idle time not sampled).",
            "",
            "| whose work (innermost transport or project frame) | samples | share |",
            "|---|---:|---:|",
        ]
        out += [
            f"| {where} | {n:,} | {100 * n / total:.1f} % |"
            for where, n in self.by_where.most_common()
        ]
        for title, counter in (("inclusive", self.inclusive), ("self", self.self_time)):
            out += ["", f"Heaviest functions ({title}):", "", "| function | share |", "|---|---:|"]
            # Entry points (runpy, main, the run loop) hold every sample: not worth a row.
            rows = [(name, n) for name, n in counter.most_common() if n < 0.95 * total]
            out += [f"| `{name}` | {100 * n / total:.1f} % |" for name, n in rows[:top]]
        return out


@contextmanager
def spied(bench: bench_run.Bench, out_raw: Path, *, gil: bool = False) -> Iterator[None]:
    """Every detector ``bench`` starts inside runs with ``py-spy record`` attached, its raw
    samples written to ``out_raw`` when it stops (``gil``: only samples holding the GIL,
    so time in system calls that release it — waiting for the socket — is not counted)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    original = bench.start_detector
    spies: list[Launched] = []

    def start_detector(root: str, folder: Path, **kwargs: Any) -> bench_run.Server:
        server = original(root, folder, **kwargs)
        command = [spy, "record", "--pid", str(server.pid), "--format", "raw"]
        command += ["--rate", str(SAMPLE_RATE_HZ), "--nonblocking", "--output", str(out_raw)]
        command += ["--gil"] if gil else []
        spies.append(Launched(command, folder / "py-spy.log", name="py-spy"))
        spies[-1].wait_log("Sampling process", 30.0)  # attached: the load may start
        return server

    bench.start_detector = start_detector  # type: ignore[method-assign]
    try:
        yield
    finally:
        bench.start_detector = original  # type: ignore[method-assign]
        for proc in spies:  # the detector has stopped: py-spy writes its file and exits
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.process.send_signal(signal.SIGINT)
                proc.wait(30)


def record(bench: bench_run.Bench, out_raw: Path, messages: int) -> dict[str, Any]:
    """One detector throughput run with py-spy attached to the detector; the run's row."""
    with spied(bench, out_raw):
        return bench.throughput("detector", 10, messages)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.profile``."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--dataset", type=Path, help="AI4I CSV to train on (default: data/)")
    parser.add_argument("--messages", type=int, default=40_000, help="readings to send")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.profile", *(argv or sys.argv[1:])])
    dataset = bench_run.find_dataset(args.dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "profile-detector.txt"
    with tempfile.TemporaryDirectory(prefix="factorywatch-profile-") as tmp:
        workdir = Path(tmp)
        bench_run.progress(f"training a model on {dataset} ...")
        bench_run.train(dataset, workdir / "model", no_verify=False)
        bench = bench_run.Bench(workdir, workdir / "model", bench_run.FULL)
        bench.broker.start()
        try:
            bench_run.progress(f"profiling the detector under {args.messages:,} readings ...")
            row = record(bench, raw, args.messages)
        finally:
            bench.broker.stop()
    if not raw.exists():
        bench_run.progress("py-spy wrote no samples (is ptrace allowed here?)")
        return 1
    profile = Profile.parse(raw.read_text().splitlines())
    lines = [
        "# Profile: the detector under load (py-spy)",
        "",
        f"Produced by `{command}`: {row['msgs_per_s']} msg/s, "
        f"{row.get('server_cpu_us_per_msg')} µs of detector CPU per message, lost {row['lost']}.",
        "",
        *profile.markdown(),
        "",
    ]
    text = "\n".join(lines)
    (args.out / "profile.md").write_text(text)
    print(text)
    bench_run.progress(f"wrote {args.out / 'profile.md'} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
