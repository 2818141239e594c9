"""Expert iteration's round bookkeeping (steer.training.expert) against the in-process app:
steered searches through the HTTP API on a scripted FakeEngine, a fake trainer and publisher
recording what they got. Real training runs in the integration test and the benchmark."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from steer.engine import AdapterRef, Generation, Prompt, SamplingParams
from steer.service.adapters import build_registry
from steer.service.app import create_app
from steer.service.settings import Settings
from steer.training import expert
from steer.training.rounds import Candidate, Pool, RoundStats, answers_of, best_round, vote
from steer.training.search_http import SteerCaller, retry_after
from tests.asgi import running
from tests.fakes import FakeEngine
from tests.lora_helpers import write_adapter, write_base

pytestmark = pytest.mark.anyio

ADMIN = {"Authorization": "Bearer adm1n"}
EXACT = {"type": "steer_critic", "pass_threshold": 1.0,
         "critic": {"name": "exact_answer", "reference": "{{item.reference}}",
                    "extract": "last_number"}}
FINAL = "ft:fake-model:t:ftjob-1"


def line(question: str, reference: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "reference": reference}


class ScriptedEngine(FakeEngine):
    """Answers by (question, adapter): sampled calls cycle through `samples[question]`,
    greedy ones (temperature 0) answer `greedy[(adapter, question)]`."""

    def __init__(self) -> None:
        super().__init__(max_model_len=4096)
        self.samples: dict[str, list[str]] = {}
        self.greedy: dict[tuple[str | None, str], str] = {}
        self._adapter: str | None = None
        self._turn: dict[str, int] = {}
        self.respond = self._respond

    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                       adapter: AdapterRef | None = None,
                       request_id: str | None = None) -> list[Generation]:
        # subtle: FakeEngine.generate answers without awaiting (no hold set), so the adapter
        # noted here is the one `_respond` sees.
        self._adapter = adapter.name if adapter else None
        return await super().generate(prompts, params, adapter, request_id)

    def _respond(self, prompt: Prompt, params: SamplingParams) -> str:
        question = prompt if isinstance(prompt, str) else prompt[-1].content
        if not params.temperature:
            return self.greedy.get((self._adapter, question), "no idea")
        script = self.samples.get(question, ["no idea"])
        turn = self._turn.get(question, 0)
        self._turn[question] = turn + 1
        return script[turn % len(script)]

    def searched_with(self) -> list[str | None]:
        return [c.adapter.name if c.adapter else None for c in self.history
                if c.params.temperature]


@dataclass
class FakeContext:
    """JobContext's surface (steer.training.worker): events, cancel, train, publish."""

    steer: httpx.AsyncClient
    adapters: Path
    training_lines: list[dict[str, Any]]
    validation_lines: list[dict[str, Any]]
    method: dict[str, Any]
    job: Any = None
    events: list[dict[str, Any]] = field(default_factory=list)
    trained: list[dict[str, Any]] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)
    cancel_on: str | None = None  # "train" or "search": the stage that cancels the job
    is_cancelled: bool = False
    losses: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])

    def __post_init__(self) -> None:
        self.job = SimpleNamespace(id="ftjob-1", model="fake-model", suffix="t", seed=7,
                                   method=self.method, training_file="file-train",
                                   validation_file="file-valid")

    async def event(self, message: str, data: dict[str, Any] | None = None,
                    level: str = "info", type: str = "message") -> None:
        self.events.append({"message": message, "data": data, "level": level, "type": type})

    async def cancelled(self) -> bool:
        return self.is_cancelled

    async def train(self, spec_kwargs: dict[str, Any], rows: list[dict[str, Any]],
                    name: str) -> Any:
        self.trained.append({"spec": spec_kwargs, "rows": rows, "name": name})
        if self.cancel_on == "train":
            self.is_cancelled = True
        out = self.adapters / f"{name}-{len(self.trained)}"
        write_adapter(out)
        return SimpleNamespace(adapter_dir=str(out), train_loss=self.losses[len(self.trained) - 1],
                               trained_tokens=100)

    async def publish(self, adapter_dir: str, name: str, kind: str,
                      lineage: dict[str, Any]) -> str:
        self.published.append({"dir": adapter_dir, "name": name, "kind": kind,
                               "lineage": lineage})
        r = await self.steer.post("/v1/load_lora_adapter", headers=ADMIN,
                                  json={"lora_name": name, "lora_path": adapter_dir})
        assert r.status_code == 200, r.text
        return name

    def metrics(self) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == "metrics"]


def method(grader: dict[str, Any] = EXACT, **hp: Any) -> dict[str, Any]:
    return {"type": "reinforcement",
            "reinforcement": {"grader": grader,
                              "hyperparameters": {"samples": 4, "max_tokens": 16, **hp}}}


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    (tmp_path / "adapters").mkdir()
    return tmp_path / "adapters"


