"""Route models in a JetStream object store: how detectors on other hosts get a fitted model.

A live calibration saves and promotes the machine's model in the detector's own model
directory (``detector/route_models.py``). The JetStream runner then uploads it to the
object store ``fw_models_<root>`` (R3): every file of the version as
``<folder>/<name>/<version>/<file>`` (``folder``: ``machines`` or ``groups``), then the
pointer ``<folder>/<name>/current`` holding the version, last, so a reader never follows a
pointer to a version still being written. Before each route reload every detector downloads
the promoted versions it lacks into its model directory and promotes them there
(``artifact.promote`` loads and scores the files first), so whichever detector serves the
machine next binds the model instead of calibrating again. On one host with one shared model
directory the download finds the version already there and does nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from factorywatch.errors import ModelError
from factorywatch.model import artifact
from factorywatch.model.artifact import ROUTE_FOLDERS, RouteKind, ScorerKind

log = structlog.get_logger("detector.model_store")
#: what a call to the store may raise when the cluster is unreachable or refuses it
STORE_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error)
_POINTER = "current"


async def open_store(js: JetStreamContext, bucket: str, replicas: int) -> ObjectStore:
    """The object store ``bucket``, created (R``replicas``, file storage) when missing."""
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        store = await js.create_object_store(
            bucket,
            ObjectStoreConfig(bucket=bucket, replicas=replicas, storage=StorageType.FILE),
        )
        log.info("bucket_created", bucket=bucket, replicas=replicas)
        return store
    except nats.js.errors.BadRequestError:  # another detector created it meanwhile
        return await js.object_store(bucket)


class ModelStore:
    """Uploads promoted route models and downloads the ones a model directory lacks."""

    def __init__(self, store: ObjectStore, model_dir: Path, scorer: ScorerKind) -> None:
        self.store = store
        self.model_dir = model_dir
        self.scorer = scorer

    async def upload(self, kind: RouteKind, name: str, version: str) -> None:
        """Upload one promoted version's files, then point ``current`` at it."""
        folder = artifact.route_dir(self.model_dir, kind, name)
        prefix = f"{ROUTE_FOLDERS[kind]}/{name}"
        source = folder / version
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source).as_posix()
            await self.store.put(f"{prefix}/{version}/{relative}", path.read_bytes())
        await self.store.put(f"{prefix}/{_POINTER}", version.encode())
        log.info("route_model_uploaded", route=f"{kind}:{name}", version=version)

    async def download(self) -> list[tuple[RouteKind, str, str]]:
        """Fetch and promote every route version promoted in the store but not here; those."""
        try:
            infos = await self.store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []  # nothing uploaded yet
        names = {info.name for info in infos if info.name}
        kinds = {folder: kind for kind, folder in ROUTE_FOLDERS.items()}
        fetched: list[tuple[RouteKind, str, str]] = []
        for pointer in sorted(n for n in names if n.endswith(f"/{_POINTER}")):
            parts = pointer.split("/")
            if len(parts) != 3 or parts[0] not in kinds:
                continue
            kind, name = kinds[parts[0]], parts[1]
            version = (await self.store.get(pointer)).data
            if not version:
                continue
            wanted = version.decode().strip()
            folder = artifact.route_dir(self.model_dir, kind, name)
            if artifact.current_version(folder) == wanted:
                continue
            files = sorted(n for n in names if n.startswith(f"{parts[0]}/{name}/{wanted}/"))
            try:
                await self._fetch(folder, wanted, files, f"{parts[0]}/{name}/{wanted}/")
                artifact.promote(folder, wanted, scorer=self.scorer)
            except (ModelError, OSError, ValueError) as exc:
                log.error(
                    "route_model_download_failed",
                    route=f"{kind}:{name}",
                    version=wanted,
                    error=str(exc),
                )
                continue
            log.info("route_model_downloaded", route=f"{kind}:{name}", version=wanted)
            fetched.append((kind, name, wanted))
        return fetched

    async def _fetch(self, folder: Path, version: str, files: list[str], prefix: str) -> None:
        """Write a version's files into ``folder/version`` (whole, or not at all)."""
        target = folder / version
        if (target / artifact.CARD_FILE).is_file():
            return  # already here (a shared directory, or fetched before its promotion failed)
        staging = folder / f".{version}.download"
        shutil.rmtree(staging, ignore_errors=True)
        for name in files:
            path = staging / name[len(prefix) :]
            if ".." in path.relative_to(staging).parts:
                raise ValueError(f"object name {name!r} leaves the model folder")
            data = (await self.store.get(name)).data or b""
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        staging.rename(target)
