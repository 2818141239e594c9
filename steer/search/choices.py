"""Several choices for one steered request: independent searches, run together.

A request with `n > 1`, or a completions request with several prompts, runs one search per
choice, all at once. Every search submits a round's calls as soon as it reaches that round,
so the engine schedules the searches' calls of a round in the same steps (vLLM takes every
request added before its next step). Each search has its own session, so its own budget: a
budget is per choice, as `max_tokens` is. The caller sums their usage.

Does not own planning or the single search (`steer.search.runner`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from steer.engine import AdapterRef, Message, SamplingParams, StreamDelta
from steer.search.base import SteerResult
from steer.search.runner import Plan, Progress, Steerer

Item = Progress | StreamDelta | SteerResult


def choice_id(request_id: str, index: int, count: int) -> str:
    """The id a choice's search runs (and its trace is kept) under."""
    return request_id if count == 1 else f"{request_id}-{index}"


async def run_many(
    steerer: Steerer, plan: Plan, questions: Sequence[tuple[Message, ...]],
    params: SamplingParams, adapter: AdapterRef | None, request_id: str,
) -> list[SteerResult]:
    """One search per question (choice i answers questions[i]), all at once."""
    count = len(questions)
    tasks = [asyncio.ensure_future(_run_one(
        steerer, plan, q, params, adapter, choice_id(request_id, i, count), i))
        for i, q in enumerate(questions)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # one failed, or we were cancelled: the others stop too (their calls aborted)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return [task.result() for task in tasks]


async def _run_one(
    steerer: Steerer, plan: Plan, messages: tuple[Message, ...], params: SamplingParams,
    adapter: AdapterRef | None, request_id: str, index: int,
) -> SteerResult:
    result: SteerResult | None = None
    async for item in steerer.stream(plan, messages, params, adapter, request_id,
                                     stream_final=False, index=index):
        if isinstance(item, SteerResult):
            result = item
    assert result is not None
    return result


_END = object()


async def stream_many(
    steerer: Steerer, plan: Plan, questions: Sequence[tuple[Message, ...]],
    params: SamplingParams, adapter: AdapterRef | None, request_id: str,
) -> AsyncGenerator[Item, None]:
    """Every search's items, interleaved as they come; each carries its choice's index.
    The first failure ends the whole stream (and, on close, every search)."""
    count = len(questions)
    if count == 1:
        async for item in steerer.stream(plan, questions[0], params, adapter, request_id):
            yield item
        return
    queue: asyncio.Queue[Item | Exception | object] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Item, None]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(steerer.stream(
        plan, q, params, adapter, choice_id(request_id, i, count), index=i)))
        for i, q in enumerate(questions)]
    ended = 0
    try:
        while ended < count:
            got = await queue.get()
            if got is _END:
                ended += 1
            elif isinstance(got, Exception):
                raise got
            else:
                assert isinstance(got, Progress | StreamDelta | SteerResult)
                yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
