"""The account registry followed while the detector runs (``Runner.reload_registry``): a
machine added is scored from its first reading, a removed one is dead-lettered saying so, a
gateway's changed rights and a machine's new line apply, a broken file keeps the registry in
use. Real registry files (written as ``broker add-user`` writes them), the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorywatch.accounts import AccountRegistry, write_registry
from factorywatch.contracts import DeadLetter, TelemetryBatch
from factorywatch.detector.alerting import AlertPolicy
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.engine import Engine, EngineSettings, Outcome
from factorywatch.detector.registry import Registry, RegistryFile
from factorywatch.detector.runner import Runner, RunnerSettings
from factorywatch.detector.sparkplug import SparkplugIngest
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.sparkplug_edge import TahuEdgeNode
from tests.support import reading

TOPICS = Topics("unit-registry")
TS = 1_700_000_000.0


@pytest.fixture(scope="module")
def model(small_model_dir: Path) -> LoadedModel:
    """The test session's model."""
    return artifact.load(small_model_dir)


def start(model: LoadedModel, path: Path, accounts: AccountRegistry) -> Runner:
    """A runner following the registry file at ``path``, which holds ``accounts``."""
    write_registry(path, accounts)
    source = RegistryFile(path)
    settings = EngineSettings(
        policy=AlertPolicy(k=1, n=1, m=1),
        max_clock_skew_s=10 * 365 * 86400.0,
        registry=source.read(),
    )
    engine = Engine(model, TOPICS, settings)
    return Runner(engine, RunnerSettings(client_id="det-registry"), registry_file=source)


def send(runner: Runner, machine: str, seq: int, line: str = "line1") -> Outcome:
    """One reading of ``machine``, sent on its own topic; its outcome."""
    payload = reading(machine, seq, ts=TS, line=line).encode()
    message = Received(TOPICS.telemetry(line, machine), payload, TS, 0.0)
    (outcome,) = runner.handle([message], TS).outcomes
    return outcome


def letter(outcome: Outcome) -> DeadLetter:
    """The one dead letter an outcome published."""
    (publish,) = [p for p in outcome.publishes if "/deadletter/" in p.topic]
    return DeadLetter.model_validate_json(publish.payload)


BASE = AccountRegistry().with_machine("ma", "line1").with_gateway("gw1", ["mc", "md"], "line1")


