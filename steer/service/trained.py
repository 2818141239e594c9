"""The server's side of trained adapters: hot-load what the store says is `ready`.

A worker (this machine's or another's) records every adapter it trains in the store
(`steer.store.adapters`); every `adapter_sync_s` this server loads the `ready` ones of the
model it serves into its adapter registry, the same door as `--lora` and the runtime API
(`AdapterRegistry.load`: path inside the adapter root, safetensors only, rank under
`max_lora_rank`, targets and shapes that fit the served model), and unloads the ones it
loaded that are no longer `ready` (deleted). A load the registry refuses marks the row
`refused` with the reason, so the worker waiting for it fails its job with that reason
instead of waiting; a server-side failure (the engine) is retried at the next sync.

Also owns the `lineage` extension of those adapters' `/v1/models` cards (with ancestors),
and OpenAI's `DELETE /v1/models/{model}` for them (`delete`: the row becomes `deleted`, its
lineage kept, so descendants still name it; this server unloads it at once, other replicas
at their next sync). Adapters loaded another way (startup, admin API) are never touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from steer.engine import AdapterConflict, EngineError, InvalidAdapter, UnknownAdapter
from steer.engine.adapters import AdapterRegistry
from steer.service.errors import APIError
from steer.service.metrics import Metrics
from steer.service.protocol import ModelCard
from steer.store import Database, NotFound, StoreError
from steer.store import adapters as adapter_store
from steer.store import jobs as job_store

logger = logging.getLogger(__name__)


class TrainedAdapters:
    """Keeps the registry in step with the store's `ready` trained adapters."""

    def __init__(self, db: Database, registry: AdapterRegistry, metrics: Metrics,
                 base_model: Callable[[], str], interval_s: float) -> None:
        self.db = db
        self.registry = registry
        self.metrics = metrics
        self.base_model = base_model
        self.interval_s = interval_s
        self.loaded: dict[str, str] = {}  # name -> path, the adapters this sync loaded
        self.lineages: dict[str, dict[str, Any]] = {}

    async def run(self, ready: asyncio.Event) -> None:
        """Sync forever once the engine is ready (cancel to stop)."""
        await ready.wait()
        while True:
            try:
                await self.sync()
            except (StoreError, SQLAlchemyError, OSError, EngineError):
                # The store or engine hiccuped (a locked SQLite file, a restarting database):
                # the next sync tries again; serving goes on with what is loaded.
                logger.exception("syncing trained adapters failed; retrying in %.1fs",
                                 self.interval_s)
            except Exception:  # our bug: logged loudly, but the sync must not stop for good
                logger.exception("unexpected error syncing trained adapters; retrying")
            await asyncio.sleep(self.interval_s)

    async def sync(self) -> None:
        rows = {r.name: r for r in await adapter_store.ready_adapters(
            self.db, base_model=self.base_model())}
        for name in [n for n in self.loaded if n not in rows]:
            await self._unload(name)
        for name, row in rows.items():
            if name in self.loaded:
                continue
            try:
                await self.registry.load(name, row.path)
            except (InvalidAdapter, AdapterConflict) as exc:
                reason = str(getattr(exc, "reason", type(exc).__name__))
                self.metrics.adapter_failures.labels("load", reason).inc()
                logger.warning("trained adapter %s refused: %s", name, exc)
                await adapter_store.set_status(self.db, name, "refused", str(exc))
                continue
            self.metrics.adapter_loads.inc()
            self.loaded[name] = row.path
            self.lineages[name] = {**row.lineage, "kind": row.kind, "job_id": row.job_id,
                                   "ancestors": await adapter_store.ancestors(self.db, name)}
            logger.info("trained adapter %s loaded (job %s)", name, row.job_id)

    async def _unload(self, name: str) -> None:
        try:
            await self.registry.unload(name)
        except UnknownAdapter:
            pass  # someone unloaded it through the admin API already
        except AdapterConflict as exc:  # still in use: the next sync tries again
            logger.info("trained adapter %s deleted but still in use: %s", name, exc)
            return
        self.metrics.adapter_unloads.inc()
        del self.loaded[name]
        self.lineages.pop(name, None)
        logger.info("trained adapter %s unloaded (deleted from the store)", name)

    async def delete(self, name: str) -> None:
        """Delete a model Steer trained (a fine-tuned model or a round checkpoint): 404 for a
        model this server doesn't know (or one already deleted), 403 for the base model or
        an adapter loaded another way, 409 while the job that trains it is still running."""
        if name == self.base_model():
            raise APIError(403, f"'{name}' is the base model this server serves; only "
                           "fine-tuned models can be deleted.", param="model",
                           code="model_not_deletable")
        try:
            row = await adapter_store.get_adapter(self.db, name)
        except NotFound:
            row = None
        if row is None and name in self.registry.names():
            raise APIError(403, f"'{name}' was not trained by Steer (it was loaded at "
                           "startup or through the admin API); unload it with POST "
                           "/v1/unload_lora_adapter.", param="model",
                           code="model_not_deletable")
        if row is None or row.status != "ready":  # (deleted, or refused: never served)
            raise APIError(404, f"The model '{name}' does not exist.",
                           type="not_found_error", param="model", code="model_not_found")
        job = await self._job(row.job_id)
        if job is not None and job.status not in job_store.FINAL:
            raise APIError(409, f"'{name}' belongs to fine-tuning job {job.id}, which is "
                           f"{job.status}; cancel the job or wait until it ends.",
                           type="conflict_error", param="model", code="job_not_finished")
        if not await adapter_store.set_status(self.db, name, "deleted"):
            raise APIError(404, f"The model '{name}' does not exist.",  # deleted meanwhile
                           type="not_found_error", param="model", code="model_not_found")
        if name in self.loaded:
            await self._unload(name)  # (still in use: the next sync retries)
        logger.info("trained adapter %s deleted through the API", name)

    async def _job(self, job_id: str | None) -> job_store.Job | None:
        if job_id is None:
            return None
        try:
            return await job_store.get_job(self.db, job_id)
        except NotFound:  # recorded without a job (by hand): nothing to wait for
            return None

    def annotate(self, cards: list[ModelCard]) -> list[ModelCard]:
        """The cards, with `lineage` on the adapters this sync loaded."""
        return [card.model_copy(update={"lineage": self.lineages[card.id]})
                if card.id in self.lineages else card for card in cards]
