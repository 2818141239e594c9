"""Fixtures for the integration tests: one real `steer serve` (vLLM engine, default model)
per session, clients for it, the model's own tokenizer, and a factory for extra servers
(lifecycle and chaos tests that must not disturb the shared one)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import openai
import pytest

from tests.integration.support import (
    ChatTokenCounter,
    ServerFactory,
    ServerProcess,
    model_dir,
    openai_client,
)

# Re-exported for test modules that import them from here.
__all__ = ["ServerFactory", "openai_client"]


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("steer-servers"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def server(server_factory: ServerFactory) -> ServerProcess:
    """The shared server, default settings; stopped by the factory at session end."""
    srv = server_factory.start()
    srv.wait_ready()
    return srv


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai_client(server) as client:
        yield client


@pytest.fixture(scope="session")
def tokenizer(server: ServerProcess) -> Any:
    """The served model's own tokenizer (the server has converted the model by now)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


@pytest.fixture(scope="session")
def count_chat_tokens(tokenizer: Any) -> ChatTokenCounter:
    """Prompt tokens of a chat, counted the way the model itself sees it."""

    def count(messages: Sequence[Mapping[str, object]]) -> int:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count