async def _client(tmp_path: Path, adapters: Path, engine: FakeEngine, **settings: Any
                  ) -> AsyncIterator[httpx.AsyncClient]:
    s = Settings(admin_key=SecretStr("adm1n"), adapter_root=adapters, max_tokens_cap=64,
                 **settings)
    app = create_app(s, engine, build_registry(s, engine, write_base(tmp_path / "base")))
    async with running(app) as c:
        yield c


@pytest.fixture
async def client(tmp_path: Path, adapters: Path, engine: ScriptedEngine
                 ) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(tmp_path, adapters, engine):
        yield c


TRAIN = [line("What is 2 + 3?", "5"), line("What is 4 + 4?", "8")]
VALID = [line("What is 1 + 1?", "2"), line("What is 3 + 3?", "6")]


async def test_kept_samples_are_the_passing_candidates_deduped(
        client: httpx.AsyncClient, engine: ScriptedEngine, adapters: Path) -> None:
    engine.samples = {"What is 2 + 3?": ["5", "it is 5", "5  ", "6"],
                      "What is 4 + 4?": ["7", "9", "1", "no"]}
    ctx = FakeContext(client, adapters, TRAIN, VALID, method(rounds=1, n_epochs=3))
    final = await expert.run(ctx)
    assert final == FINAL
    (trained,) = ctx.trained
    assert trained["rows"] == [
        {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
         "completion": [{"role": "assistant", "content": answer}]}
        for answer in ("5", "it is 5")]
    assert trained["spec"] == {"method": "sft", "seed": 8, "n_epochs": 3}
    base, round1 = ctx.metrics()
    assert base["round"] == 0 and base["validation_accuracy"] == 0.0
    assert (round1["candidates"], round1["passed"], round1["kept_samples"]) == (8, 3, 2)
    assert round1["pass_rate"] == 3 / 8 and round1["prompts"] == 2
    assert round1["train_loss"] == 0.5 and round1["search_tokens"] > 0
    kinds = [(p["name"], p["kind"]) for p in ctx.published]
    assert kinds == [(f"{FINAL}:ckpt-round-1", "checkpoint"), (FINAL, "final")]
    lineage = ctx.published[0]["lineage"]
    assert lineage["parent"] == "fake-model" and lineage["round"] == 1
    assert lineage["grader"]["type"] == "steer_critic"
    assert lineage["strategy"]["strategy"] == "best_of_n"
    assert lineage["samples_from"] == {"fake-model": 2}


