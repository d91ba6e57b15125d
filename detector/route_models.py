"""The models the routes serve, kept current between batches by either shell.

Both shells (Mosquitto: ``detector/mosquitto_shell.py``; JetStream: ``detector/jetstream.py``) call
``poll(engine)`` between batches, never mid-batch. A poll

1. binds every machine's and group's newly promoted model (``models/{machines,groups}/<name>/
   current``), so a model fitted or trained elsewhere is served here too;
2. starts a fit of every calibration window that filled (``engine.take_fit_requests``) on one
   worker thread: the shell's loop keeps scoring meanwhile (and the calibrating machine's
   readings keep getting CALIBRATING verdicts). The fit saves the artifact as the machine's own
   model and promotes it, so its ``current`` re-binds it after a restart or on the detector
   that serves the machine next;
3. binds the model of every finished fit (``engine.bind``); a failed fit is retried after
   ``retry_s``.

It returns the machines whose model changed, so a shell that persists records per machine
(the JetStream runner's state bucket) writes theirs (``engine.bind`` ends the window).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog

from factorywatch.channels import canonical
from factorywatch.detector import calibration_window
from factorywatch.detector.calibration_window import FitRequest
from factorywatch.detector.engine import Engine
from factorywatch.detector.metrics import Metrics
from factorywatch.detector.router import Router
from factorywatch.detector.shell_common import Counters
from factorywatch.errors import FactorywatchError, ModelError
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel, RouteKind, ScorerKind
from factorywatch.model.asset import load_asset

log = structlog.get_logger("detector")
#: Wait this long before fitting a calibration window again after a failed fit.
FIT_RETRY_S = 60.0


def make_router(asset_config: Path | None, model: LoadedModel) -> Router:
    """The router the asset config describes (groups, calibration); default-only without one.

    Fails at start-up when calibration asks for a family this installation cannot fit.
    """
    if asset_config is None:
        return Router(model)
    asset = load_asset(asset_config, need_channels=False)
    calibration_window.check_fittable(asset.calibrate)
    return Router(
        model,
        asset.group_specs(),
        asset.calibrate,
        channels=[canonical(c) for c in asset.channels],
    )


def fit_and_save(model_dir: Path, request: FitRequest, scorer: ScorerKind) -> LoadedModel:
    """Fit a calibration window, save and promote it as the machine's model; load it."""
    trained = calibration_window.fit(request)
    card = trained.card.model_copy(
        update={
            "params": {
                **trained.card.params,
                "route": f"machine:{request.machine}",
                "calibrated_live": len(request.rows),
                "rebaselined_from": request.leaving,
            }
        }
    )
    folder = artifact.route_dir(model_dir, "machine", request.machine)
    artifact.save_generic(folder, trained.scorer, card)
    artifact.promote(folder, card.version, scorer=scorer)
    return artifact.load(folder, card.version, scorer=scorer)


