"""The cluster stack's `down -v` cannot remove the main stack's volumes (history, models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support import PROJECT_DIR

MAIN = PROJECT_DIR / "docker-compose.yml"
CLUSTER = PROJECT_DIR / "docker-compose.cluster.yml"


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _volume_names(compose: dict[str, Any]) -> set[str]:
    """The engine's names of the volumes a project's `down -v` removes (external ones it keeps)."""
    project = compose["name"]
    names = set()
    for key, given in (compose.get("volumes") or {}).items():
        spec = given or {}
        if spec.get("external"):
            continue
        names.add(spec.get("name") or f"{project}_{key}")
    return names


def test_the_cluster_is_a_compose_project_of_its_own() -> None:
    """The two stacks have distinct project names, and the main file has no cluster services."""
    main, cluster = _load(MAIN), _load(CLUSTER)
    assert main["name"] != cluster["name"]
    profiles = {p for s in main["services"].values() for p in s.get("profiles", [])}
    assert "cluster" not in profiles
    assert not set(main["services"]) & {"nats-1", "cluster-detector-1", "cluster-sensors"}
    assert not any(s.get("profiles") for s in cluster["services"].values())


def test_cluster_down_v_names_none_of_the_main_stacks_volumes() -> None:
    """No volume the cluster project removes on `down -v` is one of the main stack's."""
    main, cluster = _load(MAIN), _load(CLUSTER)
    main_volumes = _volume_names(main)
    assert {"factorywatch_history", "factorywatch_models"} <= main_volumes
    assert not _volume_names(cluster) & main_volumes
    for spec in (cluster.get("volumes") or {}).values():
        assert not (spec or {}).get("external"), "the cluster borrows no volume of the main stack"


def test_docs_give_the_cluster_commands_with_its_own_file() -> None:
    """No page tells a user to run the cluster through the main file's (removed) profile."""
    pages = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").rglob("*.md"))]
    stale = [str(p) for p in pages if "--profile cluster" in p.read_text()]
    assert stale == []
    assert "docker compose -f docker-compose.cluster.yml down -v" in "".join(
        p.read_text() for p in pages
    )


def test_each_image_of_the_main_stack_is_built_by_one_service() -> None:
    """`docker compose up -d --build` builds each image once: a `build` on every service of
    a shared image (recorder, web, notify: `factorywatch-ops`) built and exported it once per
    service, each time leaving untagged copies behind; the other services only run it."""
    builders: dict[str, list[str]] = {}
    for name, service in _load(MAIN)["services"].items():
        if "build" in service:
            builders.setdefault(service["image"], []).append(name)
    assert {image: names for image, names in builders.items() if len(names) > 1} == {}
    images = {s["image"] for s in _load(MAIN)["services"].values() if "image" in s}
    local = {i for i in images if i.startswith("factorywatch")}
    assert local <= set(builders), "every factorywatch image is built by some service"


def test_a_service_running_an_image_another_builds_never_pulls_it() -> None:
    """Offline, or with Docker Hub unreachable, Compose tried to pull the images another
    service builds (sensors, web, notify) before building them, and printed an `Error ...
    registry-1.docker.io` line per service on the README's first `up -d --build`."""
    for path in (MAIN, CLUSTER):
        services = _load(path)["services"]
        built = {s["image"] for s in services.values() if "build" in s}
        pulling = [
            name
            for name, s in services.items()
            if "build" not in s and s.get("image") in built and s.get("pull_policy") != "never"
        ]
        assert pulling == [], path.name
