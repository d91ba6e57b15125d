"""Labelled runs replayed through a real Mosquitto and real detectors, scored like offline.

``make scenarios-live`` (``python -m factorywatch.live_evaluation data/scenarios``): for each
model configuration (global point model, per-run point model, per-run windowed model) the
models are fitted exactly as ``factorywatch evaluate --csv`` fits them
(``model.streams.fit_models``), saved as artifacts, and served by one ``factorywatch detect``
process per configuration: the global model as the detector's default model; per-run models
as each run's machine's own model (``<model dir>/machines/<machine>/current``), picked per
reading by the detector's router (``detector/router.py``) exactly as a plant's per-machine
models are. Every run is replayed as its own machine with ``factorywatch replay --csv``
(readings stamped at publication, as fast as ``--rate`` allows: windows count readings, not
seconds). Verdicts are collected from the alerts tree, joined to the labels by
``(machine, seq)`` and counted with the offline code (``model.streams.run_result``,
``summary``). The report puts offline and live side by side with delivery figures: readings,
verdicts, lost (no verdict), duplicates (more than one) and flags that differ from offline.

An application on top (it starts processes); nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import paho.mqtt.client as mqtt

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import LocalBroker
from factorywatch.contracts import Verdict
from factorywatch.errors import FactorywatchError
from factorywatch.launch import Launched, child_env, cli_command
from factorywatch.model import artifact, rebaseline, streams
from factorywatch.model.fitspec import DEFAULT_SPEC, FitSpec
from factorywatch.model.generic import Scores, Trained
from factorywatch.model.recording import Recording
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics, check_id

JSON_FILE: Final = "scenarios-live.json"
REPORT_FILE: Final = "scenarios-live.md"
READY: Final = "telemetry_subscribed"
BARRIER_ROLE: Final = "evaluator"

Key = tuple[str, int]


def default_configs(far: float, trees: int, window: int) -> list[streams.Config]:
    """What the report compares: global point, per-run point, per-run with the default preset."""
    spec = FitSpec(far=far, trees=trees, window=window)
    point = spec.replace(preset="point")
    return [
        streams.Config(name="global point", spec=point, mode="global"),
        streams.Config(name="per-run point", spec=point),
        streams.Config(name=f"per-run {spec.preset}", spec=spec),
    ]


@dataclass
class Delivery:
    """How the verdicts of one configuration arrived."""

    readings: int = 0
    verdicts: int = 0
    lost: int = 0  # readings without a verdict
    duplicates: int = 0  # verdicts beyond the first for a reading
    unexpected: int = 0  # verdicts for readings that were never sent
    flag_mismatches: int = 0  # readings whose live ALERT flag differs from offline
    #: readings CALIBRATING live while offline scored them: a re-baselined machine's fit
    #: runs off the detector's loop (offline it takes no time; ``model.rebaseline``)
    fitting: int = 0
    wrong_model: int = 0  # verdicts by another model than the run's (the router's choice)
    max_score_diff: float = 0.0
    max_score_diff_at: str | None = None  # "machine seq" of the largest difference


@dataclass
class ConfigOutcome:
    """Offline and live results of one configuration."""

    config: streams.Config
    offline: list[streams.RunResult]
    live: list[streams.RunResult]
    delivery: Delivery
    lost_keys: list[Key] = field(default_factory=list)
    #: the version of the model that scores each run (one for a global model)
    versions: list[str] = field(default_factory=list)


class VerdictSink:
    """A paho subscriber keeping every verdict of one topic root, with a barrier."""

    def __init__(self, settings: BrokerSettings, topics: Topics) -> None:
        self.topics = topics
        self.verdicts: dict[Key, list[Verdict]] = {}
        self.count = 0
        self._cond = threading.Condition()
        self._barrier_topic = topics.status(BARRIER_ROLE, f"sink-{uuid.uuid4().hex[:8]}")
        self._barriers: set[bytes] = set()
        self._subscribed = threading.Event()
        self.client = fwmqtt.new_client(settings, f"live-eval-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self._waiter = fwmqtt.ConnectWaiter()
        fwmqtt.connect(self.client, settings, self._waiter)
        if not self._subscribed.wait(10):
            raise FactorywatchError("the verdict subscription was not acknowledged within 10 s")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._waiter.record(rc)
        client.subscribe([(self.topics.verdict("+", "+"), 1), (self._barrier_topic, 1)])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            if msg.topic == self._barrier_topic:
                self._barriers.add(bytes(msg.payload))
            else:
                verdict = Verdict.model_validate_json(msg.payload)
                self.verdicts.setdefault((verdict.machine_id, verdict.seq), []).append(verdict)
                self.count += 1
            self._cond.notify_all()

    def wait_keys(
        self, keys: set[Key], deadline_s: float, alive: Callable[[], bool] = lambda: True
    ) -> set[Key]:
        """Wait until every key has a verdict (or the deadline, or ``alive()`` is False).

        Returns the keys still without a verdict.
        """
        deadline = time.monotonic() + deadline_s
        with self._cond:
            while True:
                missing = keys.difference(self.verdicts)
                left = deadline - time.monotonic()
                if not missing or left <= 0 or not alive():
                    return missing
                self._cond.wait(min(left, 0.5))

    def barrier(self, timeout_s: float = 30.0) -> None:
        """Publish a marker to ourselves and wait for it: what the broker had is delivered."""
        token = uuid.uuid4().hex.encode()
        self.client.publish(self._barrier_topic, token, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: token in self._barriers, timeout_s):
                raise FactorywatchError(f"the barrier message did not come back in {timeout_s} s")

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class _Prepared:
    """One configuration ready to serve: its models, offline results, topic root, sink."""

    config: streams.Config
    models: list[Trained]
    offline: list[streams.RunResult]
    scores: list[Scores]
    root: str
    sink: VerdictSink


@dataclass
class _Unit:
    """One detector: the model directory it serves (routes included), the runs it answers."""

    item: _Prepared
    model_dir: Path
    runs: list[int]


def _save(model_dir: Path, model: Trained) -> None:
    """Save and promote ``model`` in ``model_dir`` (created if need be)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    artifact.save_generic(model_dir, model.scorer, model.card)
    artifact.promote(model_dir, model.card.version)


