"""The adapter registry over the FakeEngine: load/replace/unload, fresh engine ids, failed
loads leaving everything as it was, leases, the unload-while-in-use policy, per-name locks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from steer.engine import AdapterConflict, AdapterRef, InvalidAdapter, UnknownAdapter
from steer.engine.adapters import AdapterRegistry
from tests.fakes import FakeEngine
from tests.lora_helpers import tiny_model, write_adapter

pytestmark = pytest.mark.anyio


class GatedEngine(FakeEngine):
    """Loads wait for `gate` (when set) and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.refuse = False
        self.loads: list[AdapterRef] = []
        self.unloads: list[AdapterRef] = []

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            raise InvalidAdapter("engine says no", reason="engine_refused")
        self.loads.append(adapter)
        await super().load_adapter(adapter)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        self.unloads.append(adapter)
        await super().unload_adapter(adapter)


@pytest.fixture
def engine() -> GatedEngine:
    return GatedEngine()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for name in ("a", "b", "a2"):
        write_adapter(root / name)
    write_adapter(root / "big", rank=32)
    return root


@pytest.fixture
def registry(engine: GatedEngine, root: Path, tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(engine, model=tiny_model(tmp_path), max_rank=16, root=root,
                           unload_timeout_s=5)


def snapshot(registry: AdapterRegistry, engine: GatedEngine) -> tuple[object, ...]:
    return (registry.listing(), tuple(engine.adapters()), registry._locks)


async def test_load_resolve_list(registry: AdapterRegistry, engine: GatedEngine,
                                 root: Path) -> None:
    ref = await registry.load("a", "a")
    assert ref == AdapterRef("a", 1, str((root / "a").resolve()))
    assert registry.resolve("a") == ref
    assert engine.adapters() == [ref]
    b = await registry.load("b", str(root / "b"))
    assert b.int_id == 2
    assert [i.ref.name for i in registry.listing()] == ["a", "b"]
    assert registry.listing()[0].rank == 4
    assert registry._locks == {}  # per-name locks do not pile up


async def test_unknown_names_list_what_exists(registry: AdapterRegistry) -> None:
    await registry.load("a", "a")
    with pytest.raises(UnknownAdapter, match="Available: fake-model, a"):
        registry.resolve("zzz")
    with pytest.raises(UnknownAdapter):
        registry.lease("zzz")
    with pytest.raises(UnknownAdapter):
        await registry.unload("zzz")
    with pytest.raises(InvalidAdapter) as exc:
        await registry.unload("fake-model")
    assert exc.value.reason == "base_model"


@pytest.mark.parametrize(
    ("name", "path", "error", "reason"),
    [
        ("x", "../a", InvalidAdapter, "path_outside_root"),
        ("x", "/etc", InvalidAdapter, "path_outside_root"),
        ("x", "missing", InvalidAdapter, "adapter_not_found"),
        ("x", "big", InvalidAdapter, "rank_too_large"),
        ("bad name", "a", InvalidAdapter, "invalid_adapter_name"),
        ("a", "b", AdapterConflict, "adapter_exists"),
        ("fake-model", "b", AdapterConflict, "adapter_exists"),
    ],
)
async def test_failed_loads_leave_everything_as_it_was(
    registry: AdapterRegistry, engine: GatedEngine, name: str, path: str,
    error: type[Exception], reason: str,
) -> None:
    await registry.load("a", "a")
    before = snapshot(registry, engine)
    with pytest.raises(error) as exc:
        await registry.load(name, path)
    assert exc.value.reason == reason  # type: ignore[attr-defined]
    assert snapshot(registry, engine) == before


async def test_engine_refusal_leaves_everything_as_it_was(
    registry: AdapterRegistry, engine: GatedEngine
) -> None:
    first = await registry.load("a", "a")
    before = snapshot(registry, engine)
    engine.refuse = True
    with pytest.raises(InvalidAdapter):
        await registry.load("a", "b", replace=True)
    assert snapshot(registry, engine) == before
    assert registry.resolve("a") == first
    engine.refuse = False
    assert (await registry.load("b", "b")).int_id == 3  # ids are never reused


async def test_replace_gets_a_new_engine_id(registry: AdapterRegistry,
                                            engine: GatedEngine) -> None:
    old = await registry.load("a", "a")
    new = await registry.load("a", "a", replace=True)  # same files, still a new id
    assert new.int_id != old.int_id
    assert registry.resolve("a") == new
    assert engine.unloads == [old]  # unused: removed at once
    assert engine.adapters() == [new]


async def test_replace_while_in_use_retires_the_old_version_when_idle(
    registry: AdapterRegistry, engine: GatedEngine
) -> None:
    old = await registry.load("a", "a")
    lease = registry.lease("a")
    new = await registry.load("a", "a2", replace=True)
    assert lease.ref == old  # the running request keeps its version
    assert registry.lease("a").ref == new  # new requests get the new one
    assert engine.unloads == []
    lease.release()
    lease.release()  # idempotent
    for _ in range(5):
        await asyncio.sleep(0)
    assert engine.unloads == [old]


async def test_unload_waits_for_running_requests(registry: AdapterRegistry,
                                                 engine: GatedEngine) -> None:
    ref = await registry.load("a", "a")
    lease = registry.lease("a")
    unload = asyncio.create_task(registry.unload("a"))
    await asyncio.sleep(0.05)
    assert not unload.done()
    assert registry.names() == []  # new requests: 404 from now on
    with pytest.raises(UnknownAdapter):
        registry.lease("a")
    assert engine.unloads == []  # the running request still has it
    lease.release()
    assert await unload == ref
    assert engine.unloads == [ref]
    assert engine.adapters() == []


async def test_unload_gives_up_with_409_and_restores(registry: AdapterRegistry,
                                                     engine: GatedEngine) -> None:
    registry.unload_timeout_s = 0.05
    ref = await registry.load("a", "a")
    lease = registry.lease("a")
    with pytest.raises(AdapterConflict, match="in use by 1 request") as exc:
        await registry.unload("a")
    assert exc.value.reason == "adapter_in_use"
    assert registry.resolve("a") == ref
    assert engine.adapters() == [ref]
    lease.release()
    assert await registry.unload("a") == ref


async def test_zero_timeout_refuses_in_use_and_unloads_idle(registry: AdapterRegistry) -> None:
    registry.unload_timeout_s = 0
    ref = await registry.load("a", "a")
    lease = registry.lease("a")
    with pytest.raises(AdapterConflict):
        await registry.unload("a")
    lease.release()
    assert await registry.unload("a") == ref


async def test_calls_for_one_name_are_serialized(registry: AdapterRegistry,
                                                 engine: GatedEngine) -> None:
    engine.gate = asyncio.Event()
    first = asyncio.create_task(registry.load("a", "a"))
    second = asyncio.create_task(registry.load("a", "a2"))
    other = asyncio.create_task(registry.load("b", "b"))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    engine.gate.set()
    await first
    with pytest.raises(AdapterConflict):
        await second  # it ran after the first one finished, and found the name taken
    await other
    assert sorted(registry.names()) == ["a", "b"]
    assert registry._locks == {}


async def test_other_names_do_not_wait(registry: AdapterRegistry) -> None:
    await registry.load("a", "a")
    lease = registry.lease("a")
    unload = asyncio.create_task(registry.unload("a"))  # blocked on the lease
    await asyncio.sleep(0.01)
    await asyncio.wait_for(registry.load("b", "b"), 2)
    lease.release()
    await unload


async def test_startup_adapters_are_not_confined(tmp_path: Path, engine: GatedEngine) -> None:
    registry = AdapterRegistry(engine, model=tiny_model(tmp_path), max_rank=16, root=None)
    outside = write_adapter(tmp_path / "anywhere" / "tone")
    await registry.load_all({"tone": str(outside)})
    assert registry.names() == ["tone"]
    with pytest.raises(InvalidAdapter) as exc:
        await registry.load("again", str(outside))  # runtime: no root, no load
    assert exc.value.reason == "adapter_root_missing"


async def test_lora_disabled_engine_refuses(tmp_path: Path, root: Path) -> None:
    engine = FakeEngine()
    engine.capabilities = type(engine.capabilities)(lora=False)
    registry = AdapterRegistry(engine, model=None, max_rank=16, root=root)
    with pytest.raises(InvalidAdapter) as exc:
        await registry.load("a", "a")
    assert exc.value.reason == "lora_disabled"