class CalibrationWorker:
    """Binds promoted route models and fits full calibration windows off the shell's loop."""

    def __init__(
        self,
        model_dir: Path | None,
        scorer: ScorerKind,
        counters: Counters,
        metrics: Metrics,
        *,
        retry_s: float = FIT_RETRY_S,
    ) -> None:
        self.model_dir = model_dir
        self.scorer = scorer
        self.counters = counters
        self.metrics = metrics
        self.retry_s = retry_s
        self._fitter: ThreadPoolExecutor | None = None
        self._fits: dict[str, Future[LoadedModel]] = {}
        self._requests: dict[str, FitRequest] = {}
        self._retry: dict[str, tuple[float, FitRequest]] = {}
        self._unknown_groups: set[str] = set()
        self._fitted: list[tuple[str, str]] = []

    @property
    def fitting(self) -> list[str]:
        """The machines whose window is being fitted now."""
        return sorted(self._fits)

    def poll(self, engine: Engine, *, routes: bool = False) -> set[str]:
        """Start fits of full windows, bind finished ones (and, with ``routes``, every newly
        promoted route model); the machines whose own model changed."""
        changed = self.reload_routes(engine) if routes else set()
        self._start_fits(engine)
        return changed | self._finish_fits(engine)

    # -- promoted models ------------------------------------------------------------------------
    def reload_routes(self, engine: Engine) -> set[str]:
        """Bind every machine's and group's newly promoted model; the machines bound."""
        if self.model_dir is None:
            return set()
        router = engine.router
        machines: set[str] = set()
        for (kind, name), version in artifact.routed_versions(self.model_dir).items():
            bound = (router.machine_models if kind == "machine" else router.group_models).get(name)
            if bound is not None and bound.version == version:
                continue
            if kind == "group" and name not in router.groups:
                if bound is None and name not in self._unknown_groups:
                    self._unknown_groups.add(name)
                    log.warning("group_model_unrouted", group=name, version=version)
                continue
            if self._bind_route(engine, kind, name, version) and kind == "machine":
                machines.add(name)
        return machines

    def _bind_route(self, engine: Engine, kind: RouteKind, name: str, version: str) -> bool:
        assert self.model_dir is not None
        folder = artifact.route_dir(self.model_dir, kind, name)
        try:
            model = artifact.load(folder, version, scorer=self.scorer)
        except (ModelError, OSError) as exc:
            log.error(
                "model_reload_failed", route=f"{kind}:{name}", version=version, error=str(exc)
            )
            return False
        if kind == "machine":
            engine.bind(name, model)
        else:
            engine.bind_group(name, model)
        log.info("route_model_bound", route=f"{kind}:{name}", version=version)
        return True

    # -- live calibration -----------------------------------------------------------------------
    def _start_fits(self, engine: Engine) -> None:
        now = time.monotonic()
        requests = engine.take_fit_requests()
        requests += [r for due, r in list(self._retry.values()) if due <= now]
        for request in requests:
            self._retry.pop(request.machine, None)
            if request.machine in self._fits:
                continue
            if self.model_dir is None:
                raise FactorywatchError(
                    "live calibration needs a model directory to save the fitted models in"
                )
            if self._fitter is None:
                self._fitter = ThreadPoolExecutor(1, thread_name_prefix="calibration")
            log.info(
                "calibration_fit_started",
                machine_id=request.machine,
                readings=len(request.rows),
                family=request.spec.family,
                channels=list(request.channels),
            )
            self._fits[request.machine] = self._fitter.submit(
                fit_and_save, self.model_dir, request, self.scorer
            )
            self._requests[request.machine] = request

    def _finish_fits(self, engine: Engine) -> set[str]:
        now = time.monotonic()
        served: set[str] = set()
        for machine, future in list(self._fits.items()):
            if not future.done():
                continue
            del self._fits[machine]
            request = self._requests.pop(machine)
            try:
                model = future.result()
            except Exception as exc:  # any fit failure: keep calibrating, try again later
                self.metrics.calibrations.labels(result="failed").inc()
                self._retry[machine] = (now + self.retry_s, request)
                log.error(
                    "calibration_fit_failed",
                    machine_id=machine,
                    error=str(exc),
                    retry_s=self.retry_s,
                )
                continue
            engine.bind(machine, model)
            served.add(machine)
            self._fitted.append((machine, model.version))
            self.counters.calibrated += 1
            self.metrics.calibrations.labels(result="served").inc()
            log.info(
                "calibration_model_served",
                machine_id=machine,
                version=model.version,
                readings=len(request.rows),
                family=model.card.scorer_family,
                threshold=round(model.card.threshold, 4),
            )
        return served

    def take_fitted(self) -> list[tuple[str, str]]:
        """(machine, version) of the models fitted and served here since the last call."""
        fitted, self._fitted = self._fitted, []
        return fitted

    def forget(self, machines: set[str]) -> None:
        """No retry for these machines (another detector serves them now); a fit already
        running still saves and promotes its model, which the new owner then binds."""
        for machine in machines:
            self._retry.pop(machine, None)

    def close(self) -> None:
        """Stop the worker (a fit cut short is asked for again after the restart)."""
        if self._fitter is not None:
            self._fitter.shutdown(wait=False, cancel_futures=True)
            self._fitter = None
