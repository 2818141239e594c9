"""`/v1/models` shows names only: the served model's and the adapters', never a path on the
server (a client has no use for them, and they tell an attacker how the host is laid out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from steer.service.adapters import build_registry
from steer.service.app import create_app
from steer.service.settings import Settings
from tests.asgi import running
from tests.fakes import FakeEngine
from tests.lora_helpers import write_adapter, write_base

pytestmark = pytest.mark.anyio

MODEL_DIR = "/srv/models/secret-layout/Qwen2-0.5B"


def _strings(card: dict[str, Any]) -> list[str]:
    return [v for v in card.values() if isinstance(v, str)]


async def test_cards_name_the_model_and_adapters_without_paths(tmp_path: Path) -> None:
    tone = write_adapter(tmp_path / "private" / "tone")
    assert tone.is_absolute()
    settings = Settings(model=MODEL_DIR, lora_modules={"tone": str(tone)})
    engine = FakeEngine()
    app = create_app(settings, engine, build_registry(settings, engine, write_base(
        tmp_path / "base")))
    async with running(app) as client:
        r = await client.get("/v1/models")
    assert r.status_code == 200
    cards = {c["id"]: c for c in r.json()["data"]}
    assert set(cards) == {engine.model_name, "tone"}
    assert cards[engine.model_name]["root"] == engine.model_name
    assert cards[engine.model_name]["parent"] is None
    assert cards["tone"]["root"] == "tone"
    assert cards["tone"]["parent"] == engine.model_name
    for card in cards.values():
        for value in _strings(card):
            assert "/" not in value and str(tmp_path) not in value, card
