"""Topic layout: building, parsing and the subscription filters, checked with paho's matcher."""

from __future__ import annotations

import pytest
from paho.mqtt.client import topic_matches_sub

from factorywatch.errors import PayloadError
from factorywatch.topics import DEFAULT_ROOT, UNKNOWN, Topics, check_id

IDS = [("line1", "mill-01"), ("L", "m"), ("line_2.a", "M.9-x_y"), ("a" * 64, "9" * 64)]


@pytest.mark.parametrize("root", [DEFAULT_ROOT, "plant-7", "acme/site1/hall_b"])
@pytest.mark.parametrize(("line", "machine"), IDS)
def test_telemetry_build_parse_round_trip(root: str, line: str, machine: str) -> None:
    """Parsing a built telemetry topic returns the same line and machine id."""
    topics = Topics(root)
    topic = topics.telemetry(line, machine)
    assert topic == f"{root}/telemetry/{line}/{machine}"
    assert topics.parse_telemetry(topic) == (line, machine)


@pytest.mark.parametrize(
    "topic",
    [
        "other/telemetry/line1/m1",  # foreign root
        "factoryX/telemetry/line1/m1",  # root is only a string prefix
        "/factory/telemetry/line1/m1",  # leading slash
        "factory/telemetryX/line1/m1",
        "factory/alerts/line1/m1",  # another tree
        "factory/alerts/line1/m1/verdict",
        "factory/deadletter/line1/m1",
        "factory/telemetry/line1",  # too short
        "factory/telemetry",
        "factory/telemetry/",
        "factory",
        "",
        "factory/telemetry/line1/m1/extra",  # too long
        "factory/telemetry/line1/m1/",
        "factory/telemetry//m1",  # empty level
        "factory/telemetry/line1/",
        "factory/telemetry/+/m1",  # wildcards
        "factory/telemetry/line1/+",
        "factory/telemetry/+/+",
        "factory/telemetry/line1/#",
        "factory/telemetry/#",
        "factory/telemetry/line1/-m1",  # invalid id
        "factory/telemetry/line 1/m1",
        "factory/telemetry/line1/" + "m" * 65,
    ],
)
def test_parse_rejects_non_telemetry_topics(topic: str) -> None:
    """Anything but ``<root>/telemetry/<line>/<machine>`` raises PayloadError(bad_topic)."""
    with pytest.raises(PayloadError) as info:
        Topics().parse_telemetry(topic)
    assert info.value.reason == "bad_topic"


def test_parse_with_multi_level_root_rejects_partial_root() -> None:
    """With root ``a/b`` a topic under only ``a`` is not a telemetry topic."""
    topics = Topics("a/b")
    assert topics.parse_telemetry("a/b/telemetry/l/m") == ("l", "m")
    with pytest.raises(PayloadError):
        topics.parse_telemetry("a/telemetry/l/m")


def test_parse_rejects_trailing_newline_in_machine_id() -> None:
    """A machine level with a trailing newline is not a valid identifier."""
    with pytest.raises(PayloadError):
        Topics().parse_telemetry("factory/telemetry/line1/m1\n")


def test_check_id_rejects_trailing_newline() -> None:
    """check_id refuses an identifier with a trailing newline (pydantic's pattern does)."""
    with pytest.raises(ValueError, match="invalid"):
        check_id("m1\n", "machine id")


@pytest.mark.parametrize(
    "root", ["", "/", "/factory", "factory/", "a//b", "+", "#", "a/+", "a/#", "a+", "b#c", "+/x"]
)
def test_invalid_roots_are_rejected(root: str) -> None:
    """Empty levels and wildcard characters are refused in the topic root."""
    with pytest.raises(ValueError, match="invalid topic root"):
        Topics(root)


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "+", "#", "-a", "_a", ".a", "a b", "mühle", "x" * 65]
)
def test_builders_reject_invalid_ids(bad: str) -> None:
    """Telemetry and status topics cannot be built from ids that are not one clean level."""
    topics = Topics()
    with pytest.raises(ValueError, match="invalid"):
        topics.telemetry("line1", bad)
    with pytest.raises(ValueError, match="invalid"):
        topics.telemetry(bad, "m1")
    with pytest.raises(ValueError, match="invalid"):
        topics.status("detector", bad)
    with pytest.raises(ValueError, match="invalid"):
        check_id(bad)


@pytest.mark.parametrize("root", [DEFAULT_ROOT, "acme/site1"])
@pytest.mark.parametrize(("line", "machine"), IDS)
def test_alerts_filter_covers_verdict_topics(root: str, line: str, machine: str) -> None:
    """Every verdict topic matches the alerts filter, and nothing from other trees does."""
    topics = Topics(root)
    assert topic_matches_sub(topics.alerts_filter, topics.verdict(line, machine))
    assert not topic_matches_sub(topics.alerts_filter, topics.telemetry(line, machine))
    assert not topic_matches_sub(topics.alerts_filter, topics.deadletter(line, machine))
    assert not topic_matches_sub(topics.alerts_filter, topics.status("detector", machine))
    assert not topic_matches_sub(topics.alerts_filter, Topics(f"{root}x").verdict(line, machine))


@pytest.mark.parametrize(("line", "machine"), IDS)
def test_telemetry_filter_covers_exactly_telemetry_topics(line: str, machine: str) -> None:
    """The telemetry filter matches every telemetry topic but no verdict or dead letter."""
    topics = Topics()
    assert topic_matches_sub(topics.telemetry_filter, topics.telemetry(line, machine))
    assert not topic_matches_sub(topics.telemetry_filter, topics.verdict(line, machine))
    assert not topic_matches_sub(topics.telemetry_filter, topics.deadletter(line, machine))
    assert not topic_matches_sub(topics.telemetry_filter, f"{DEFAULT_ROOT}/telemetry/{line}")


def test_deadletter_filter_covers_known_and_unknown_machines() -> None:
    """Dead letters of parsed and of unparseable topics both match the dead-letter filter."""
    topics = Topics()
    assert topics.deadletter() == f"{DEFAULT_ROOT}/deadletter/{UNKNOWN}/{UNKNOWN}"
    for topic in (topics.deadletter(), topics.deadletter("line1", "m1")):
        assert topic_matches_sub(topics.deadletter_filter, topic)
        assert not topic_matches_sub(topics.alerts_filter, topic)
        assert not topic_matches_sub(topics.telemetry_filter, topic)


def test_status_topic_layout() -> None:
    """Status topics live under ``<root>/status/<role>/<client>``."""
    assert Topics("r").status("detector", "det-1") == "r/status/detector/det-1"


def test_verdict_topic_layout() -> None:
    """Verdict topics live under ``<root>/alerts/<line>/<machine>/verdict``."""
    assert Topics("r").verdict("line1", "m1") == "r/alerts/line1/m1/verdict"
