"""Training files from Steer's own traffic: stored completions turned into OpenAI's chat SFT
lines (the request's messages plus the chosen answer) or OpenAI's preference (DPO) lines (the
chosen candidate of a search against lower-scored candidates of the same search).

`build` is pure (records in, lines and skip reasons out); `export` selects the records from
the store, builds, splits off an optional validation set (by prompt, seeded, so a prompt's
lines never land on both sides) and writes the result as Files.

Exceptions: `DatasetError` (nothing matches, or nothing usable came out), with the request
field to blame when there is one.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from steer.store import Database
from steer.store.completions import Selection, select_completions
from steer.store.db import now
from steer.store.files import StoredFile, create_file

# Trace roles whose nodes are whole answers to the prompt (a critic's verdict, a ToT root or
# a debate summary is not), so one can be preferred to another.
CANDIDATE_ROLES = frozenset({"generator", "candidate"})


class DatasetError(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DatasetSpec(BaseModel):
    """What to build (`kind`) from which stored completions (every filter given must hold)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["sft", "preference"] = "sft"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] \
        = Field(default_factory=dict, max_length=16)
    model: str | None = Field(None, max_length=256)
    strategy: str | None = Field(None, max_length=64)
    min_score: float | None = Field(None, allow_inf_nan=False)  # the chosen candidate's
    # unix seconds; bounded so every database's 64-bit integer takes them (fuzzing found a
    # 500 from SQLite on a larger one)
    created_after: int | None = Field(None, ge=0, le=2**62)  # inclusive
    created_before: int | None = Field(None, ge=0, le=2**62)  # exclusive
    dedupe: bool = True
    include_truncated: bool = False  # answers cut off by max_tokens (finish_reason "length")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    filename: str | None = Field(None, min_length=1, max_length=200)

    def selection(self) -> Selection:
        return Selection(metadata=dict(self.metadata), model=self.model, strategy=self.strategy,
                         min_score=self.min_score, created_after=self.created_after,
                         created_before=self.created_before)

    def filters(self) -> dict[str, Any]:
        keys = ("metadata", "model", "strategy", "min_score", "created_after", "created_before")
        return {k: v for k, v in self.model_dump(include=set(keys)).items() if v not in (None, {})}


class Record(Protocol):
    """What `build` reads of a stored completion."""

    @property
    def id(self) -> str: ...
    @property
    def request(self) -> dict[str, Any]: ...
    @property
    def response(self) -> dict[str, Any]: ...
    @property
    def trace(self) -> dict[str, Any] | None: ...


@dataclass
class Dataset:
    training: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    completions: int = 0  # records that matched
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> completions (or lines)


@dataclass(frozen=True)
class Exported:
    training_file: StoredFile
    validation_file: StoredFile | None
    dataset: Dataset


def prompt_of(request: Mapping[str, Any]) -> list[dict[str, str]]:
    """The request's messages as training messages: text only, `developer` as `system`."""
    out = []
    for m in request.get("messages", ()):
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(part.get("text", "") for part in content)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content or ""})
    return out


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sft_lines(record: Record, include_truncated: bool = False) -> tuple[list[dict[str, Any]],
                                                                        str | None]:
    """One line per answer choice; or no lines and the reason."""
    prompt = prompt_of(record.request)
    lines, reason = [], "empty_answer"
    for choice in record.response.get("choices", ()):
        text = (choice.get("message") or {}).get("content") or ""
        if not text.strip():
            continue
        if choice.get("finish_reason") == "length" and not include_truncated:
            reason = "truncated"
            continue
        lines.append({"messages": [*prompt, _assistant(text)]})
    return lines, None if lines else reason