def machine_name(rec: Recording) -> str:
    """The machine id a run is replayed as: its name (``valve1/1`` -> ``valve1-1``), made a
    valid id."""
    cleaned = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in rec.name)
    return check_id(cleaned.lstrip("_.-")[:64] or "run", "machine id")


class LiveEvaluation:
    """One broker, a work directory; ``run(config)`` evaluates one configuration both ways."""

    def __init__(
        self,
        recs: Sequence[Recording],
        masks: Sequence[streams.BoolArray],
        workdir: Path,
        *,
        parallel: int = 1,
        rate: float = 2000.0,
        seed: int = 0,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.recs = list(recs)
        self.masks = list(masks)
        self.workdir = workdir
        self.parallel = max(1, parallel)
        self.rate = rate
        self.seed = seed
        self.progress = progress
        self.machines = [machine_name(r) for r in self.recs]
        if len(set(self.machines)) != len(self.machines):
            raise FactorywatchError(f"two runs map to the same machine id: {self.machines}")
        self.lines = [f"run{i:03d}" for i in range(len(self.recs))]
        self.broker = LocalBroker(workdir / "broker")
        self.live_seconds = 0.0
        self._n = 0

    def __enter__(self) -> LiveEvaluation:
        self.broker.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.broker.stop()

    def _launch(self, name: str, args: list[str]) -> Launched:
        self._n += 1
        log = self.workdir / "logs" / f"{self._n:03d}-{name}.log"
        return Launched(cli_command(*args), log, env=child_env(), name=name)

    def _broker_args(self, root: str) -> list[str]:
        return ["--port", str(self.broker.port), "--topic-root", root]

    def _detector(self, root: str, model_dir: Path) -> Launched:
        tag = uuid.uuid4().hex[:8]
        args = [
            "detect",
            *self._broker_args(root),
            "--model-dir",
            str(model_dir),
            "--client-id",
            f"live-detector-{tag}",
            "--state-dir",
            str(self.workdir / "state" / tag),
            "--metrics-port",
            "0",
        ]
        return self._launch(f"detect-{root}", args)

    def _replay(self, root: str, index: int) -> Launched:
        rec = self.recs[index]
        args = [
            "replay",
            *self._broker_args(root),
            "--csv",
            str(rec.path),
            "--machine-id",
            self.machines[index],
            "--line",
            self.lines[index],
            "--channels",
            ",".join(rec.channels),
            "--rate",
            f"{self.rate:g}",
            "--seq-start",
            "0",
        ]
        return self._launch(f"replay-{self.machines[index]}", args)

    def _serve(self, models: Sequence[Trained], root: str) -> Path:
        """One model directory for a configuration's detector: the first run's model as its
        default and, where runs have models of their own, each as its machine's own model
        (what ``train --csv ... --machine M`` writes), so the router serves it."""
        model_dir = self.workdir / "models" / root
        model_dir.mkdir(parents=True)
        _save(model_dir, models[0])
        if any(model is not models[0] for model in models):
            for machine, model in zip(self.machines, models, strict=True):
                _save(artifact.route_dir(model_dir, "machine", machine), model)
        return model_dir

    def run(self, configs: Sequence[streams.Config]) -> list[ConfigOutcome]:
        """Fit and score offline; serve, replay, collect, join and count live.

        One detector per configuration (its routes serve per-run models), ``parallel`` at a
        time (default one: with three detectors and 48 replay processes at once on two cores,
        Mosquitto 2.0.11 delivered a few readings of a machine out of order, to the detector
        and to an independent subscriber alike, which moves windowed features), each
        configuration under its own topic root.
        """
        prepared: list[_Prepared] = []
        units: list[_Unit] = []
        try:
            for config in configs:
                item = self._prepare(config)
                prepared.append(item)
                model_dir = self._serve(item.models, item.root)
                units.append(_Unit(item, model_dir, list(range(len(self.recs)))))
            began = time.perf_counter()
            for start in range(0, len(units), self.parallel):
                self._round(units[start : start + self.parallel])
            self.live_seconds = round(time.perf_counter() - began, 2)
            for item in prepared:
                item.sink.barrier()  # every verdict the detectors published has reached us
        finally:
            for item in prepared:
                item.sink.close()
        return [self._join(item) for item in prepared]

    def _prepare(self, config: streams.Config) -> _Prepared:
        models = streams.fit_models(self.recs, self.masks, config, self.seed)
        scores = [
            rebaseline.replay(m, r.columns).scores for m, r in zip(models, self.recs, strict=True)
        ]
        offline = [
            streams.run_result(r, mask, s, m)
            for r, mask, s, m in zip(self.recs, self.masks, scores, models, strict=True)
        ]
        self.progress(f"{config.name}: fitted and scored offline")
        root = f"live{uuid.uuid4().hex[:8]}"
        settings = BrokerSettings().with_overrides(port=self.broker.port, topic_root=root)
        return _Prepared(config, models, offline, scores, root, VerdictSink(settings, Topics(root)))

    def _round(self, units: Sequence[_Unit]) -> None:
        """Detectors for these units, every run's replay, all verdicts in; detectors stopped."""
        detectors: list[Launched] = []
        replays: list[Launched] = []
        try:
            for unit in units:
                detectors.append(self._detector(unit.item.root, unit.model_dir))
            for detector in detectors:
                detector.wait_log(READY, 120.0)
            replays = [self._replay(unit.item.root, i) for unit in units for i in unit.runs]
            wanted = [
                (
                    unit.item.sink,
                    {
                        (self.machines[i], seq)
                        for i in unit.runs
                        for seq in range(self.recs[i].rows)
                    },
                )
                for unit in units
            ]
            readings = sum(len(keys) for _sink, keys in wanted)
            self.progress(f"{len(detectors)} detector(s), replaying {readings} readings")
            for replay in replays:
                code = replay.wait(timeout=readings / self.rate + 300.0)
                if code != 0:
                    raise FactorywatchError(
                        f"replay exited with {code}; log {replay.log_file}:\n{replay.log()[-2000:]}"
                    )
            deadline = time.monotonic() + 60.0 + readings / 200.0
            for sink, keys in wanted:
                sink.wait_keys(
                    keys,
                    max(0.0, deadline - time.monotonic()),
                    alive=lambda: all(d.running() for d in detectors),
                )
            for detector in detectors:
                if not detector.running():
                    raise FactorywatchError(
                        f"a detector exited; log {detector.log_file}:\n{detector.log()[-2000:]}"
                    )
            for detector in detectors:
                code = detector.terminate()
                if code != 0:
                    raise FactorywatchError(
                        f"detector exited with {code}; log {detector.log_file}:\n"
                        f"{detector.log()[-2000:]}"
                    )
        finally:
            for proc in [*replays, *detectors]:
                proc.kill()

    def _join(self, item: _Prepared) -> ConfigOutcome:
        """Live flags per reading joined to the labels; delivery figures."""
        sink, models, offline_scores = item.sink, item.models, item.scores
        delivery = Delivery(verdicts=sink.count)
        live: list[streams.RunResult] = []
        lost_keys: list[Key] = []
        expected: set[Key] = set()
        for i, rec in enumerate(self.recs):
            machine = self.machines[i]
            score = np.full(rec.rows, np.nan)
            outside = np.zeros(rec.rows, dtype=np.bool_)
            flagged = np.zeros(rec.rows, dtype=np.bool_)
            calibrating = np.zeros(rec.rows, dtype=np.bool_)
            ref = offline_scores[i]
            # the run's model serves it until its first re-baseline (then its own refits)
            own = np.ones(rec.rows, dtype=np.bool_)
            if ref.calibrating is not None and ref.calibrating.any():
                own[int(np.argmax(ref.calibrating)) :] = False
            for seq in range(rec.rows):
                expected.add((machine, seq))
                got = sink.verdicts.get((machine, seq))
                if not got:
                    lost_keys.append((machine, seq))
                    continue
                first = got[0]
                delivery.wrong_model += bool(own[seq]) and (
                    first.model_version != models[i].card.version
                )
                if first.status == "CALIBRATING":
                    calibrating[seq] = True
                    continue
                score[seq] = first.score
                outside[seq] = bool(first.outside_training)
                flagged[seq] = first.status == "ALERT"
            delivery.readings += rec.rows
            offline_calibrating = (
                ref.calibrating if ref.calibrating is not None else np.zeros_like(calibrating)
            )
            delivery.fitting += int(np.sum(calibrating & ~offline_calibrating))
            answered = ~np.isnan(score) & ~offline_calibrating
            delivery.flag_mismatches += int(np.sum(flagged[answered] != ref.flagged[answered]))
            if answered.any():
                gaps = np.where(answered, np.abs(score - ref.score), 0.0)
                worst = int(np.argmax(gaps))
                if gaps[worst] > delivery.max_score_diff:
                    delivery.max_score_diff = float(gaps[worst])
                    delivery.max_score_diff_at = f"{machine} {worst}"
            live.append(
                streams.run_result(
                    rec,
                    self.masks[i],
                    # the clear test uses the run's model's clear threshold (a verdict does
                    # not carry its model's): after a re-baseline the live alarm counts of
                    # that machine are approximate; the flags and scores are compared exactly
                    Scores(
                        score=np.nan_to_num(score),
                        outside=outside,
                        flagged=flagged,
                        calibrating=calibrating,
                    ),
                    models[i],
                )
            )
        delivery.lost = len(lost_keys)
        delivery.duplicates = sum(len(v) - 1 for k, v in sink.verdicts.items() if k in expected)
        delivery.unexpected = sum(len(v) for k, v in sink.verdicts.items() if k not in expected)
        versions = [m.card.version for m in models]
        return ConfigOutcome(item.config, item.offline, live, delivery, lost_keys[:20], versions)


# -- report ---------------------------------------------------------------------------------
def document(
    outcomes: Sequence[ConfigOutcome], *, command: str, source: str, live_seconds: float
) -> dict[str, Any]:
    """The JSON report: per configuration, offline and live summaries and delivery."""
    return {
        "command": command,
        "source": source,
        "live_seconds": live_seconds,
        "configs": [
            {
                "name": o.config.name,
                "config": o.config.as_dict(),
                "offline": streams.summary(o.offline),
                "live": streams.summary(o.live),
                "delivery": o.delivery.__dict__,
                "lost_examples": [list(k) for k in o.lost_keys],
            }
            for o in outcomes
        ],
    }


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown report: one row per configuration and side (offline, live)."""
    lines = [
        "# Scenario suite: offline and through the broker",
        "",
        f"Command: `{doc['command']}`  ",
        f"Data: {doc['source']}. Point-wise counts over the rows after each run's training "
        "part, summed over runs, computed by the same code (`model/streams.py`) for the "
        "offline scores and for the verdicts of real detectors behind a real Mosquitto.",
        "",
        "| configuration | side | precision | recall | F1 | FAR | MAR | events found "
        "| median delay (rows) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in doc["configs"]:
        for side in ("offline", "live"):
            s = entry[side]
            lines.append(
                f"| {entry['name']} | {side} | {_f(s['precision'])} | {_f(s['recall'])} | "
                f"{_f(s['f1'])} | {_f(s['far'], 4)} | {_f(s['mar'])} | "
                f"{s['events_detected']}/{s['events']} | {_f(s['delay_rows_median'], 1)} |"
            )
    lines += [
        "",
        "## Delivery",
        "",
        f"Every configuration's detectors ran in shared rounds: {doc['live_seconds']:.0f} s "
        "from the first detector started to the last verdict, all configurations together.",
        "",
        "| configuration | readings | verdicts | lost | duplicates | unexpected | flags differing "
        "from offline | verdicts by another model than the run's | CALIBRATING while a "
        "re-baseline's fit ran | max score difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in doc["configs"]:
        d = entry["delivery"]
        lines.append(
            f"| {entry['name']} | {d['readings']} | {d['verdicts']} | {d['lost']} | "
            f"{d['duplicates']} | {d['unexpected']} | {d['flag_mismatches']} | "
            f"{d['wrong_model']} | {d.get('fitting', 0)} | {d['max_score_diff']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict[str, Any]) -> str:
    """Write ``scenarios-live.{json,md}`` into ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_FILE).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    text = markdown(doc)
    (out / REPORT_FILE).write_text(text)
    return text


