"""Account registry (who may speak for which machine), decoder identity and clock checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from factorywatch.accounts import AccountRegistry, RegistryError, read_registry, registry_path
from factorywatch.broker import BASE_ACL, acl_with_accounts
from factorywatch.contracts import AI4I_CHANNELS, DEFAULT_MAX_FUTURE_SKEW_S
from factorywatch.credentials import add_user, init_secrets, register, remove_user
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.detector.registry import Registry
from factorywatch.errors import PayloadError
from factorywatch.topics import Topics

NOW = 1.7e9
TOPICS = Topics()


def accounts() -> AccountRegistry:
    """Machines ma, mb (own accounts) on line1; gateway gw1 for mc, md (no accounts)."""
    return (
        AccountRegistry()
        .with_machine("ma", "line1")
        .with_machine("mb", "line1")
        .with_gateway("gw1", ["mc", "md"], "line1")
    )


def reading(machine: str, line: str = "line1", seq: int = 1, ts: float = NOW) -> dict[str, Any]:
    """A valid reading of ``machine``."""
    return {
        "machine_id": machine,
        "line": line,
        "seq": seq,
        "ts": ts,
        "product_type": "L",
        "readings": dict.fromkeys(AI4I_CHANNELS, 300.0),
    }


def decoder(registry: Registry | None = None, **kwargs: Any) -> Decoder:
    """A decoder with a fixed clock (default limits unless given)."""
    return Decoder(
        TOPICS,
        channels=AI4I_CHANNELS,
        max_clock_skew_s=7 * 86400.0,
        registry=registry,
        **kwargs,
    )


def received(topic: str, payload: Any) -> Received:
    """A message as the shell hands it over."""
    return Received(topic, json.dumps(payload).encode(), NOW, 0.0)


@pytest.mark.parametrize(
    ("sender", "machine", "line", "expected"),
    [
        ("ma", "ma", "line1", None),  # a machine for itself
        ("gw1", "mc", "line1", None),  # a gateway for its machine
        ("ma", "mb", "line1", "unauthorized_machine"),  # a machine for another
        ("gw1", "ma", "line1", "unauthorized_machine"),  # a gateway for a machine not its
        ("mc", "mc", "line1", "unauthorized_machine"),  # gateway-only machine has no account
        ("gw1", "invented-7", "line1", "unknown_machine"),  # an invented machine
        ("ma", "ma", "line9", "unauthorized_machine"),  # an invented line
    ],
)
def test_registry_check(sender: str, machine: str, line: str, expected: str | None) -> None:
    """A machine speaks only for itself, a gateway only for its machines, on their lines."""
    registry = Registry.from_accounts(accounts())
    assert registry.check(sender, machine, line) == expected


def test_batch_with_another_machines_reading_is_unauthorized() -> None:
    """Finding 1: a batch carrying readings of machines not bound to its gateway, or invented
    machines, has those readings refused one by one; its own machine's reading passes."""
    dec = decoder(Registry.from_accounts(accounts()))
    batch = {"readings": [reading("mc"), reading("ma"), reading("ghost-1"), reading("md")]}
    out = dec.decode_batch(received(TOPICS.batch("line1", "gw1"), batch))
    reasons = [o.reason if isinstance(o, PayloadError) else o.machine_id for o in out]
    assert reasons == ["mc", "unauthorized_machine", "unknown_machine", "md"]


def test_telemetry_of_unregistered_machine_is_unknown() -> None:
    """A machine missing from the registry cannot create state through its own topic."""
    dec = decoder(Registry.from_accounts(accounts()))
    with pytest.raises(PayloadError) as caught:
        dec.decode(received(TOPICS.telemetry("line1", "zz"), reading("zz")))
    assert caught.value.reason == "unknown_machine"
    assert dec.decode(received(TOPICS.telemetry("line1", "ma"), reading("ma"))).machine_id == "ma"


def test_future_skew_default_is_minutes_not_days() -> None:
    """Finding 6: a reading 10 minutes ahead is clock_skew; 4 minutes ahead is accepted."""
    dec = decoder()
    topic = TOPICS.telemetry("line1", "ma")
    assert DEFAULT_MAX_FUTURE_SKEW_S == 300.0
    with pytest.raises(PayloadError) as caught:
        dec.decode(received(topic, reading("ma", ts=NOW + 600)))
    assert caught.value.reason == "clock_skew"
    assert dec.decode(received(topic, reading("ma", ts=NOW + 240))).ts == NOW + 240
    # The past keeps its own (longer) limit: buffered readings from a day ago still count.
    assert dec.decode(received(topic, reading("ma", ts=NOW - 86400))).ts == NOW - 86400


def test_future_skew_is_configurable() -> None:
    """max_future_skew_s moves the future limit independently of the past one."""
    dec = decoder(max_future_skew_s=3600.0)
    topic = TOPICS.telemetry("line1", "ma")
    assert dec.decode(received(topic, reading("ma", ts=NOW + 600))).ts == NOW + 600


@pytest.mark.parametrize("batch", [False, True])
def test_millisecond_timestamps_are_clock_skew(batch: bool) -> None:
    """Finding 6: a timestamp in milliseconds is dead-lettered clock_skew (as documented)."""
    dec = decoder()
    ms = reading("ma", ts=NOW * 1000)
    if batch:
        (out,) = dec.decode_batch(received(TOPICS.batch("line1", "gw1"), {"readings": [ms]}))
        assert isinstance(out, PayloadError)
        assert out.reason == "clock_skew"
    else:
        with pytest.raises(PayloadError) as caught:
            dec.decode(received(TOPICS.telemetry("line1", "ma"), ms))
        assert caught.value.reason == "clock_skew"