def preference_lines(record: Record) -> tuple[list[dict[str, Any]], str | None]:
    """The chosen candidate against every lower-scored sibling candidate (same parent, same
    critic; ties and identical texts skipped); or no lines and the reason."""
    trace = record.trace
    if not trace:
        return [], "no_trace"
    nodes = [n for n in trace.get("nodes", ()) if n.get("role") in CANDIDATE_ROLES]
    chosen = next((n for n in nodes if n.get("chosen")), None)
    if chosen is None:
        return [], "no_chosen_candidate"
    if not chosen.get("scores"):
        return [], "unscored"
    critic, best = next(iter(chosen["scores"].items()))
    preferred = chosen["text"]
    prompt = prompt_of(record.request)
    lines = []
    for node in nodes:
        score = node.get("scores", {}).get(critic)
        if (node is chosen or node.get("parent") != chosen.get("parent") or score is None
                or score >= best or not node["text"].strip()
                or node["text"].strip() == preferred.strip()):
            continue
        lines.append({"input": {"messages": prompt},
                      "preferred_output": [_assistant(preferred)],
                      "non_preferred_output": [_assistant(node["text"])]})
    return lines, None if lines else "no_lower_scored_candidate"


def _key(line: Mapping[str, Any]) -> str:
    return json.dumps(line, sort_keys=True)


def _prompt_key(line: Mapping[str, Any]) -> str:
    messages = line["input"]["messages"] if "input" in line else line["messages"][:-1]
    return json.dumps(messages, sort_keys=True)


def build(records: Iterable[Record], spec: DatasetSpec) -> Dataset:
    """Lines of `spec.kind` from `records`, deduplicated (same prompt and answer(s)), then
    split (`spec.validation_fraction` of the prompts, chosen by `spec.seed`)."""
    data = Dataset()
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record in records:
        data.completions += 1
        made, reason = (sft_lines(record, spec.include_truncated) if spec.kind == "sft"
                        else preference_lines(record))
        if reason is not None:
            data.skipped[reason] += 1
        for line in made:
            key = _key(line)
            if spec.dedupe and key in seen:
                data.skipped["duplicate"] += 1
                continue
            seen.add(key)
            lines.append(line)
    data.training, data.validation = split(lines, spec.validation_fraction, spec.seed)
    return data


def split(lines: list[dict[str, Any]], fraction: float,
          seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, validation): whole prompts go to validation, at least one when a fraction
    is asked for and there are two prompts or more, never all of them."""
    prompts = list(dict.fromkeys(_prompt_key(line) for line in lines))
    if fraction <= 0 or len(prompts) < 2:
        return lines, []
    count = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
    held = set(random.Random(seed).sample(prompts, count))
    return ([line for line in lines if _prompt_key(line) not in held],
            [line for line in lines if _prompt_key(line) in held])


async def collect(db: Database, spec: DatasetSpec) -> Dataset:
    """`build` over the stored completions `spec` selects."""
    records = [r async for r in select_completions(db, spec.selection())]
    return build(records, spec)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def check(data: Dataset, spec: DatasetSpec) -> None:
    """Refuse a dataset with no lines, saying why."""
    if data.completions == 0:
        shown = json.dumps(spec.filters()) if spec.filters() else "none"
        raise DatasetError(f"no stored completions match the filters ({shown}); store "
                           "completions with `store: true` or STEER_STORE first")
    if not data.training:
        raise DatasetError(f"the {data.completions} matching stored completion(s) gave no "
                           f"{spec.kind} lines: skipped {dict(data.skipped)}", "kind")


async def export(db: Database, spec: DatasetSpec) -> Exported:
    """Build the dataset `spec` asks for and store it as a training File (and a validation
    File when a split was asked for and made)."""
    data = await collect(db, spec)
    check(data, spec)
    stem = (spec.filename or f"steer-{spec.kind}-{now()}").removesuffix(".jsonl")
    source = {"type": "stored_completions", "filters": spec.filters(),
              "completions": data.completions, "kind": spec.kind}
    training = await create_file(
        db, filename=f"{stem}.jsonl", purpose="fine-tune", content=jsonl(data.training),
        lines=len(data.training), kind=spec.kind, source={**source, "split": "training"})
    validation = None
    if data.validation:
        validation = await create_file(
            db, filename=f"{stem}-validation.jsonl", purpose="fine-tune",
            content=jsonl(data.validation), lines=len(data.validation), kind=spec.kind,
            source={**source, "split": "validation", "seed": spec.seed,
                    "fraction": spec.validation_fraction})
    return Exported(training, validation, data)
