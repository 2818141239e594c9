"""The CLI: help texts, and flags feeding the frozen settings."""

from __future__ import annotations

import logging

import pytest

from steer.service.cli import build_parser, engine_config, warn_if_exposed
from steer.service.settings import Settings


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "models" in out


def test_serve_help_lists_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--port", "--model", "--max-model-len", "--drain-timeout-s", "--max-n"):
        assert flag in out


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_PORT", "9001")
    monkeypatch.setenv("STEER_MAX_N", "3")
    args = vars(build_parser().parse_args(["serve", "--port", "9002"]))
    settings = Settings(**{k: v for k, v in args.items() if v is not None and k != "command"})
    assert settings.port == 9002
    assert settings.max_n == 3


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_served_name_defaults() -> None:
    assert Settings().model_name() == "smollm2-135m-instruct"
    assert Settings(model="/models/Qwen2-0.5B/").model_name() == "Qwen2-0.5B"
    cfg = engine_config(Settings(served_model_name="x", max_model_len=1024), "/m")
    assert (cfg.model, cfg.served_model_name, cfg.max_model_len) == ("/m", "x", 1024)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "steer.example.com"])
def test_binding_beyond_loopback_without_a_key_warns(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="steer"):
        warn_if_exposed(Settings(host=host, api_key=None))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert host in record.getMessage() and "STEER_API_KEY" in record.getMessage()


@pytest.mark.parametrize(
    ("host", "key"),
    [("127.0.0.1", None), ("127.0.1.1", None), ("::1", None), ("localhost", None),
     ("0.0.0.0", "k")],
)
def test_loopback_or_a_key_does_not_warn(
    host: str, key: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="steer"):
        warn_if_exposed(Settings(host=host, api_key=key))
    assert caplog.records == []
