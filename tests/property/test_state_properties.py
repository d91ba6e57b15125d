"""Keyed state survives a snapshot: a restored tracker behaves exactly like the original."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from factorywatch.detector.alerting import AlertPolicy, AlertTracker
from factorywatch.detector.state import StateTable
from tests.property.test_alerting_properties import T0, Reading, policies, streams, verdict


def _feed(tracker: AlertTracker, stream: list[Reading], start: float) -> list[str]:
    events = []
    for i, r in enumerate(stream):
        machine = "m1" if r.seq % 3 else "m2"
        for e in tracker.observe(verdict(r, machine), start + i, 0.5, identity=str(r.seq)):
            events.append(e.encode().decode())
    return events


@settings(max_examples=150, deadline=None)
@given(policies(), streams(max_size=60), streams(max_size=60), st.booleans())
def test_restored_state_continues_identically(
    policy: AlertPolicy, before: list[Reading], after: list[Reading], ack: bool
) -> None:
    """Snapshot -> JSON -> restore mid-stream: the same later events, the same final states."""
    original = AlertTracker(policy)
    _feed(original, before, T0)
    if ack and "m1" in original.table:
        from factorywatch.contracts import AckCommand  # noqa: PLC0415

        original.acknowledge(AckCommand(machine_id="m1", by="ana"), T0 + 500)
    table = StateTable()
    table.restore(json.loads(json.dumps(original.table.snapshot())))
    restored = AlertTracker(policy, table)
    assert restored.states() == original.states()
    later = T0 + 1000
    assert _feed(restored, after, later) == _feed(original, after, later)
    assert restored.states() == original.states()
    assert restored.tick(later + 10_000) == original.tick(later + 10_000)
