"""The registry of served LoRA adapters: name -> the engine's `AdapterRef`, and who uses it.

Owns: loading (validate the files, give the adapter a fresh engine id, load it into the
engine, then publish the name), replacing, unloading, per-name serialization of those calls,
and leases that count the requests using each adapter. Does not own the file checks
(`lora_files.py`) or HTTP.

Rules:
- Nothing is published until every check passed and the engine accepted the adapter, so a
  failed load leaves the registry exactly as it was.
- Every load gets a new engine id, never reused: a replaced adapter can't be served from
  KV-cache blocks computed with its old weights (the engine keys its prefix cache by id).
- Requests hold a `Lease` for as long as they generate (a stream: until it is closed).
- Unload while in use: the name disappears at once (new requests get 404), then the unload
  *waits* for the requests already running to finish, up to `unload_timeout_s`. If they are
  still running then, the unload is refused (`AdapterConflict`, 409), the adapter is
  published again and the registry is as it was. The running requests never break.
  `unload_timeout_s=0` refuses an unload in use at once.
- Replace while in use: new requests get the new version at once; the old one is removed
  from the engine in the background when its last lease ends.
- Load/replace/unload calls for one name run one at a time; different names do not wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from steer.engine.base import AdapterConflict, Engine, InvalidAdapter, UnknownAdapter
from steer.engine.lora_files import (
    AdapterSpec,
    ModelModules,
    check_name,
    inspect_adapter,
    resolve_in_root,
)
from steer.engine.types import AdapterRef

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    """A published adapter, for listings (`/v1/models`)."""

    ref: AdapterRef
    created: int
    rank: int
    in_use: int


@dataclass(eq=False)
class _Version:
    ref: AdapterRef
    spec: AdapterSpec
    created: int
    holders: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class Lease:
    """One request's use of one adapter version; `release()` is idempotent."""

    def __init__(self, registry: AdapterRegistry, version: _Version) -> None:
        self._registry = registry
        self._version = version
        self._released = False

    @property
    def ref(self) -> AdapterRef:
        return self._version.ref

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._registry._release(self._version)


