"""The cluster's pure parts: partition hash, subject mapping, config rendering, assignment."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorywatch.cluster import NodePorts, cluster_users, generate_passwords, render_node_config
from factorywatch.partitions import ClusterLayout, assign, partition_of, partitions_arg


def test_partition_hash_matches_what_nats_server_computed() -> None:
    """FNV-1a mod n gives the partitions nats-server 2.9.10 filed m1, m2, m3 under (n=4)."""
    assert [partition_of(m, 4) for m in ("m1", "m2", "m3")] == [3, 2, 1]


def test_unpartition_recovers_the_mqtt_topic_from_a_stored_subject() -> None:
    """`$MQTT.msgs.fwpart.<p>.<root>...` reads back as (p, the device's topic)."""
    layout = ClusterLayout("site/factory", partitions=8)
    subject = "$MQTT.msgs.fwpart.5.site.factory.telemetry.line1.m7"
    assert layout.unpartition(subject) == (5, "site/factory/telemetry/line1/m7")
    with pytest.raises(ValueError, match="not a partitioned subject"):
        layout.unpartition("site.factory.telemetry.line1.m7")


def test_every_partition_has_exactly_one_owner() -> None:
    """Round-robin assignment covers each partition once for 1..partitions detectors."""
    for detectors in range(1, 7):
        owned = [p for i in range(detectors) for p in assign(6, detectors, i)]
        assert sorted(owned) == list(range(6))


def test_partitions_argument_is_checked() -> None:
    """`--partitions` takes `all` or integers in range; anything else is a clear error."""
    assert partitions_arg("all", 4) == [0, 1, 2, 3]
    assert partitions_arg("3,1,1", 4) == [1, 3]
    for bad in ("4", "x", ""):
        with pytest.raises(ValueError, match="--partitions"):
            partitions_arg(bad, 4)


def test_layout_refuses_dots_in_the_topic_root() -> None:
    """A `.` would become a subject separator: refused up front."""
    with pytest.raises(ValueError, match=r"no '\.'"):
        ClusterLayout("fac.tory")


def test_node_config_has_jetstream_routes_mqtt_mappings_and_per_machine_permissions() -> None:
    """A node's config names its peers' routes (not itself), R3 MQTT streams, the partition
    mapping of every machine-keyed subject, and a machine user allowed only its own subject."""
    layout = ClusterLayout("factory", partitions=6)
    users = cluster_users(layout, generate_passwords(["m1"]), ["m1"])
    text = render_node_config(
        name="n1",
        cluster_name="fw",
        ports=NodePorts(4222, 6222, 1883, 8222),
        routes=["nats-route://127.0.0.1:6223", "nats-route://127.0.0.1:6224"],
        store_dir=Path("js-store"),
        layouts=[layout],
        users=users,
    )
    assert "nats-route://127.0.0.1:6223" in text
    assert "6222" not in text.split("cluster {")[1].split("routes")[1].split("\n")[0]
    assert "stream_replicas: 3" in text
    assert '"factory.telemetry.*.*": "fwpart.{{partition(6,2)}}.factory.telemetry.' in text
    assert '"factory.status.sensor.*": "fwpart.{{partition(6,1)}}' in text
    own = f"fwpart.{partition_of('m1', 6)}.factory.telemetry.*.m1"
    machine = next(u for u in users if u.name == "m1")
    assert machine.publish[0] == own
    assert machine.connection_types == ("MQTT",)


def test_route_tls_is_rendered_inside_the_cluster_block_with_verification() -> None:
    """`route_tls` puts a verifying tls block among the routes; without it routes are plain."""
    from factorywatch.cluster import TlsFiles  # noqa: PLC0415

    files = TlsFiles(Path("/c/ca.crt"), Path("/c/server.crt"), Path("/c/server.key"))
    common = {
        "name": "n1",
        "cluster_name": "fw",
        "ports": NodePorts(4222, 6222, 1883, 8222),
        "routes": ["nats-route://n2:6222"],
        "store_dir": Path("/data"),
        "layouts": [ClusterLayout()],
    }
    plain = render_node_config(**common)  # type: ignore[arg-type]
    secured = render_node_config(**common, route_tls=files)  # type: ignore[arg-type]
    assert "verify: true" not in plain
    cluster_block = secured.split("cluster {", 1)[1].split("}\n", 1)[0]
    assert 'ca_file: "/c/ca.crt"' in cluster_block
    assert "verify: true" in cluster_block


def test_nats_mqtt_endpoints_are_parsed_or_refused_clearly() -> None:
    """`--nats-mqtt` takes host:port pairs; anything else is a clear error."""
    from factorywatch.detector.retained import parse_endpoints  # noqa: PLC0415

    assert parse_endpoints("n1:1883, n2:1884") == [("n1", 1883), ("n2", 1884)]
    for bad in ("n1", "n1:x", ":1883", "n1:0", ","):
        with pytest.raises(ValueError, match="--nats-mqtt"):
            parse_endpoints(bad)


def test_detector_user_may_write_leases_and_connect_over_mqtt() -> None:
    """The detector's NATS user can take partition leases and publish retained state (MQTT)."""
    layout = ClusterLayout("factory", partitions=2)
    users = {u.name: u for u in cluster_users(layout, generate_passwords(["m1"]), ["m1"])}
    detector = users["detector"]
    assert f"$KV.{layout.lease_bucket}.>" in detector.publish
    assert "MQTT" in detector.connection_types
    assert "factory.alerts.>" in detector.publish
