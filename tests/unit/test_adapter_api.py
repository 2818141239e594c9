"""The runtime adapter API over HTTP (FakeEngine in-process): admin key, vLLM's routes and
bodies, /v1/models, choosing an adapter per request, refusals leaving the registry as it was,
unload while a request uses the adapter, and the adapter metrics."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from steer.service.adapters import build_registry
from steer.service.app import create_app
from steer.service.cli import build_parser, engine_config
from steer.service.settings import Settings
from tests.asgi import running
from tests.fakes import FakeEngine
from tests.lora_helpers import write_adapter, write_base

pytestmark = pytest.mark.anyio

ADMIN = {"Authorization": "Bearer adm1n"}
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    write_adapter(root / "tone")
    write_adapter(root / "judge")
    write_adapter(root / "pickled", pickle=True)
    write_adapter(root / "wide", rank=32)
    write_adapter(root / "other-base", modules={"model.layers.0.self_attn.q_proj": (8, 16)})
    write_adapter(tmp_path / "outside")
    os.symlink(tmp_path / "outside", root / "link-out")
    return root


async def app_client(settings: Settings, engine: FakeEngine, base: Path
                     ) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(settings, engine, build_registry(settings, engine, base))) as c:
        yield c


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(tmp_path: Path, root: Path, fake: FakeEngine
                 ) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(admin_key=SecretStr("adm1n"), adapter_root=root,
                        adapter_unload_timeout_s=5, max_tokens_cap=32)
    async for c in app_client(settings, fake, write_base(tmp_path / "base")):
        yield c


async def model_ids(c: httpx.AsyncClient) -> list[str]:
    r = await c.get("/v1/models")
    assert r.status_code == 200
    return [m["id"] for m in r.json()["data"]]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_load_use_unload(client: httpx.AsyncClient, fake: FakeEngine, root: Path) -> None:
    r = await client.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'tone' added successfully."  # vLLM's answer
    cards = (await client.get("/v1/models")).json()["data"]
    assert [c["id"] for c in cards] == ["fake-model", "tone"]
    assert cards[1]["parent"] == "fake-model"
    assert cards[1]["root"] == "tone"  # its name, never the server's path
    assert cards[1]["object"] == "model"

    r = await client.post("/v1/chat/completions", json=chat("tone"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tone"
    assert fake.history[-1].adapter is not None and fake.history[-1].adapter.name == "tone"
    r = await client.post("/v1/completions", json={"model": "tone", "prompt": "x"})
    assert r.status_code == 200 and fake.history[-1].adapter.name == "tone"  # type: ignore[union-attr]
    r = await client.post("/v1/chat/completions", json=chat("fake-model"))
    assert r.status_code == 200 and fake.history[-1].adapter is None

    r = await client.post(UNLOAD, json={"lora_name": "tone"}, headers=ADMIN)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'tone' removed successfully.")
    r = await client.post("/v1/chat/completions", json=chat("tone"))
    assert r.status_code == 404
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == ("model", "model_not_found",
                                                        "not_found_error")
    assert "Available: fake-model" in err["message"]
    r = await client.post(UNLOAD, json={"lora_name": "tone"}, headers=ADMIN)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "adapter_not_found"


async def test_steering_on_an_adapter(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    await client.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
    await client.post(LOAD, json={"lora_name": "judge", "lora_path": "judge"}, headers=ADMIN)
    body = chat("tone") | {"steering": {"strategy": "best_of_n", "options": {"n": 2},
                                        "critic": {"name": "llm_judge", "adapter": "judge"}}}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json=chat("bon-tone"))  # optillm's form
    assert r.status_code == 200, r.text
    used = {c.adapter.name if c.adapter else None for c in fake.history}
    assert used == {"tone", "judge"}  # every call ran on an adapter, none on the base
    text = (await client.get("/metrics")).text
    assert metric(text, "steer_adapter_requests_total", adapter="judge") == 1


async def test_unknown_model_lists_adapters(client: httpx.AsyncClient) -> None:
    await client.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
    r = await client.post("/v1/chat/completions", json=chat("nope"))
    assert r.status_code == 404
    assert r.json()["error"]["message"].endswith("Available: fake-model, tone")


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"lora_name": "x", "lora_path": "../outside"}, 400, "lora_path", "path_outside_root"),
        ({"lora_name": "x", "lora_path": "/etc"}, 400, "lora_path", "path_outside_root"),
        ({"lora_name": "x", "lora_path": "link-out"}, 400, "lora_path", "path_outside_root"),
        ({"lora_name": "x", "lora_path": "pickled"}, 400, "lora_path", "pickle_weights_refused"),
        ({"lora_name": "x", "lora_path": "wide"}, 400, "lora_path", "rank_too_large"),
        ({"lora_name": "x", "lora_path": "other-base"}, 400, "lora_path", "base_model_mismatch"),
        ({"lora_name": "x", "lora_path": "missing"}, 400, "lora_path", "adapter_not_found"),
        ({"lora_name": "x y", "lora_path": "tone"}, 400, "lora_name", "invalid_adapter_name"),
        ({"lora_name": "judge", "lora_path": "tone"}, 409, "lora_name", "adapter_exists"),
        ({"lora_name": "fake-model", "lora_path": "tone"}, 409, "lora_name", "adapter_exists"),
        ({"lora_name": "x"}, 400, "lora_path", None),
        ({"lora_name": "x", "lora_path": "tone", "extra": 1}, 400, "extra", None),
    ],
)
async def test_refusals_leave_the_registry_unchanged(
    client: httpx.AsyncClient, fake: FakeEngine, body: dict[str, Any], status: int, param: str,
    code: str | None,
) -> None:
    r = await client.post(LOAD, json={"lora_name": "judge", "lora_path": "judge"}, headers=ADMIN)
    assert r.status_code == 200
    before = (await model_ids(client), fake.adapters())
    r = await client.post(LOAD, json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert (await model_ids(client), fake.adapters()) == before


async def test_admin_key_is_required(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    body = {"lora_name": "tone", "lora_path": "tone"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "adm1n"}):
        r = await client.post(LOAD, json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_admin_key"
    r = await client.post(UNLOAD, json={"lora_name": "tone"})
    assert r.status_code == 401
    assert await model_ids(client) == ["fake-model"]
    assert fake.adapters() == []


async def test_without_admin_key_the_runtime_api_is_off(tmp_path: Path, root: Path) -> None:
    settings = Settings(adapter_root=root)
    async for c in app_client(settings, FakeEngine(), write_base(tmp_path / "base")):
        r = await c.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "admin_api_disabled"
        assert "STEER_ADMIN_KEY" in err["message"]
        assert await model_ids(c) == ["fake-model"]


async def test_replace_and_vllm_load_inplace(client: httpx.AsyncClient, fake: FakeEngine) -> None:
    await client.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
    first = fake.adapters()[0]
    for flag in ("replace", "load_inplace"):
        r = await client.post(LOAD, json={"lora_name": "tone", "lora_path": "judge", flag: True},
                              headers=ADMIN)
        assert r.status_code == 200, r.text
    (current,) = fake.adapters()
    assert current.int_id == first.int_id + 2 and current.path.endswith("judge")
    assert await model_ids(client) == ["fake-model", "tone"]


async def test_unload_waits_for_a_running_request(client: httpx.AsyncClient,
                                                  fake: FakeEngine) -> None:
    await client.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
    fake.hold = asyncio.Event()
    running = asyncio.create_task(client.post("/v1/chat/completions", json=chat("tone")))
    while not fake.history:
        await asyncio.sleep(0.01)
    unload = asyncio.create_task(client.post(UNLOAD, json={"lora_name": "tone"}, headers=ADMIN))
    await asyncio.sleep(0.1)
    assert not unload.done()
    assert await model_ids(client) == ["fake-model"]  # unpublished at once
    r = await client.post("/v1/chat/completions", json=chat("tone"))
    assert r.status_code == 404  # new requests are refused, the running one goes on
    fake.hold.set()
    assert (await running).status_code == 200
    assert (await unload).status_code == 200
    assert fake.adapters() == []


async def test_unload_in_use_times_out_with_409(tmp_path: Path, root: Path) -> None:
    fake = FakeEngine()
    settings = Settings(admin_key=SecretStr("adm1n"), adapter_root=root,
                        adapter_unload_timeout_s=0.1)
    async for c in app_client(settings, fake, write_base(tmp_path / "base")):
        await c.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
        fake.hold = asyncio.Event()
        running = asyncio.create_task(c.post("/v1/chat/completions", json=chat("tone")))
        while not fake.history:
            await asyncio.sleep(0.01)
        r = await c.post(UNLOAD, json={"lora_name": "tone"}, headers=ADMIN)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "adapter_in_use"
        assert await model_ids(c) == ["fake-model", "tone"]  # as it was
        fake.hold.set()
        assert (await running).status_code == 200
        r = await c.post(UNLOAD, json={"lora_name": "tone"}, headers=ADMIN)
        assert r.status_code == 200


async def test_startup_adapters(tmp_path: Path) -> None:
    tone = write_adapter(tmp_path / "anywhere" / "tone")
    settings = Settings(lora_modules=[f"tone={tone}"])
    fake = FakeEngine()
    async for c in app_client(settings, fake, write_base(tmp_path / "base")):
        assert await model_ids(c) == ["fake-model", "tone"]
        r = await c.post("/v1/chat/completions", json=chat("tone"))
        assert r.status_code == 200


async def test_bad_startup_adapter_fails_the_start(tmp_path: Path) -> None:
    bad = write_adapter(tmp_path / "bad", pickle=True)
    settings = Settings(lora_modules={"bad": str(bad)})
    fake = FakeEngine()
    app = create_app(settings, fake, build_registry(settings, fake, None))
    async with LifespanManager(app):
        state = app.state.engine_state
        await state.task
        assert not state.ready
        assert "pickle" in state.failure


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.post(LOAD, json={"lora_name": "tone", "lora_path": "tone"}, headers=ADMIN)
    await client.post(LOAD, json={"lora_name": "judge", "lora_path": "judge"}, headers=ADMIN)
    await client.post(LOAD, json={"lora_name": "x", "lora_path": "pickled"}, headers=ADMIN)
    await client.post("/v1/chat/completions", json=chat("tone"))
    await client.post("/v1/chat/completions", json=chat("tone"))
    await client.post(UNLOAD, json={"lora_name": "judge"}, headers=ADMIN)
    text = (await client.get("/metrics")).text
    assert metric(text, "steer_adapter_loads_total") == 2
    assert metric(text, "steer_adapter_unloads_total") == 1
    assert metric(text, "steer_adapter_failures_total", op="load",
                  reason="pickle_weights_refused") == 1
    assert metric(text, "steer_adapters_resident") == 1
    assert metric(text, "steer_adapter_requests_total", adapter="tone") == 2
    assert metric(text, "steer_requests_total", route=LOAD, status="200") == 2


def test_cli_lora_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    args = vars(build_parser().parse_args([
        "serve", "--lora", "a=/x/a", "--lora", "b=/x/b", "--max-loras", "2",
        "--max-lora-rank", "8", "--max-cpu-loras", "3",
    ]))
    settings = Settings(**{k: v for k, v in args.items() if v is not None and k != "command"})
    assert settings.lora_modules == {"a": "/x/a", "b": "/x/b"}
    cfg = engine_config(settings, "/m")
    assert (cfg.enable_lora, cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras) == (
        True, 2, 8, 3)
    monkeypatch.setenv("STEER_LORA_MODULES", "c=/y/c, d=/y/d")
    assert Settings().lora_modules == {"c": "/y/c", "d": "/y/d"}
    assert not engine_config(Settings(lora_modules={}, fine_tuning=False), "/m").enable_lora
    assert engine_config(Settings(lora_modules={}, fine_tuning=False, admin_key=SecretStr("k")),
                         "/m").enable_lora
    # fine-tuned adapters are hot-loaded: fine-tuning (the default) turns LoRA on
    assert engine_config(Settings(lora_modules={}), "/m").enable_lora


@pytest.mark.parametrize("kwargs", [{"max_lora_rank": 12}, {"max_loras": 4, "max_cpu_loras": 2},
                                    {"lora_modules": ["no-equals-sign"]}])
def test_bad_lora_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Settings(**kwargs)


def test_registry_without_safetensors_skips_shape_checks(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # a checkpoint we cannot read shapes of
    assert build_registry(Settings(), FakeEngine(), tmp_path).model is None
    assert build_registry(Settings(), FakeEngine(), write_base(tmp_path / "b")).model is not None
