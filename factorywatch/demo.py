"""``make demo``: a local broker, the detector and three simulated machines, verdicts live."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import RELOAD_PID_FILE, LocalBroker, announce_reload_pid
from factorywatch.contracts import AlertEvent, DeadLetter, Verdict
from factorywatch.credentials import init_secrets
from factorywatch.errors import FactorywatchError
from factorywatch.launch import Launched, child_env, cli_command
from factorywatch.settings import BrokerSettings, DataSettings
from factorywatch.topics import Topics

DEMO_MACHINES = ("press-1", "lathe-2", "mill-3")


def _spawn(args: list[str], log_file: Path) -> Launched:
    return Launched(cli_command(*args), log_file, env=child_env(), name=args[0])


def _data_args(data: DataSettings) -> list[str]:
    out = ["--data-dir", str(data.data_dir), "--model-dir", str(data.model_dir)]
    if data.dataset is not None:
        out += ["--dataset", str(data.dataset)]
    return out


def failure_reason(log_text: str) -> str | None:
    """The cause a stopped role printed last (its ``error: ...`` line), if any."""
    reasons = [
        ln[len("error: ") :].strip() for ln in log_text.splitlines() if ln.startswith("error: ")
    ]
    return reasons[-1] if reasons else None


def failure_message(name: str, returncode: int | None, log_text: str, log_file: Path) -> str:
    """What the terminal says when a demo process stopped: its cause and the remedy."""
    reason = failure_reason(log_text)
    if reason is None:
        tail = [ln for ln in log_text.splitlines() if ln.strip()][-5:]
        reason = "no error line; its last lines:\n    " + "\n    ".join(tail or ["(empty log)"])
    message = f"the demo's {name} stopped (exit {returncode}): {reason}"
    if "--dataset" in reason:
        # The detector's remedy names its own option; through make it is a variable.
        message += "\n  with make: make demo DATASET=/path/to/ai4i2020.csv"
    return f"{message}\n  full log: {log_file}"


LEGEND = (
    "each line: line/machine, the reading's id (seq), the verdict, its score against the "
    "model's threshold (higher = more anomalous; ALERT above it), then the latency from the "
    "reading's timestamp to its verdict; an ALERT at or below the threshold is one whose "
    "readings lie outside the training envelope (the channels named), and `z=` names the "
    "features that drove a high score; a reading left unanswered (sent while the detector "
    "was still starting) is sent again, so a few early seqs come late"
)


def verdict_line(v: Verdict) -> str:
    """One verdict as a demo line (rich markup): the comparison shown is the one that holds."""
    if v.status == "CALIBRATING" and v.calibration is not None:
        return (
            f"{v.line}/{v.machine_id:<8} seq={v.seq} [dim]CALIBRATING[/] "
            f"{v.calibration.seen}/{v.calibration.needed} readings collected"
        )
    style = "bold red" if v.status == "ALERT" else "green"
    above = v.score > v.threshold
    relation = ">" if above else "<="
    envelope = drivers = ""
    if v.outside_training:
        # An envelope ALERT with a low score is no contradiction: say which rule fired.
        joint = "  " if above or v.status != "ALERT" else ", but "
        envelope = f"{joint}outside training envelope: " + ", ".join(v.outside_training)
    if v.surprise is not None and not v.outside_training:
        # a surprise ALERT with a low score: the machine's recent scores, not the threshold
        joint = "  " if above else ", but "
        envelope = f"{joint}unusual for this machine lately (surprise {v.surprise:.1f})"
    if v.explanation:
        drivers = "  " + ", ".join(f"{c.feature} z={c.z:+.1f}" for c in v.explanation)
    return (
        f"{v.line}/{v.machine_id:<8} seq={v.seq} "
        f"[{style}]{v.status:<6}[/] score {v.score:.3f} {relation} threshold {v.threshold:.3f}"
        f"{envelope}  latency {v.latency_ms:.2f} ms{drivers}"
    )


def unscorable_line(letter: DeadLetter) -> str | None:
    """The loud line for readings the detector's model cannot score (None: another reason)."""
    if letter.reason != "missing_channel":
        return None
    return (
        f"[bold red]*** the detector cannot score these readings: {letter.detail}.[/] "
        "Its current model was trained on other channels (`train --csv` over the demo's "
        "model?): `factorywatch models list`, then `factorywatch models promote VERSION` of "
        "an AI4I model, or retrain with `factorywatch train --promote`"
    )


def model_switch_line(previous: str | None, current: str) -> str | None:
    """The line announcing that verdicts now come from another model (None: no switch)."""
    if previous is None or previous == current:
        return None
    return f"[bold cyan]*** model switched: {previous} -> {current}[/]"


def mosquitto_sub_command(port: int, secrets_dir: Path, topic_filter: str) -> str:
    """The command that shows the verdicts, for a shell: one line, nothing to expand."""
    password = shlex.quote(str(secrets_dir / "viewer.password"))
    return (
        f'mosquitto_sub -h 127.0.0.1 -p {port} -u viewer -P "$(cat {password})" '
        f"-t {shlex.quote(topic_filter)} -v"
    )


def write_hint(workdir: Path, command: str) -> Path:
    """Save ``command`` as an executable script in the run directory; return its path."""
    script = workdir / "mosquitto_sub.sh"
    script.write_text(
        "#!/bin/sh\n# Watch the demo's verdicts yourself; extra options (-C 5) are passed on.\n"
        f'exec {command} "$@"\n'
    )
    script.chmod(0o755)
    return script


def add_machine_hint(secrets_dir: Path, pid: int) -> str:
    """How to add a machine of one's own to the running demo (the broker reloads on HUP)."""
    return (
        f"add a machine: factorywatch broker add-user MACHINE --secrets-dir {secrets_dir}, "
        f"then kill -HUP {pid} (this demo reloads the broker's users; the detector follows "
        "the registry and scores the machine from its first reading)"
    )


