"""The layers contract covers every module: import-linter checks only the modules it lists."""

from __future__ import annotations

import tomllib

import grimp

from tests.support import PROJECT_DIR


def _layer_modules() -> set[str]:
    config = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return {name.strip() for layer in contract["layers"] for name in layer.split(":")}


def test_every_module_is_assigned_a_layer() -> None:
    """A new module under factorywatch/ or bench/ must be given a layer in pyproject.toml."""
    assigned = _layer_modules()
    graph = grimp.build_graph("factorywatch", "bench", cache_dir=None)
    # the roots, and detector/ whose modules span two layers: their __init__ must stay bare
    roots = {"factorywatch", "bench", "factorywatch.detector"}
    unassigned = sorted(
        module
        for module in graph.modules
        if module not in roots
        and not any(module == a or module.startswith(f"{a}.") for a in assigned)
    )
    assert unassigned == [], f"give these a layer in [tool.importlinter]: {unassigned}"


def test_package_inits_outside_the_layers_import_nothing() -> None:
    """The packages the layers do not list (the roots, detector/) import nothing of ours."""
    graph = grimp.build_graph("factorywatch", "bench", cache_dir=None)
    for package in ("factorywatch", "bench", "factorywatch.detector"):
        assert graph.find_modules_directly_imported_by(package) == set(), package
