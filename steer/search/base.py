"""Strategies as typed plugins, and what they share: context, final answers, results.

A strategy is a class with a `name`, a nested pydantic `Options` (`extra="forbid"`), a
`planned_calls()` bound (checked before the first call), and one `async run(ctx)`. It
reaches the engine only through `ctx.session`, offers every scored candidate to
`ctx.offer()` (so a budget cut-off can still return the best so far), and ends with a
`FinalText` (an answer it already has) or a `FinalPrompt` (one more generation whose
tokens can stream straight to the client).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from steer.critics import Candidate, Critic, Question, Score, mean_logprob
from steer.critics.quoting import Cut
from steer.engine import (
    AdapterRef,
    Constraint,
    Generation,
    Message,
    Prompt,
    SamplingParams,
    TokenLogprob,
)
from steer.search.constrained import gate_for
from steer.search.session import BudgetExhausted, Limit, Session
from steer.search.trace import Node, Trace


class StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


@dataclass(frozen=True)
class FinalText:
    node: Node
    finish_reason: str = "stop"


@dataclass(frozen=True)
class FinalPrompt:
    messages: tuple[Message, ...]
    params: SamplingParams
    parent: int | None = None


Final = FinalText | FinalPrompt


@dataclass(frozen=True)
class SteerResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model_calls: int
    candidates: int
    pruned: int
    budget_exhausted: bool
    trace: Trace
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache served
    answer_tokens: int = 0  # completion tokens of the returned answer itself
    logprobs: tuple[TokenLogprob, ...] | None = None  # the answer's, when it is one generation
    index: int = 0  # which of the request's choices (n searches, or several prompts)

    @property
    def reasoning_tokens(self) -> int:
        """Completion tokens spent beyond the returned answer (OpenAI's reasoning tokens)."""
        return max(0, self.completion_tokens - self.answer_tokens)


@dataclass
class Context:
    """Everything a strategy may use while it runs."""

    session: Session
    messages: tuple[Message, ...]  # the conversation, after any template
    params: SamplingParams  # the client's sampling knobs (n is always 1 here)
    critic: Critic | None
    trace: Trace
    adapters: dict[str, AdapterRef] = field(default_factory=dict)  # by name, for roles
    best: Node | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)
    budget_cut: BudgetExhausted | None = None  # set when the run did less than asked
    # The engine's output behind each generated node (by node id): the answer's logprobs,
    # token count and token pieces come from here when that node is returned.
    outputs: dict[int, Generation] = field(default_factory=dict)
    # Calls `affordable` keeps back for a last call the strategy must still make (ToT's
    # constrained answer).
    reserved_calls: int = 0
    # The critic the answer constraint implies (`constrained.gate_for`), and the nodes it
    # failed: they never become `best`.
    gate: Critic | None = field(init=False)
    failed_gate: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.gate = gate_for(self.params.constraint)

    def cut(self, limit: Limit, what: str) -> None:
        """Record that the budget made this run do less than its options asked."""
        if self.budget_cut is None:
            self.budget_cut = self.session.budget.exhausted(limit, what)
            self.trace.info["budget_exhausted"] = str(self.budget_cut)

    def affordable(self, wanted: int, cost: Callable[[int], int]) -> int:
        """The largest k <= `wanted` whose `cost(k)` model calls fit what is left of the
        budget (0 when none does); a smaller k marks the run as cut."""
        left = self.session.calls_left - self.reserved_calls
        k = wanted
        while k > 0 and cost(k) > left:
            k -= 1
        if k < wanted:
            self.cut("max_model_calls", f"{self.session.model_calls} used, "
                                        f"{self.session.budget.max_model_calls} allowed; "
                                        f"did {k} of {wanted}")
        return k

    async def fit(self, build: Callable[[Cut], Prompt], max_tokens: int | None,
                  ) -> Prompt | None:
        """One of the strategy's own prompts, its quotes (`build` passes each through the
        cut it gets) shortened to leave room for an answer of `max_tokens`; None when it
        cannot fit at all (the caller drops that call or stops)."""
        return await self.session.fit(build, self.session.answer_room(max_tokens))

    @property
    def answer_logprobs(self) -> int:
        """`logprobs` for calls whose output may be returned: the client's top-k when it
        asked for logprobs, else 0 (the sampled token's logprob, which critics read)."""
        return self.params.logprobs or 0

    @property
    def question(self) -> Question:
        return Question(self.messages)

    def offer(self, node: Node) -> None:
        """Remember `node` if it is the best scored answer so far. Under a constraint only
        what was generated under it (`meta["constrained"]`) is an answer."""
        if node.score is None or node.id in self.failed_gate or (
                self.constraint is not None and not node.meta.get("constrained")):
            return
        if self.best is None or (self.best.score or 0.0) < node.score:
            self.best = node

    def note(self, **event: Any) -> None:
        """A progress event (streamed to the client as a chunk with a `steering` field)."""
        self.progress.append(event)

    def add_generations(
        self, gens: Sequence[Generation], role: str, round: int = 0, parent: int | None = None
    ) -> list[Node]:
        now = self.session.elapsed()
        nodes = []
        # Answers, each generated under the request's constraint (when it has one).
        marks = {"constrained": True} if self.constraint is not None else {}
        for g in gens:
            node = self.trace.add(
                role, g.text, parent=parent, round=round, tokens=g.completion_tokens,
                ended_s=round_s(now),
                meta={"mean_logprob": mean_logprob(g), "finish_reason": g.finish_reason,
                      **marks},
            )
            self.outputs[node.id] = g
            nodes.append(node)
        return nodes

    async def score(self, nodes: Sequence[Node], critic: Critic | None = None,
                    gated: bool = True) -> list[Score]:
        """Score `nodes` with the critic in one batch, recording each score on its node.

        Answers (`gated`) are also scored by the gate when the constraint implies one: a
        node that fails it scores 0 under `<gate>+<critic>`, the key it is ranked by (first
        in its scores; the critic's and the gate's own scores follow), and never becomes
        `best`. Not for what is not an answer (ToT's thoughts: `gated=False`)."""
        critic = critic or self.critic
        gate = self.gate if gated or critic is self.gate else None
        if critic is gate:  # asked for the gate alone
            critic = None
        if (critic is None and gate is None) or not nodes:
            return []
        candidates = [
            Candidate(n.text, mean_logprob=n.meta.get("mean_logprob"), tokens=n.tokens)
            for n in nodes
        ]
        gates = await gate.score(self.session, self.question, candidates) if gate else None
        scores = (await critic.score(self.session, self.question, candidates)
                  if critic is not None else None)
        out: list[Score] = []
        for i, n in enumerate(nodes):
            if gates is not None and gate is not None:
                self._record(n, gate, gates[i])
                if not gates[i].passed:
                    self.failed_gate.add(n.id)
            if scores is not None and critic is not None:
                self._record(n, critic, scores[i])
            s = _gated(gates[i] if gates else None, scores[i] if scores else None)
            if gate is not None and critic is not None:
                # The ranking score comes first: `Node.score` is the first one recorded.
                n.scores = {f"{gate.name}+{critic.name}": s.value, **n.scores}
            self.offer(n)
            out.append(s)
        return out

    @staticmethod
    def _record(node: Node, critic: Critic, score: Score) -> None:
        node.scores[critic.name] = score.value
        if score.detail:
            node.meta[f"{critic.name}_detail"] = score.detail

    @property
    def constraint(self) -> Constraint | None:
        """The request's decoding constraint (None: free text)."""
        return self.params.constraint

    def sampling(self, **changes: Any) -> SamplingParams:
        """Params for a call whose output is not an answer: free text, unconstrained."""
        return replace(self.params, **{"constraint": None, **changes})

    def answer_sampling(self, **changes: Any) -> SamplingParams:
        """Params for a call whose output may be returned as the answer: decoded under the
        request's constraint (see `steer.search.constrained`)."""
        return replace(self.params, **changes)