async def test_round_two_searches_with_round_one_checkpoint_and_the_best_round_is_final(
        client: httpx.AsyncClient, engine: ScriptedEngine, adapters: Path) -> None:
    # 4 samples a round: round 1 keeps "5", "8", "8.0"; round 2 adds "8 apples"
    engine.samples = {"What is 2 + 3?": ["5", "6"],
                      "What is 4 + 4?": ["8", "no", "8.0", "nope", "8 apples"]}
    ckpt1, ckpt2 = f"{FINAL}:ckpt-round-1", f"{FINAL}:ckpt-round-2"
    engine.greedy = {(ckpt1, "What is 1 + 1?"): "2", (ckpt1, "What is 3 + 3?"): "6",
                     (ckpt2, "What is 1 + 1?"): "2"}
    ctx = FakeContext(client, adapters, TRAIN, VALID, method(rounds=2))
    assert await expert.run(ctx) == FINAL
    searched = engine.searched_with()
    assert set(searched[: len(searched) // 2]) == {None}  # round 1 on the base
    assert set(searched[len(searched) // 2:]) == {ckpt1}
    accuracy = [m["validation_accuracy"] for m in ctx.metrics()]
    assert accuracy == [0.0, 1.0, 0.5]
    ckpts = [p for p in ctx.published if p["kind"] == "checkpoint"]
    assert [p["lineage"]["parent"] for p in ckpts] == ["fake-model", ckpt1]
    # every round trains a fresh adapter on everything kept so far
    assert [len(t["rows"]) for t in ctx.trained] == [3, 4]
    assert [m["kept_new"] for m in ctx.metrics()[1:]] == [3, 1]
    final = ctx.published[-1]
    assert final["kind"] == "final" and final["dir"] == ckpts[0]["dir"]  # round 1 was best
    assert final["lineage"]["selected_round"] == 1
    assert final["lineage"]["metrics"]["validation_accuracy"] == 1.0
    assert final["lineage"]["parent"] == "fake-model"  # round 1 learned the base's answers


async def test_label_free_keeps_only_majority_answers_above_threshold(
        client: httpx.AsyncClient, engine: ScriptedEngine, adapters: Path) -> None:
    engine.samples = {
        "What is 2 + 3?": ["5", "5", "so 5", "7"],  # 3 of 4 agree on 5: kept
        "What is 4 + 4?": ["8", "8", "9", "1"],  # 2 of 4: under the 0.6 threshold
        "What is 5 + 5?": ["10", "10", "11", "11"],  # a tie is no agreement
    }
    train = [*TRAIN, line("What is 5 + 5?", "10")]
    ctx = FakeContext(client, adapters, train, VALID, method(
        {"type": "agreement", "threshold": 0.6}, rounds=1))
    await expert.run(ctx)
    (trained,) = ctx.trained
    assert [r["completion"][0]["content"] for r in trained["rows"]] == ["5", "so 5"]
    assert [r["prompt"][0]["content"] for r in trained["rows"]] == ["What is 2 + 3?"] * 2
    assert all(c.params.temperature == 0.4 for c in engine.history if c.params.temperature)
    round1 = ctx.metrics()[1]
    assert (round1["passed"], round1["kept_samples"]) == (3, 2)


@pytest.mark.parametrize("stage", ["search", "train"])
async def test_cancel_stops_between_stages(
        client: httpx.AsyncClient, engine: ScriptedEngine, adapters: Path, stage: str) -> None:
    engine.samples = {"What is 2 + 3?": ["5"], "What is 4 + 4?": ["8"]}
    ctx = FakeContext(client, adapters, TRAIN, VALID, method(rounds=2), cancel_on=stage)
    if stage == "search":
        original = engine._respond

        def cancelling(prompt: Prompt, params: SamplingParams) -> str:
            if params.temperature:
                ctx.is_cancelled = True
            return original(prompt, params)

        engine.respond = cancelling
    with pytest.raises(expert.ExpertCancelled):
        await expert.run(ctx)
    assert ctx.published == []
    assert len(ctx.trained) == (1 if stage == "train" else 0)


async def test_busy_server_is_retried(tmp_path: Path, adapters: Path,
                                      engine: ScriptedEngine) -> None:
    engine.samples = {q["messages"][0]["content"]: ["5", "8"] for q in TRAIN}
    async def never() -> bool:
        return False

    async for c in _client(tmp_path, adapters, engine, max_concurrent_requests=1,
                           max_queued_requests=0):
        engine.hold = asyncio.Event()  # the first request holds the only slot a while
        asyncio.get_running_loop().call_later(0.3, engine.hold.set)
        caller = SteerCaller(c, 2, never, poll_s=0.0)
        got = await _gather(caller, [{"model": "fake-model", "max_tokens": 4, "messages": [
            {"role": "user", "content": f"q{i}"}]} for i in range(4)])
        assert all(a is not None for a in got)
        assert caller.busy_waits >= 1


async def _gather(caller: SteerCaller, bodies: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = [None] * len(bodies)

    async def one(i: int) -> None:
        out[i] = await caller.chat(bodies[i])

    await caller.map(one, range(len(bodies)))
    return out


async def test_429_backs_off_as_retry_after_says_and_errors_fail_one_item() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            return httpx.Response(429, headers={"Retry-After": "0"},
                                  json={"error": {"message": "busy"}})
        if b"bad" in request.content:
            return httpx.Response(400, json={"error": {"message": "prompt too long"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": "5"}}],
                                         "usage": {"total_tokens": 9}})

    async def never() -> bool:
        return False

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                 base_url="http://steer") as c:
        caller = SteerCaller(c, 1, never)
        got = await caller.chat({"messages": []})
        assert got is not None and (got.content, got.tokens) == ("5", 9)
        assert caller.busy_waits == 2 and len(calls) == 3
        assert await caller.chat({"bad": True}) is None
        assert caller.last_error == "HTTP 400: prompt too long"


async def test_map_runs_every_item_once_when_workers_race_for_the_last_ones() -> None:
    """Found by the benchmark: a worker that waited on the cancel poll popped an empty
    queue (IndexError failed the job) when other workers had taken the last items."""
    async def slow_never() -> bool:
        await asyncio.sleep(0.01)
        return False

    done: list[int] = []

    async def one(i: int) -> None:
        done.append(i)

    async with httpx.AsyncClient(base_url="http://steer") as c:
        caller = SteerCaller(c, 16, slow_never, poll_s=0.0)
        await caller.map(one, range(5))
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_retry_after_reads_seconds_or_backs_off() -> None:
    assert retry_after(httpx.Response(429, headers={"Retry-After": "3"}), 0) == 3.0
    assert retry_after(httpx.Response(429), 0) == 0.25
    assert retry_after(httpx.Response(429), 10) == 10.0


@pytest.mark.parametrize(("body", "param"), [
    ({"grader": EXACT, "hyperparameters": {"bogus": 1}},
     "method.reinforcement.hyperparameters.bogus"),
    ({"grader": EXACT, "hyperparameters": {"rounds": 0}},
     "method.reinforcement.hyperparameters.rounds"),
    ({"grader": EXACT, "hyperparameters": {"n_epochs": 0}},
     "method.reinforcement.hyperparameters.n_epochs"),
    ({"grader": EXACT, "hyperparameters": {"eval_samples": 4}},
     "method.reinforcement.hyperparameters.eval_samples"),
    ({"grader": {"type": "python", "source": "x"}}, "method.reinforcement.grader.type"),
    ({"grader": {"type": "agreement", "threshold": 2}}, "method.reinforcement.grader"),
    ({"grader": EXACT, "steering": {"strategy": "best_of_n", "oops": 1}},
     "method.reinforcement.steering.oops"),
    ({"hyperparameters": {}}, "method.reinforcement.grader"),
])
def test_bad_methods_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(expert.MethodError) as err:
        expert.parse_method({"type": "reinforcement", "reinforcement": body})
    assert err.value.param == param


def test_defaults() -> None:
    cfg = expert.parse_method(method())
    assert (cfg.hp.rounds, cfg.samples, cfg.temperature, cfg.hp.concurrency) == (2, 4, 0.7, 16)
    free = expert.parse_method(method({"type": "agreement"}, compute_multiplier=2))
    assert (free.samples, free.temperature, free.label_free) == (8, 0.4, True)
    assert free.validation_grader is not None


def test_pool_dedupes_and_caps_per_prompt() -> None:
    pool = Pool(per_prompt=2)
    assert pool.add(0, [Candidate("a", 0.5), Candidate(" a "), Candidate("b", 1.0)], 1) == 2
    assert pool.add(0, [Candidate("c", 1.0)], 2) == 1  # c beats a (0.5)
    assert sorted(pool.texts(0)) == ["b", "c"] and len(pool) == 2


def test_vote_ties_and_unextractable_answers() -> None:
    def last(text: str) -> str | None:
        found = re.findall(r"\d+", text)
        return found[-1] if found else None

    assert vote(["1", "2"], last).answer is None
    agreed = vote(["1", "1", "x", "2"], last)
    assert (agreed.answer, agreed.share) == ("1", 0.5)


def test_answers_of_reads_answer_roles_and_the_critic_score() -> None:
    trace = {"nodes": [{"role": "generator", "text": "5", "scores": {"exact_answer": 1.0}},
                       {"role": "critic", "text": "yes", "scores": {}},
                       {"role": "agent-1", "text": "6", "scores": {}}]}
    assert answers_of(trace, "7", "exact_answer") == [
        Candidate("5", 1.0), Candidate("6", None), Candidate("7", None)]


def test_best_round_prefers_accuracy_then_the_later_round() -> None:
    rounds = [RoundStats(1, "m", validation_accuracy=0.5), RoundStats(2, "m",
              validation_accuracy=0.5), RoundStats(3, "m", validation_accuracy=0.25)]
    assert best_round(rounds).round == 2
    assert best_round([RoundStats(1, "m"), RoundStats(2, "m")]).round == 2


async def test_any_steering_spec_searches_and_the_grader_grades_its_answers(
        client: httpx.AsyncClient, engine: ScriptedEngine, adapters: Path) -> None:
    engine.samples = {"What is 2 + 3?": ["5", "so 5", "4"], "What is 4 + 4?": ["1", "2", "3"]}
    body = method(rounds=1)
    body["reinforcement"]["steering"] = {"strategy": "self_consistency", "options": {"k": 3}}
    ctx = FakeContext(client, adapters, TRAIN, VALID, body)
    await expert.run(ctx)
    sampled = [c for c in engine.history if c.params.temperature]
    assert [c.params.n for c in sampled] == [3, 3]  # the client's strategy, not best_of_n
    (trained,) = ctx.trained
    assert [r["completion"][0]["content"] for r in trained["rows"]] == ["5", "so 5"]
    assert ctx.published[0]["lineage"]["strategy"]["strategy"] == "self_consistency"


async def test_a_round_with_no_new_sample_trains_nothing_and_keeps_the_last_adapter(
        client: httpx.AsyncClient, engine: ScriptedEngine, adapters: Path) -> None:
    engine.samples = {"What is 2 + 3?": ["5"], "What is 4 + 4?": ["8"]}
    ctx = FakeContext(client, adapters, TRAIN, [], method(rounds=2))
    assert await expert.run(ctx) == FINAL
    assert len(ctx.trained) == 1
    assert [p["kind"] for p in ctx.published] == ["checkpoint", "final"]
    assert any("no new sample" in e["message"] for e in ctx.events)