def test_registry_roles_cannot_collide() -> None:
    """An id is one thing: a machine cannot become a gateway, nor a service user a machine."""
    reg = accounts()
    with pytest.raises(RegistryError):
        reg.with_gateway("ma", ["mb"], "line1")
    with pytest.raises(RegistryError):
        reg.with_machine("gw1", "line1")
    with pytest.raises(RegistryError):
        reg.with_machine("viewer", "line1")
    with pytest.raises(RegistryError):
        reg.with_gateway("gw2", [], "line1")


def test_removing_a_gateway_forgets_machines_only_it_spoke_for() -> None:
    """Machines reached only through a removed gateway leave the registry; others stay."""
    reg = accounts().with_gateway("gw2", ["ma", "md"], "line1").without("gw1")
    assert set(reg.machines) == {"ma", "mb", "md"}
    assert reg.without("gw2").machines.keys() == {"ma", "mb"}


def test_acl_grants_gateways_only_their_batch_topics() -> None:
    """The generated ACL has one block per gateway (its lines) and per detector shard; the
    base no longer lets every user publish batches."""
    reg = accounts().with_machine("me", "line2").with_gateway("gw2", ["me"], "line2")
    acl = acl_with_accounts(BASE_ACL.read_text(), reg.with_detector("detector-line2"))
    assert "pattern write factory/batch" not in acl
    assert "pattern write factory/telemetry" not in acl, "a pattern would cover every account"
    gw1 = acl.split("user gw1\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "topic write factory/batch/line1/gw1" in gw1
    assert "topic write factory/telemetry/+/gw1" in gw1
    assert "topic write factory/batch/line2/gw2" in acl.split("user gw2\n", 1)[1]
    me = acl.split("user me\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "topic write factory/telemetry/+/me" in me
    assert "topic read factory/alerts/+/me/verdict" in me
    assert not any(ln.startswith("topic write factory/batch") for ln in me)
    assert "user detector-line2\ntopic read factory/telemetry/#" in acl
    shard = acl.split("user detector-line2\n", 1)[1].split("\n\n", 1)[0].splitlines()
    detector = [ln for ln in BASE_ACL.read_text().splitlines() if ln.startswith("topic ")]
    assert "topic read spBv1.0/#" in shard, "every detector block is copied"
    assert set(shard) <= set(detector)


def test_secrets_dir_round_trip(tmp_path: Path) -> None:
    """init writes a registry the detector reads; add/remove keep it in step with passwd."""
    secrets = tmp_path / "s"
    init_secrets(secrets, ("ma", "mb"), line="line3")
    register(secrets, "gw1", "gateway", line="line3", machines=("mc",))
    add_user(secrets, "gw1")
    registry = Registry.load(registry_path(secrets))
    assert registry.check("gw1", "mc", "line3") is None
    assert registry.check("ma", "ma", "line3") is None
    assert "user gw1" in (secrets / "acl").read_text()
    remove_user(secrets, "gw1")
    assert "gw1" not in read_registry(registry_path(secrets)).gateways
    assert "gw1:" not in (secrets / "passwd").read_text()
    with pytest.raises(RegistryError, match="no user 'nosuch'"):
        remove_user(secrets, "nosuch")


def test_missing_registry_is_a_clear_error(tmp_path: Path) -> None:
    """Loading a registry that does not exist names the remedy."""
    with pytest.raises(RegistryError, match="broker init"):
        Registry.load(tmp_path / "registry.json")


def test_a_detectors_client_id_is_its_login() -> None:
    """Logged in, the detector is known by its login (the broker's client id for it), whatever
    --client-id says; anonymous (open broker), the configured id stays."""
    from factorywatch.cli import _detector_identity  # noqa: PLC0415
    from factorywatch.settings import BrokerSettings, DetectorSettings  # noqa: PLC0415

    given = DetectorSettings(client_id="someone-else")
    assert _detector_identity(given, BrokerSettings(username="detector-l2")).client_id == (
        "detector-l2"
    )
    assert _detector_identity(given, BrokerSettings()).client_id == "someone-else"


def test_components_get_accounts_of_their_own(tmp_path: Path) -> None:
    """init creates history, web, web-commands and notify with their roles' ACL blocks, since
    a login is a client id and two processes cannot share one."""
    secrets = tmp_path / "s"
    init_secrets(secrets, ("ma",))
    registry = read_registry(registry_path(secrets))
    assert registry.services == {
        "history": "monitor",
        "web": "monitor",
        "web-commands": "operator",
        "notify": "viewer",
    }
    acl = (secrets / "acl").read_text()
    assert "user web-commands\ntopic read factory/alerts/#" in acl
    assert "topic write factory/commands/#" in acl.split("user web-commands", 1)[1]
    register(secrets, "alice", "viewer")
    assert read_registry(registry_path(secrets)).role_of("alice") == "viewer"
    with pytest.raises(RegistryError):
        register(secrets, "history", "machine")


def test_locate_finds_the_registry_a_detector_should_use(tmp_path: Path) -> None:
    """An explicit file wins (and must exist); else the secrets dir's; none for open brokers."""
    secrets = tmp_path / "s"
    init_secrets(secrets, ("ma",))
    assert Registry.locate(None, None) is None
    assert Registry.locate(None, tmp_path / "empty") is None
    found = Registry.locate(None, secrets)
    assert found is not None
    assert found.check("ma", "ma", "line1") is None
    with pytest.raises(RegistryError):
        Registry.locate(tmp_path / "missing.json", secrets)
