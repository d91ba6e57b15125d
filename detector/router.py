"""Which model scores a machine: its own, its group's, a live calibration, or the default (pure).

Resolution, first match wins (``Router.route``):

1. the machine's own model (``models/machines/<machine>/current``, trained with
   ``factorywatch train --machine M`` or fitted by a live calibration window);
2. ``calibrate`` in the asset config selects the machine (by id pattern, by group, or
   ``default: true``): it has no model yet, so its readings fill a calibration window;
3. the first group in config order that holds the machine and has a model
   (``models/groups/<group>/current``, ``train --group G``);
4. the global default (``models/current``).

Calibration ranks above a group's model because naming a machine for calibration asks for a
model of its own; once fitted, that model is rule 1. The shell (``detector/mosquitto_shell.py``)
loads the artifacts and binds them here; routes are cached per (machine, line) and the cache
is dropped whenever a binding changes (between batches, never within one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final, Literal

from factorywatch.model.artifact import LoadedModel
from factorywatch.model.asset import CalibrateSpec, GroupSpec

RouteKind = Literal["machine", "group", "calibrate", "default"]
DEFAULT_KEY: Final = "default"
CALIBRATE_KEY: Final = "calibrate"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a machine's readings go: ``model`` None means its calibration window."""

    key: str  # "default", "machine:<id>", "group:<name>", "calibrate"
    kind: RouteKind
    model: LoadedModel | None


def route_key(kind: RouteKind, name: str = "") -> str:
    """The key a route's drift window and model binding are known by."""
    return kind if kind in (DEFAULT_KEY, CALIBRATE_KEY) else f"{kind}:{name}"


class Router:
    """Maps machines to the models that score them (see the module docstring)."""

    def __init__(
        self,
        default: LoadedModel,
        groups: dict[str, GroupSpec] | None = None,
        calibrate: CalibrateSpec | None = None,
        channels: Sequence[str] = (),
    ) -> None:
        self.groups = dict(groups or {})
        self.calibrate = calibrate
        #: the channels a calibration window fits on (empty: those of a machine's 1st reading)
        self.channels = tuple(channels)
        self.machine_models: dict[str, LoadedModel] = {}
        self.group_models: dict[str, LoadedModel] = {}
        self._default = Route(DEFAULT_KEY, "default", default)
        self._cache: dict[tuple[str, str], Route] = {}

    @property
    def default(self) -> LoadedModel:
        """The global default model."""
        model = self._default.model
        assert model is not None
        return model

    @property
    def trivial(self) -> bool:
        """Every machine routes to the default model (the engine's fast path)."""
        return not (self.machine_models or self.group_models or self.calibrate)

    def route(self, machine: str, line: str) -> Route:
        """The route of ``machine`` on ``line`` (cached until a binding changes)."""
        cached = self._cache.get((machine, line))
        if cached is None:
            cached = self._cache[(machine, line)] = self._resolve(machine, line)
        return cached

    def group_of(self, machine: str, line: str) -> str | None:
        """The first group in config order that holds the machine, if any."""
        return next((g for g, spec in self.groups.items() if spec.matches(machine, line)), None)

    def calibrates(self, machine: str, line: str) -> bool:
        """Whether the calibrate config selects this machine."""
        spec = self.calibrate
        if spec is None:
            return False
        if spec.default or any(fnmatchcase(machine, p) for p in spec.machines):
            return True
        return any(self.groups[g].matches(machine, line) for g in spec.groups if g in self.groups)

    def _resolve(self, machine: str, line: str) -> Route:
        own = self.machine_models.get(machine)
        if own is not None:
            return Route(route_key("machine", machine), "machine", own)
        if self.calibrates(machine, line):
            return Route(CALIBRATE_KEY, "calibrate", None)
        for group, spec in self.groups.items():
            model = self.group_models.get(group)
            if model is not None and spec.matches(machine, line):
                return Route(route_key("group", group), "group", model)
        return self._default

    # -- bindings (the shell's, between batches) ---------------------------------------------
    def set_default(self, model: LoadedModel) -> None:
        """Serve ``model`` to every machine without a model of its own or of its group."""
        self._default = Route(DEFAULT_KEY, "default", model)
        self._cache.clear()

    def bind_machine(self, machine: str, model: LoadedModel) -> None:
        """Serve ``model`` to ``machine`` from now on."""
        self.machine_models[machine] = model
        self._cache.clear()

    def bind_group(self, group: str, model: LoadedModel) -> None:
        """Serve ``model`` to the machines of ``group`` (those without their own)."""
        if group not in self.groups:
            raise KeyError(f"group {group!r} is not defined in the asset config")
        self.group_models[group] = model
        self._cache.clear()

    def models(self) -> dict[str, LoadedModel]:
        """Every bound model by route key (the default included)."""
        out = {DEFAULT_KEY: self.default}
        out |= {route_key("group", g): m for g, m in self.group_models.items()}
        out |= {route_key("machine", m): model for m, model in self.machine_models.items()}
        return out
