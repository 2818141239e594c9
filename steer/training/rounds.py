"""Pure bookkeeping for expert iteration (steer.training.expert): which candidates of a
search trace are answers, which of them a round keeps (graded or by agreement), the pool of
kept samples across rounds (deduped, capped per prompt), per-round statistics, seeds, and
which round becomes the final model.

No I/O here: the loop that searches, trains and publishes is `expert.py`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Trace roles whose text is a whole answer to the prompt (steer/search/strategies): best_of_n
# and self_consistency sample "generator"s, reflection writes a "draft" then "revision"s,
# debate's agents are "agent-<i>". ToT's "generator" nodes are partial steps, but its final
# answer comes back as the response text, which `answers_of` always adds.
ANSWER_ROLES = ("generator", "draft", "revision")


@dataclass(frozen=True)
class Candidate:
    """One answer a search produced for one prompt, with the grader's score if known."""

    text: str
    score: float | None = None


def _is_answer(role: str) -> bool:
    return role in ANSWER_ROLES or role.startswith("agent")


def answers_of(trace: Mapping[str, Any] | None, content: str | None,
               critic: str | None) -> list[Candidate]:
    """Every whole answer in a steered response: the trace's answer nodes (scored with the
    critic named `critic` when the node carries that score) and the returned content."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for node in (trace or {}).get("nodes", []):
        if not _is_answer(str(node.get("role", ""))):
            continue
        scores = node.get("scores") or {}
        value = scores.get(critic) if critic is not None else None
        out.append(Candidate(str(node.get("text", "")),
                             float(value) if value is not None else None))
        seen.add(str(node.get("text", "")))
    if content is not None and content not in seen:
        out.append(Candidate(content, None))
    return out


def normalized(text: str) -> str:
    """The dedupe key: two samples differing only in whitespace are the same sample."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Agreement:
    """What a label-free vote over one prompt's samples decided."""

    answer: str | None  # the majority answer, None when no answer was extracted or a tie
    share: float  # its votes over all samples (unextractable ones count against it)
    votes: dict[str, int]


def vote(texts: Sequence[str], extract: Callable[[str], str | None]) -> Agreement:
    """Majority vote over the extracted final answers of `texts` (Huang et al. 2022)."""
    answers = [extract(t) for t in texts]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return Agreement(None, 0.0, {})
    ranked = votes.most_common()
    top, count = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == count:
        return Agreement(None, count / len(texts), dict(ranked))  # a tie is no agreement
    return Agreement(top, count / len(texts), dict(ranked))


def keep_by_agreement(candidates: Sequence[Candidate], extract: Callable[[str], str | None],
                      threshold: float) -> tuple[list[Candidate], Agreement]:
    """The samples whose answer is the majority answer, if its vote share >= threshold."""
    texts = [c.text for c in candidates]
    agreed = vote(texts, extract)
    if agreed.answer is None or agreed.share < threshold:
        return [], agreed
    return [c for c in candidates if extract(c.text) == agreed.answer], agreed


@dataclass
class _Kept:
    text: str
    score: float
    round: int


@dataclass
class Pool:
    """Kept samples across rounds, per prompt: deduped (whitespace-insensitive) and, with
    `per_prompt`, at most that many per prompt (the highest-scored, earliest first)."""

    per_prompt: int | None = None
    _by_prompt: dict[int, dict[str, _Kept]] = field(default_factory=dict)

    def add(self, prompt: int, samples: Iterable[Candidate], round: int) -> int:
        """Add one prompt's passing samples; returns how many were new and kept."""
        kept = self._by_prompt.setdefault(prompt, {})
        before = set(kept)
        for s in samples:
            key = normalized(s.text)
            if key and key not in kept:
                kept[key] = _Kept(s.text, s.score if s.score is not None else 1.0, round)
        if self.per_prompt is not None and len(kept) > self.per_prompt:
            best = sorted(kept.items(), key=lambda kv: (-kv[1].score, kv[1].round))
            self._by_prompt[prompt] = kept = dict(best[: self.per_prompt])
        return len(set(kept) - before)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_prompt.values())

    def prompts(self) -> int:
        return sum(1 for v in self._by_prompt.values() if v)

    def texts(self, prompt: int) -> list[str]:
        return [k.text for k in self._by_prompt.get(prompt, {}).values()]

    def sft_lines(self, prompts: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """OpenAI chat SFT lines: each prompt's messages, then one kept answer."""
        lines = []
        for i in sorted(self._by_prompt):
            for kept in self._by_prompt[i].values():
                messages = [dict(m) for m in prompts[i]]
                lines.append({"messages": [*messages,
                                           {"role": "assistant", "content": kept.text}]})
        return lines


@dataclass
class RoundStats:
    """One round's numbers, as its "metrics" event reports them."""

    round: int
    model: str  # the model that searched (base or the previous round's checkpoint)
    prompts: int = 0
    prompts_failed: int = 0
    candidates: int = 0
    passed: int = 0
    kept_new: int = 0
    kept_samples: int = 0  # in the pool this round trains on
    prompts_with_kept: int = 0
    search_tokens: int = 0
    eval_tokens: int = 0
    search_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    train_loss: float | None = None
    trained_tokens: int | None = None
    validation_accuracy: float | None = None
    validation_items: int = 0
    checkpoint: str | None = None

    @property
    def pass_rate(self) -> float:
        return self.passed / self.candidates if self.candidates else 0.0

    def data(self) -> dict[str, Any]:
        return {**asdict(self), "pass_rate": self.pass_rate}


def best_round(rounds: Sequence[RoundStats]) -> RoundStats:
    """The final model's round: the highest validation accuracy (the later round on a tie,
    since it learned from more samples), or the last round when nothing was validated."""
    scored = [(r.validation_accuracy, r.round, r) for r in rounds
              if r.validation_accuracy is not None]
    if not scored:
        return rounds[-1]
    return max(scored, key=lambda t: (t[0], t[1]))[2]


def seed_for(job_seed: int, round: int, index: int) -> int:
    """A distinct, reproducible seed per (job, round, item), within a signed 32-bit range."""
    return (job_seed * 1_000_003 + round * 100_003 + index) % (2**31 - 1)