def evaluate_live(
    folder: Path,
    *,
    label_column: str,
    time_column: str | None,
    train_rows: int,
    configs: Sequence[streams.Config],
    workdir: Path,
    parallel: int = 1,
    rate: float = 2000.0,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[ConfigOutcome], float]:
    """Every configuration, offline and live, on the runs in ``folder``; live seconds."""
    recs = streams.load_labelled_runs(
        folder, label_column=label_column, time_column=time_column, progress=progress
    )
    masks = streams.train_masks(recs, train_rows=train_rows, train_until=None)
    with LiveEvaluation(
        recs, masks, workdir, parallel=parallel, rate=rate, seed=seed, progress=progress
    ) as live:
        return live.run(configs), live.live_seconds


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m factorywatch.live_evaluation FOLDER``: the live scenario report."""
    parser = argparse.ArgumentParser(
        prog="python -m factorywatch.live_evaluation", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folder", type=Path, help="labelled runs, one CSV each")
    parser.add_argument("--label-column", default="anomaly")
    parser.add_argument("--time-column", default="datetime")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--far", type=float, default=DEFAULT_SPEC.far)
    parser.add_argument("--trees", type=int, default=DEFAULT_SPEC.trees)
    parser.add_argument("--window", type=int, default=DEFAULT_SPEC.window)
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="configurations (detectors) at a time; more overloads a 2-core machine, where "
        "Mosquitto was seen to deliver a few readings of a machine out of order",
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="replay rows/s per run")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--workdir", type=Path, help="keep processes' logs here (default: temp)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "factorywatch.live_evaluation", *(argv or sys.argv[1:])])

    def progress(message: str) -> None:
        print(f"» {message}", file=sys.stderr, flush=True)

    configs = default_configs(args.far, args.trees, args.window)
    with tempfile.TemporaryDirectory(prefix="factorywatch-live-") as tmp:
        outcomes, seconds = evaluate_live(
            args.folder,
            label_column=args.label_column,
            time_column=args.time_column,
            train_rows=args.train_rows,
            configs=configs,
            workdir=args.workdir or Path(tmp),
            parallel=args.parallel,
            rate=args.rate,
            progress=progress,
        )
    doc = document(
        outcomes,
        command=command,
        source=f"{args.folder} ({len(outcomes[0].live)} runs)",
        live_seconds=seconds,
    )
    print(write(args.out, doc))
    bad = [o for o in outcomes if o.delivery.lost or o.delivery.duplicates]
    for o in bad:
        print(
            f"! {o.config.name}: {o.delivery.lost} readings without a verdict, "
            f"{o.delivery.duplicates} duplicates",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