def _gated(gate: Score | None, score: Score | None) -> Score:
    """One node's ranking score: the critic's, but 0 (with the gate's reason) when the
    node fails the gate."""
    if score is None:
        assert gate is not None
        return gate
    if gate is None or gate.passed:
        return score
    return Score(0.0, gate.detail, passed=False)


class Strategy(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    default_critic: ClassVar[str | None] = None
    # False when the answer may be assembled from several generations (ToT's chain of
    # steps): it then has no logprobs of its own to return.
    answer_is_generation: ClassVar[bool] = True

    def __init__(self, options: StrategyOptions, critic: Critic | None) -> None:
        self.options = options
        self.critic = critic

    def planned_calls(self) -> int:
        """An upper bound on the model calls one run makes (what admission may weigh; the
        budget, not this bound, is what holds at run time)."""
        return 1

    def min_calls(self) -> int:
        """The model calls the smallest useful run makes; a budget below it is refused."""
        return 1

    def check(self) -> None:  # noqa: B027 - optional hook, most strategies need none
        """Cross-field checks before any call; raise `SteeringInvalid` naming the field."""

    def adapter_names(self) -> list[str]:
        """LoRA adapters this run's roles use (resolved, and checked, before any call)."""
        return []

    @abstractmethod
    async def run(self, ctx: Context) -> Final: ...


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def round_s(seconds: float) -> float:
    return round(seconds, 4)
