"""Prometheus metrics: one registry per app (so two apps in one process never collide).

Request counts and latency are measured by a pure ASGI middleware (it sees the final status
and the end of a streamed body); token counts and time-to-first-token by the serving code.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
KNOWN_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
    "/v1/steering/templates", "/v1/steering/traces",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "steer_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "steer_request_duration_seconds", "Request latency, to the last byte", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "steer_time_to_first_token_seconds", "Time to the first generated token",
            ["route"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "steer_prompt_tokens", "Prompt tokens processed", ["route"], registry=r
        )
        self.completion_tokens = Counter(
            "steer_completion_tokens", "Completion tokens generated", ["route"], registry=r
        )
        self.in_flight = Gauge(
            "steer_requests_in_flight", "Generation requests being served", registry=r
        )
        self.queued = Gauge(
            "steer_requests_queued", "Generation requests waiting for a slot", registry=r
        )
        self.rejected = Counter(
            "steer_requests_rejected", "Requests refused by admission control", ["reason"],
            registry=r,
        )
        self.admitted_work = Gauge(
            "steer_admitted_work_tokens",
            "Work admitted or queued (tokens the engine may be asked to process)", registry=r,
        )
        self.stream_send_timeouts = Counter(
            "steer_stream_send_timeouts", "Streams cut off because the client stopped reading",
            registry=r,
        )
        self.engine_up = Gauge("steer_engine_up", "1 when the engine is healthy", registry=r)
        self.engine_running = Gauge(
            "steer_engine_requests_running", "Sequences unfinished inside the engine",
            registry=r,
        )

        self.strategy_requests = Counter(
            "steer_strategy_requests", "Steered requests answered, by strategy", ["strategy"],
            registry=r,
        )
        self.strategy_model_calls = Counter(
            "steer_strategy_model_calls", "Model calls (generated sequences) spent", ["strategy"],
            registry=r,
        )
        self.strategy_tokens = Counter(
            "steer_strategy_tokens", "Prompt + completion tokens spent", ["strategy"], registry=r
        )
        self.strategy_latency = Histogram(
            "steer_strategy_duration_seconds", "Steered request latency", ["strategy"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.strategy_budget_exhausted = Counter(
            "steer_strategy_budget_exhausted", "Runs cut short by their budget", ["strategy"],
            registry=r,
        )
        self.strategy_errors = Counter(
            "steer_strategy_errors", "Steered requests that failed", ["strategy"], registry=r
        )
        self.adapter_loads = Counter(
            "steer_adapter_loads", "LoRA adapters loaded (startup, runtime, replacements)",
            registry=r,
        )
        self.adapter_unloads = Counter(
            "steer_adapter_unloads", "LoRA adapters unloaded", registry=r
        )
        self.adapter_failures = Counter(
            "steer_adapter_failures", "Refused adapter loads/unloads, by operation and reason",
            ["op", "reason"], registry=r,
        )
        self.adapters_resident = Gauge(
            "steer_adapters_resident", "LoRA adapters currently served", registry=r
        )
        self.adapter_requests = Counter(
            "steer_adapter_requests", "Requests that used each adapter (as model or role)",
            ["adapter"], registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_tokens(self, route: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(route).inc(prompt)
        self.completion_tokens.labels(route).inc(completion)


class MetricsMiddleware:
    """Counts every HTTP request by route and final status, and times it to the last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith("/v1/steering/traces/"):
            path = "/v1/steering/traces"  # one label for every trace id
        route = path if path in KNOWN_ROUTES else "other"
        status: dict[str, Any] = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