class AdapterRegistry:
    """All adapters served next to the base model. Use from one event loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        model: ModelModules | None,
        max_rank: int,
        root: Path | None,
        unload_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.model = model
        self.max_rank = max_rank
        self.root = root
        self.unload_timeout_s = unload_timeout_s
        self._current: dict[str, _Version] = {}
        self._next_id = 1
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    # -- lookups -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._current)

    def listing(self) -> list[AdapterInfo]:
        return [AdapterInfo(v.ref, v.created, v.spec.rank, v.holders)
                for v in self._current.values()]

    def resolve(self, name: str) -> AdapterRef:
        """The current version of adapter `name`, or `UnknownAdapter` listing what exists."""
        version = self._current.get(name)
        if version is None:
            raise self.unknown(name)
        return version.ref

    def unknown(self, name: str) -> UnknownAdapter:
        available = ", ".join([self.engine.model_name, *self._current])
        return UnknownAdapter(f"The model '{name}' does not exist. Available: {available}")

    def lease(self, name: str) -> Lease:
        """Count one more request on the current version of `name`.

        By name, not by ref: a request that resolved the name just before a replace runs on
        the new version; one that resolved it before an unload gets `UnknownAdapter`."""
        version = self._current.get(name)
        if version is None:
            raise self.unknown(name)
        version.holders += 1
        version.idle.clear()
        return Lease(self, version)

    def _release(self, version: _Version) -> None:
        version.holders -= 1
        if version.holders == 0:
            version.idle.set()

    # -- load / unload -----------------------------------------------------------------------

    async def load(
        self, name: str, path: str, *, replace: bool = False, confined: bool = True
    ) -> AdapterRef:
        """Validate and load the adapter at `path` under `name`.

        `confined`: `path` must lie inside the adapter root (the runtime API). Startup
        adapters, named by the operator on the command line, may live anywhere."""
        check_name(name)
        if name == self.engine.model_name:
            raise AdapterConflict(f"'{name}' is the base model's name.", reason="adapter_exists")
        if not self.engine.capabilities.lora:
            raise InvalidAdapter("LoRA is not enabled on this engine.", reason="lora_disabled")
        async with self._lock(name):
            old = self._current.get(name)
            if old is not None and not replace:
                raise AdapterConflict(
                    f"An adapter named '{name}' is already loaded; pass \"replace\": true "
                    "to replace it.", reason="adapter_exists",
                )
            spec = await asyncio.to_thread(self._inspect, path, confined)
            ref = AdapterRef(name, self._next_id, str(spec.path))
            self._next_id += 1  # never reused, even if the engine refuses this one
            await self.engine.load_adapter(ref)
            self._current[name] = _Version(ref, spec, int(time.time()))
            logger.info("adapter %s loaded from %s (engine id %d, rank %d)", name, spec.path,
                        ref.int_id, spec.rank)
            if old is not None:
                await self._retire(old)
            return ref

    def _inspect(self, path: str, confined: bool) -> AdapterSpec:
        if confined:
            if self.root is None:
                raise InvalidAdapter("No adapter root is configured (STEER_ADAPTER_ROOT).",
                                     reason="adapter_root_missing")
            real = resolve_in_root(self.root, path)
            return inspect_adapter(real, self.model, self.max_rank, root=self.root)
        return inspect_adapter(Path(path).expanduser(), self.model, self.max_rank)

    async def load_all(self, modules: Mapping[str, str]) -> None:
        """Load the startup adapters (unconfined); the first failure raises."""
        for name, path in modules.items():
            await self.load(name, path, confined=False)

    async def unload(self, name: str) -> AdapterRef:
        """Unpublish `name`, wait for its running requests, remove it from the engine."""
        if name == self.engine.model_name:
            raise InvalidAdapter(f"'{name}' is the base model; only adapters can be unloaded.",
                                 reason="base_model", field="name")
        async with self._lock(name):
            version = self._current.pop(name, None)
            if version is None:
                raise self.unknown(name)
            try:
                if not version.idle.is_set():  # (wait_for with timeout 0 never waits)
                    await asyncio.wait_for(version.idle.wait(), self.unload_timeout_s)
            except BaseException as exc:
                self._current[name] = version  # as it was (same position is not promised)
                if not isinstance(exc, TimeoutError):
                    raise
                raise AdapterConflict(
                    f"Adapter '{name}' is still in use by {version.holders} request(s) after "
                    f"{self.unload_timeout_s:g}s; it stays loaded. Retry when they finish.",
                    reason="adapter_in_use",
                ) from None
            await self.engine.unload_adapter(version.ref)
            logger.info("adapter %s unloaded (engine id %d)", name, version.ref.int_id)
            return version.ref

    async def _retire(self, version: _Version) -> None:
        if version.idle.is_set():
            await self.engine.unload_adapter(version.ref)
            return

        async def when_idle() -> None:
            await version.idle.wait()
            await self.engine.unload_adapter(version.ref)
            logger.info("replaced adapter %s: old engine id %d removed", version.ref.name,
                        version.ref.int_id)

        task = asyncio.create_task(when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("removing a replaced adapter failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- per-name locks ----------------------------------------------------------------------

    def _lock(self, name: str) -> _NameLock:
        return _NameLock(self, name)


class _NameLock:
    """The registry's lock for one name, dropped from the table when nobody holds or awaits
    it (names come from requests: the table must not grow with every name ever tried)."""

    def __init__(self, registry: AdapterRegistry, name: str) -> None:
        self.registry = registry
        self.name = name

    async def __aenter__(self) -> None:
        r = self.registry
        lock = r._locks.setdefault(self.name, asyncio.Lock())
        r._lock_users[self.name] = r._lock_users.get(self.name, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._forget()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.registry._locks[self.name].release()
        self._forget()

    def _forget(self) -> None:
        r = self.registry
        r._lock_users[self.name] -= 1
        if r._lock_users[self.name] == 0:
            del r._lock_users[self.name]
            del r._locks[self.name]
