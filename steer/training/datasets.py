"""Training files from Steer's own traffic: stored completions turned into OpenAI's chat SFT
lines (the request's messages plus the chosen answer) or OpenAI's preference (DPO) lines (the
chosen candidate of a search against lower-scored candidates of the same search).

`build` is pure (records in, lines and skip reasons out); `collect` streams the records from
the store in batches, building each batch in a thread (off the server's event loop), and
stops as soon as the lines outgrow the size cap; `export` splits off an optional validation
set (by prompt, seeded, so a prompt's lines never land on both sides) and writes the result
as Files.

Exceptions: `DatasetError` (nothing matches, or nothing usable came out), with the request
field to blame when there is one and an OpenAI error `code`; `DatasetTooLarge`, one of them,
when the lines would exceed the cap on a File (`STEER_MAX_FILE_BYTES`).
"""

from __future__ import annotations

import asyncio
import hashlib
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
BATCH = 200  # stored completions (with their traces) read and built at a time


class DatasetError(Exception):
    code = "no_training_data"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DatasetTooLarge(DatasetError):
    """The lines would outgrow the largest File this server stores."""

    code = "dataset_too_large"


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


class Builder:
    """`build`, one batch of records at a time: lines of `spec.kind`, deduplicated (same
    prompt and answer(s)) across batches, and their size as JSONL so far."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.data = Dataset()
        self.lines: list[dict[str, Any]] = []
        self.bytes = 0
        self._seen: set[bytes] = set()  # digests of the lines kept: a fraction of their size

    def add(self, records: Iterable[Record]) -> None:
        spec = self.spec
        for record in records:
            self.data.completions += 1
            made, reason = (sft_lines(record, spec.include_truncated) if spec.kind == "sft"
                            else preference_lines(record))
            if reason is not None:
                self.data.skipped[reason] += 1
            for line in made:
                key = hashlib.blake2b(_key(line).encode(), digest_size=16).digest()
                if spec.dedupe and key in self._seen:
                    self.data.skipped["duplicate"] += 1
                    continue
                self._seen.add(key)
                self.lines.append(line)
                self.bytes += len(_encode(line))

    def finish(self) -> Dataset:
        """The lines, split (`spec.validation_fraction` of the prompts, by `spec.seed`)."""
        self.data.training, self.data.validation = split(
            self.lines, self.spec.validation_fraction, self.spec.seed)
        return self.data


def build(records: Iterable[Record], spec: DatasetSpec) -> Dataset:
    """Lines of `spec.kind` from `records`, deduplicated (same prompt and answer(s)), then
    split (`spec.validation_fraction` of the prompts, chosen by `spec.seed`)."""
    builder = Builder(spec)
    builder.add(records)
    return builder.finish()


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


async def collect(db: Database, spec: DatasetSpec, max_bytes: int | None = None,
                  batch: int = BATCH) -> Dataset:
    """`build` over the stored completions `spec` selects, `batch` records at a time, each
    built in a thread; `DatasetTooLarge` as soon as the lines exceed `max_bytes` (so a huge
    selection is never held in memory, let alone written)."""
    builder = Builder(spec)
    records: list[Record] = []
    async for record in select_completions(db, spec.selection(), batch=batch):
        records.append(record)
        if len(records) == batch:
            await _add(builder, records, max_bytes)
            records = []
    await _add(builder, records, max_bytes)
    return await asyncio.to_thread(builder.finish)


async def _add(builder: Builder, records: list[Record], max_bytes: int | None) -> None:
    if records:
        await asyncio.to_thread(builder.add, records)
    if max_bytes is not None and builder.bytes > max_bytes:
        shown = json.dumps(builder.spec.filters()) if builder.spec.filters() else "none"
        raise DatasetTooLarge(
            f"the dataset would be larger than this server's largest file, {max_bytes} "
            f"bytes (STEER_MAX_FILE_BYTES): {builder.bytes} bytes of {builder.spec.kind} "
            f"lines from the first {builder.data.completions} matching stored completions "
            f"already; narrow the filters ({shown}: metadata, model, strategy, min_score, "
            "created_after, created_before) or raise the limit")


def _encode(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(_encode(line) for line in lines)


def check(data: Dataset, spec: DatasetSpec) -> None:
    """Refuse a dataset with no lines, saying why."""
    if data.completions == 0:
        shown = json.dumps(spec.filters()) if spec.filters() else "none"
        raise DatasetError(f"no stored completions match the filters ({shown}); store "
                           "completions with `store: true` or STEER_STORE first")
    if not data.training:
        raise DatasetError(f"the {data.completions} matching stored completion(s) gave no "
                           f"{spec.kind} lines: skipped {dict(data.skipped)}", "kind")


async def export(db: Database, spec: DatasetSpec, max_bytes: int | None = None) -> Exported:
    """Build the dataset `spec` asks for and store it as a training File (and a validation
    File when a split was asked for and made); `DatasetTooLarge` past `max_bytes` of lines
    (both Files together), before anything is stored."""
    data = await collect(db, spec, max_bytes)
    check(data, spec)
    stem = (spec.filename or f"steer-{spec.kind}-{now()}").removesuffix(".jsonl")
    source = {"type": "stored_completions", "filters": spec.filters(),
              "completions": data.completions, "kind": spec.kind}
    training = await create_file(
        db, filename=f"{stem}.jsonl", purpose="fine-tune",
        content=await asyncio.to_thread(jsonl, data.training),
        lines=len(data.training), kind=spec.kind, source={**source, "split": "training"})
    validation = None
    if data.validation:
        validation = await create_file(
            db, filename=f"{stem}-validation.jsonl", purpose="fine-tune",
            content=await asyncio.to_thread(jsonl, data.validation),
            lines=len(data.validation), kind=spec.kind,
            source={**source, "split": "validation", "seed": spec.seed,
                    "fraction": spec.validation_fraction})
    return Exported(training, validation, data)
