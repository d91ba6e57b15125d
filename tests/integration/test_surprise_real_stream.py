"""The surprise rule on a real stream we did not record: a NAB server metric (CPU
utilisation of an AWS EC2 instance, labelled by NAB) whose anomalies are spikes a bounded
score with a threshold set on training's tail never flags. Fitted as ``evaluate --nab`` does
(on NAB's probationary period), scored offline and by the detector's engine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import FeedbackCommand, Telemetry, Verdict
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine, EngineSettings
from factorywatch.model import artifact, nab, streams
from factorywatch.model.fitspec import FitSpec
from factorywatch.model.generic import Trained, fit_recording, score_recording
from factorywatch.model.nab import NabFile
from factorywatch.topics import Topics
from tests.support import nab_stream

FILE = "realAWSCloudwatch/ec2_cpu_utilization_fe7f93.csv"
TOPICS = Topics("surprisenab")
NOW = time.time()


@pytest.fixture(scope="module")
def stream() -> NabFile:
    """The NAB file (fails loudly when the corpus is missing)."""
    return nab_stream(FILE)


def _fit(stream: NabFile, **changes: object) -> Trained:
    rec = stream.recording
    return fit_recording(rec, streams.nab_mask(rec.rows), FitSpec().replace(**changes))


def test_the_rule_finds_labelled_spikes_the_threshold_alone_misses(stream: NabFile) -> None:
    """With the defaults an alarm is raised inside a labelled window, by readings whose score
    stays at or below the threshold; without the rule no alarm is raised there at all."""
    rec = stream.recording
    start = nab.probation_rows(rec.rows)

    def found(model: Trained) -> list[int]:
        scores = score_recording(model, rec.columns)
        clear = scores.score <= (model.card.clear_threshold or np.inf)
        raised = streams.alarms(scores.flagged, clear=clear)
        return [r for r in raised if r >= start and any(a <= r <= b for a, b in stream.windows)]

    default = _fit(stream)
    hits = found(default)
    assert hits, "the default raised no alarm inside a labelled window"
    scores = score_recording(default, rec.columns)
    assert scores.surprise is not None
    assert any(scores.surprise[r] and scores.score[r] <= default.card.threshold for r in hits)
    assert found(_fit(stream, surprise=None)) == []


def test_the_engine_carries_the_surprise_as_evaluate_scores_it(
    stream: NabFile, tmp_path: Path
) -> None:
    """The detector's engine, restored from a snapshot half-way, gives every reading the
    status ``score_recording`` gives it, and a ``surprise`` exactly where the rule fired."""
    trained = _fit(stream)
    artifact.save_generic(tmp_path, trained.scorer, trained.card)
    model = artifact.load(tmp_path, trained.card.version)
    values = stream.recording.columns["value"]
    offline = score_recording(trained, stream.recording.columns)
    messages = []
    for i, value in enumerate(values.tolist()):
        reading = Telemetry(
            machine_id="ec2-1", line="aws", seq=i, ts=NOW, readings={"value": value}
        )
        messages.append(Received(TOPICS.telemetry("aws", "ec2-1"), reading.encode(), NOW, 0.0, i))
    half = len(messages) // 2
    first = Engine(model, TOPICS, EngineSettings(explain_top_k=0))
    got: list[Verdict] = []
    for at in range(0, half, 250):
        got += [
            v for o in first.handle(messages[at : min(at + 250, half)], NOW) for v in o.verdicts
        ]
    restored = Engine(model, TOPICS, EngineSettings(explain_top_k=0))
    restored.restore(first.snapshot())
    for at in range(half, len(messages), 250):
        got += [v for o in restored.handle(messages[at : at + 250], NOW) for v in o.verdicts]
    assert [v.seq for v in got] == list(range(len(values)))
    assert [v.status == "ALERT" for v in got] == offline.flagged.tolist()
    assert offline.surprise is not None
    assert offline.surprise.any()
    assert [v.surprise is not None for v in got] == offline.surprise.tolist()
    assert all(v.surprise > 3.0 for v in got if v.surprise is not None)


def test_a_false_alarm_label_quietens_one_machines_surprise_rule(
    stream: NabFile, tmp_path: Path
) -> None:
    """Two machines send the same stream; the first alert of one is labelled a false alarm.
    From then on that machine's surprise verdicts all lie above its raised cut (the card's
    plus a decade) and are fewer than the other machine's, which keeps the card's cut."""
    trained = _fit(stream)
    artifact.save_generic(tmp_path, trained.scorer, trained.card)
    model = artifact.load(tmp_path, trained.card.version)
    rule = trained.card.pipeline.surprise if trained.card.pipeline else None
    assert rule is not None
    values = stream.recording.columns["value"].tolist()

    def message(machine: str, seq: int) -> Received:
        reading = Telemetry(
            machine_id=machine, line="aws", seq=seq, ts=NOW, readings={"value": values[seq]}
        )
        return Received(TOPICS.telemetry("aws", machine), reading.encode(), NOW, 0.0, seq)

    engine = Engine(model, TOPICS, EngineSettings(explain_top_k=0))
    engine.handle([message(m, 0) for m in ("ec2-1", "ec2-2")], NOW)
    seq = 1
    while engine.record("ec2-1").alert_id is None:
        engine.handle([message(m, seq) for m in ("ec2-1", "ec2-2")], NOW)
        seq += 1
    alert_id = engine.record("ec2-1").alert_id
    assert alert_id is not None
    label = FeedbackCommand(
        machine_id="ec2-1", alert_id=alert_id, label="false_alarm", by="ann", at=NOW
    )
    topic = f"{TOPICS.root}/commands/aws/ec2-1/feedback"
    engine.handle([Received(topic, label.encode(), NOW, 0.0, 10**6)], NOW)
    later: list[Verdict] = []
    for start in range(seq, len(values), 200):
        batch = [message(m, s) for s in range(start, min(start + 200, len(values)))
                 for m in ("ec2-1", "ec2-2")]  # fmt: skip
        later += [v for o in engine.handle(batch, NOW) for v in o.verdicts]
    quiet = [v.surprise for v in later if v.machine_id == "ec2-1" and v.surprise is not None]
    loud = [v.surprise for v in later if v.machine_id == "ec2-2" and v.surprise is not None]
    assert all(s > rule.threshold + 1.0 for s in quiet)
    assert any(s <= rule.threshold + 1.0 for s in loud)
    assert len(quiet) < len(loud)
