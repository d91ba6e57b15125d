"""The README is a landing page whose commands work as printed, in the order printed."""

from __future__ import annotations

import re

from tests.support import PROJECT_DIR

README = (PROJECT_DIR / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match is not None, f"no section {title!r}"
    return match.group(1)


def test_the_readme_is_a_landing_page_with_the_two_commands() -> None:
    """At most 200 lines, and `make demo` / `make test` are its first commands."""
    assert len(README.splitlines()) <= 200
    commands = re.findall(r"^make \w+", _section("The two commands"), re.M)
    assert commands[:2] == ["make demo", "make test"]


def test_docker_starts_with_the_step_that_provides_engine_and_compose() -> None:
    """`make docker-prepare` comes before the first `docker compose` line of the Docker section."""
    docker = _section("With Docker")
    assert "make docker-prepare" in docker
    assert docker.index("make docker-prepare") < docker.index("docker compose ")
    assert "--profile cluster" not in README


def test_every_docs_link_of_the_readme_names_an_existing_page() -> None:
    """The README's links into docs/ point at files that exist (the site checks its own)."""
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links
    missing = [link for link in links if not (PROJECT_DIR / link).is_file()]
    assert missing == []


def docker_commands() -> list[str]:
    """The commands of the first bash block of "With Docker", continuations joined."""
    block = re.search(r"```bash\n(.*?)```", _section("With Docker"), re.S)
    assert block is not None
    joined = re.sub(r" *\\\n +", " ", block.group(1))
    return [re.sub(r"\s+# .*$", "", line).rstrip() for line in joined.splitlines() if line]


def test_the_added_machine_is_seen_scored() -> None:
    """After `add-user weld-4` the Docker block sends weld-4's readings with an end (--count),
    so its verdicts show and the command returns, instead of a machine nobody hears from."""
    commands = docker_commands()
    added = next(i for i, c in enumerate(commands) if "add-user weld-4" in c)
    sensor = commands[added + 1]
    assert sensor.startswith(".venv/bin/factorywatch sensor --machine-id weld-4 ")
    assert "--count " in sensor
    assert "--tls-ca secrets/certs/ca.crt" in sensor