def _print_hint(command: str, script: Path) -> None:
    # Plain print, not rich: rich wraps long lines at the console width (80 in a pipe),
    # which broke the command inside $(cat ...). One line each, copy-safe.
    print(f"watch verdicts yourself:\n  {command}\n  (or: sh {script})", flush=True)


def _show(console: Console) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
    model: dict[str, str] = {}
    said: set[str] = set()  # dead-letter reasons already shown: once each, not per reading

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if "/deadletter/" in msg.topic:
            try:
                letter = DeadLetter.model_validate_json(msg.payload)
            except ValueError:
                return
            line = unscorable_line(letter)
            if line is not None and letter.reason not in said:
                said.add(letter.reason)
                console.print(line, highlight=False)
            return
        if msg.topic.endswith("/event"):
            try:
                e = AlertEvent.model_validate_json(msg.payload)
            except ValueError:
                return
            console.print(
                f"[bold yellow]*** {e.line}/{e.machine_id} {e.event}[/]"
                + (f" peak score {e.peak_score:.3f}" if e.peak_score is not None else ""),
                highlight=False,
            )
            return
        if not msg.topic.endswith("/verdict"):
            return  # retained states
        try:
            v = Verdict.model_validate_json(msg.payload)
        except ValueError:
            return
        switch = model_switch_line(model.get("version"), v.model_version)
        model["version"] = v.model_version
        if switch is not None:
            console.print(switch, highlight=False)
        console.print(verdict_line(v), highlight=False, soft_wrap=True)  # one line per verdict

    return on_message


def _serve(
    args: argparse.Namespace,
    broker: LocalBroker,
    children: list[Launched],
    *,
    stop: threading.Event,
    progress: Callable[[str], None],
) -> None:
    """Until Ctrl-C or ``--duration``: reload on SIGHUP, stop if a role stops."""
    # SIGHUP, as for `broker serve`: the broker reads copies of the password file and an
    # ACL rendered from the registry, so `broker add-user` needs them rewritten first; the
    # detector follows the registry file itself (``Runner.reload_registry``): no restart.
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda _s, _f: reload.set())
    announce_reload_pid(broker.workdir)  # `factorywatch web --broker-pid-file` signals it
    if broker.secrets_dir is not None:
        progress(add_machine_hint(broker.secrets_dir, os.getpid()))
    deadline = None if args.duration is None else time.monotonic() + args.duration
    while not stop.wait(0.5):
        if deadline is not None and time.monotonic() > deadline:
            break
        if reload.is_set():
            reload.clear()
            broker.reload()
            progress(
                "broker reloaded its users and ACL; the detector follows the registry "
                "(a new machine is scored from its first reading)"
            )
        for child in children:
            if not child.running():
                raise FactorywatchError(
                    failure_message(
                        child.name, child.process.returncode, child.log(), child.log_file
                    )
                )


def run_demo(
    args: argparse.Namespace,
    data: DataSettings,
    *,
    stop: threading.Event,
    progress: Callable[[str], None],
) -> int:
    """Run everything until Ctrl-C (or ``--duration``); clean up all processes."""
    console = Console()
    workdir = Path("run") / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    secrets_dir = workdir / "secrets"
    init_secrets(secrets_dir, DEMO_MACHINES)
    broker = LocalBroker(workdir / "broker", port=args.port, secrets_dir=secrets_dir)
    children: list[Launched] = []
    try:
        broker.start()
        progress(
            f"mosquitto on 127.0.0.1:{broker.port} (TLS {broker.tls_port}) with "
            "broker/mosquitto.conf and broker/acl: authentication required"
        )
        port_args = ["--port", str(broker.port), "--secrets-dir", str(secrets_dir)]
        detect_args = ["detect", "--train-if-missing", *_data_args(data), *port_args]
        children.append(_spawn(detect_args, workdir / "detector.log"))

        progress("detector starting (trains a model first if none exists)")
        sensors = _spawn(
            [
                "sensor",
                "--machine-id",
                ",".join(DEMO_MACHINES),
                "--rate",
                str(args.rate),
                "--anomaly-rate",
                "0.05",
                *port_args,
            ],
            workdir / "sensors.log",
        )
        children.append(sensors)
        topics = Topics(BrokerSettings().topic_root)
        hint = mosquitto_sub_command(broker.port, secrets_dir, topics.alerts_filter)
        hint_file = write_hint(workdir, hint)
        progress(f"logs in {workdir}; the command to watch verdicts is in {hint_file}")
        # As `monitor`, not `viewer`: a login is a client id (one connection per account), and
        # `viewer` is left to the mosquitto_sub above or `factorywatch watch`.
        settings = BrokerSettings().with_overrides(
            port=broker.port, username="monitor", secrets_dir=secrets_dir
        )
        viewer = fwmqtt.new_client(settings, f"demo-viewer-{os.getpid()}")
        waiter = fwmqtt.ConnectWaiter()

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            waiter.record(rc)
            c.subscribe([(topics.alerts_filter, 1), (topics.deadletter_filter, 1)])

        viewer.on_connect = on_connect
        viewer.on_message = _show(console)
        fwmqtt.connect(viewer, settings, waiter)
        _print_hint(hint, hint_file)
        print(LEGEND, flush=True)
        _serve(
            args,
            broker,
            children,
            stop=stop,
            progress=progress,
        )
        viewer.disconnect()
        viewer.loop_stop()
    finally:
        for child in reversed(children):
            child.terminate(15)
        broker.stop()
        (broker.workdir / RELOAD_PID_FILE).unlink(missing_ok=True)
        progress("demo stopped: broker, detector and sensors are down")
    return 0