def test_a_machine_added_while_running_is_scored_from_its_first_reading(
    model: LoadedModel, tmp_path: Path
) -> None:
    """No reload is due: the reading of a login the registry in use does not know makes the
    runner look at the file first (one stat), so the new machine gets a verdict at once."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE)
    assert [v.machine_id for v in send(runner, "ma", 1).verdicts] == ["ma"]
    refused = send(runner, "mz", 1)
    assert refused.verdicts == []
    assert letter(refused).reason == "unknown_machine"
    assert "not in the registry" in letter(refused).detail
    write_registry(path, BASE.with_machine("mz", "line1"))
    assert [v.machine_id for v in send(runner, "mz", 2).verdicts] == ["mz"]
    assert runner.counters.registry_reloads == 1
    assert runner.health(connected=True, now=0.0)[1]["registry_machines"] == 4


def test_a_removed_machine_is_dead_lettered_after_the_reload_saying_so(
    model: LoadedModel, tmp_path: Path
) -> None:
    """Removal applies at the reload (the shells' reload cadence); until then its readings
    are still scored (nothing mid-batch); its record stays."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE.with_machine("mb", "line1"))
    assert send(runner, "mb", 1).verdicts
    write_registry(path, BASE)
    assert send(runner, "mb", 2).verdicts  # a known sender: no look at the file
    assert runner.reload_registry() is True
    after = send(runner, "mb", 3)
    assert after.verdicts == []
    dead = letter(after)
    assert dead.reason == "unknown_machine"
    assert "removed from the registry" in dead.detail
    assert runner.engine.machines() == ["mb"]
    assert runner.reload_registry() is False  # unchanged file: nothing read again


def test_a_machine_re_added_is_scored_again(model: LoadedModel, tmp_path: Path) -> None:
    """Removed, then added again: no longer reported as removed, scored again."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE.with_machine("mb", "line1"))
    write_registry(path, BASE)
    assert runner.reload_registry()
    assert runner.engine.registry is not None
    assert runner.engine.registry.removed == frozenset({"mb"})
    write_registry(path, BASE.with_machine("mb", "line1"))
    assert send(runner, "mb", 1).verdicts
    assert runner.engine.registry.removed == frozenset()


def test_a_gateways_changed_rights_and_a_machines_new_line_apply(
    model: LoadedModel, tmp_path: Path
) -> None:
    """gw1 loses md and gains me; ma moves to line2: each is checked by the new rights."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE)
    changed = (
        AccountRegistry().with_machine("ma", "line2").with_gateway("gw1", ["mc", "me"], "line1")
    )
    write_registry(path, changed)
    assert runner.reload_registry()
    batch = TelemetryBatch(readings=[reading(m, 1, ts=TS) for m in ("mc", "md", "me")])
    message = Received(TOPICS.batch("line1", "gw1"), batch.encode(), TS, 0.0)
    (outcome,) = runner.handle([message], TS).outcomes
    assert sorted(v.machine_id for v in outcome.verdicts) == ["mc", "me"]
    assert [e.reason for e in outcome.rejected] == ["unknown_machine"]
    assert letter(send(runner, "ma", 1, line="line1")).reason == "unauthorized_machine"
    assert send(runner, "ma", 2, line="line2").verdicts


def test_a_broken_registry_file_keeps_the_one_in_use(model: LoadedModel, tmp_path: Path) -> None:
    """A file that does not parse (or is gone) is reported, not applied; read once per change."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    broken.replace(path)
    assert runner.reload_registry() is False
    assert runner.reload_registry() is False
    assert send(runner, "ma", 1).verdicts
    path.unlink()
    assert runner.reload_registry() is False
    assert send(runner, "ma", 2).verdicts
    write_registry(path, BASE.with_machine("mz", "line1"))
    assert runner.reload_registry() is True
    assert send(runner, "mz", 1).verdicts


def test_the_registry_is_rewritten_in_place_and_every_rewrite_is_seen(
    model: LoadedModel, tmp_path: Path
) -> None:
    """Docker Compose mounts the file itself into the detector: a rewrite keeps the inode (a
    replaced file would stay invisible there), and each rewrite moves the modification time
    forward, even one of the same size within one clock tick (ma's line1 -> line2)."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE)
    inode, size = path.stat().st_ino, path.stat().st_size
    moved = AccountRegistry().with_machine("ma", "line2").with_gateway("gw1", ["mc", "md"], "line1")
    for accounts in (moved, BASE, moved):
        before = path.stat().st_mtime_ns
        write_registry(path, accounts)
        assert (path.stat().st_ino, path.stat().st_size) == (inode, size)
        assert path.stat().st_mtime_ns > before
        assert runner.reload_registry() is True
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert send(runner, "ma", 1, line="line2").verdicts


def test_a_half_written_registry_is_read_again_once_complete(
    model: LoadedModel, tmp_path: Path
) -> None:
    """A reload that meets the file mid-rewrite (new text over the old, not yet truncated)
    keeps the registry in use; the finished rewrite is read at the next reload."""
    path = tmp_path / "registry.json"
    runner = start(model, path, BASE.with_machine("mlong-name-machine", "line1"))
    with path.open("r+") as fh:
        fh.write(BASE.with_machine("mz", "line1").model_dump_json(indent=2)[:-3])
    assert runner.reload_registry() is False  # it does not parse: the registry in use stays
    assert send(runner, "ma", 1).verdicts
    write_registry(path, BASE.with_machine("mz", "line1"))
    assert runner.reload_registry() is True
    assert send(runner, "mz", 1).verdicts


def test_an_edge_node_added_while_running_speaks_after_the_reload(
    model: LoadedModel, tmp_path: Path
) -> None:
    """The Sparkplug ingest is handed the new registry too: edge1's device, refused before,
    is scored once the reload read the file (edge nodes wait for the reload cadence)."""
    path = tmp_path / "registry.json"
    write_registry(path, BASE)
    source = RegistryFile(path)
    registry = source.read()
    ingest = SparkplugIngest(registry=registry)
    settings = EngineSettings(max_clock_skew_s=10 * 365 * 86400.0, registry=registry)
    engine = Engine(model, TOPICS, settings, extra_ingests=[ingest])
    runner = Runner(engine, RunnerSettings(client_id="det-spb"), registry_file=source)
    edge = TahuEdgeNode("plant1", "edge1", bd_seq=1)
    sim = MachineSimulator("x", "y", seed=3)

    def births() -> list[Outcome]:
        ms = int(TS * 1000)
        messages = [edge.nbirth(ms), edge.dbirth("mill", sim.next(TS), ms)]
        return runner.handle([Received(t, p, TS, 0.0) for t, p in messages], TS).outcomes

    before = births()
    assert [e.reason for o in before for e in o.rejected] == ["unauthorized_machine"] * 2
    write_registry(path, BASE.with_edge_node("edge1", "plant1", []))
    assert runner.reload_registry()
    after = births()
    assert [e.reason for o in after for e in o.rejected] == []
    assert [v.machine_id for o in after for v in o.verdicts] == ["edge1.mill"]


def test_registry_changes_say_what_changed() -> None:
    """What the `registry_reloaded` log line carries."""
    old = Registry.from_accounts(BASE.with_machine("mb", "line1"))
    new = Registry.from_accounts(
        AccountRegistry()
        .with_machine("ma", "line2")
        .with_machine("mz", "line1")
        .with_gateway("gw1", ["mc"], "line1")
    )
    assert new.changes(old) == {
        "machines": 3,
        "machines_added": ["mz"],
        "machines_removed": ["mb", "md"],
        "machines_changed": ["ma"],
        "gateways_changed": ["gw1"],
        "edge_nodes_changed": [],
    }
    assert new.succeeding(old).removed == frozenset({"mb", "md"})
    assert new.succeeding(None) is new
