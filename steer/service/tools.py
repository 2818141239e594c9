"""Tool calling (OpenAI's function tools) for any model.

Owns: checking `tools`, `tool_choice` and the tool turns of a conversation (`plan_tools`,
`check_history`); the JSON Schema that constrains a forced call (`call_schema`: for
`required` one of the tools' `{"name", "arguments"}` objects, an array of them with parallel
calls; for a named function its arguments alone); reading calls back out of the model's
output, whole (`parse`) or as stream deltas (`ToolStream`).

`auto` leaves the choice to the model: the tools reach it through the chat template (the
engine renders them) and its own call syntax is read back by one of vLLM's tool parsers
(`--tool-call-parser`, `hermes` by default, the format of the packaged template). `none`
renders no tools and reads no calls.

Does not own: rendering a conversation (the engine's chat template), the HTTP edge
(`serving.py`), how strategies vote on or check a call (`steer.search`).
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from steer.critics.schemas import MAX_SCHEMA_BYTES, check_schema
from steer.engine import Constraint, Message, SamplingParams, Tool
from steer.engine import ToolCall as EngineToolCall
from steer.service import structured
from steer.service.errors import APIError, bad_request
from steer.service.protocol import (
    AssistantMessage,
    CallFunction,
    ChatCompletionRequest,
    ChatMessage,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    FunctionTool,
    NamedToolChoice,
    ToolCall,
)

logger = logging.getLogger(__name__)

Mode = Literal["auto", "required", "named"]
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# References a forced call's combined schema cannot move: they are resolved by URI, not by
# a JSON pointer from the root, so hoisting a tool's schema under another root breaks them.
_UNMOVABLE = ("$id", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of one generation: which tools, how the call is chosen,
    and (for a forced call) the JSON Schema decoding is constrained to."""

    tools: tuple[FunctionTool, ...]
    mode: Mode
    parallel: bool
    name: str | None = None  # the named function (mode "named")
    schema: dict[str, Any] | None = None  # required / named: what the output must match
    schema_param: str = "tools"  # the field a refusal of `schema` names

    @property
    def constrained(self) -> bool:
        return self.schema is not None

    def constraint(self) -> Constraint | None:
        """What decoding follows: a forced call's schema (None for `auto`)."""
        if self.schema is None:
            return None
        return structured.constraint_for_schema(self.schema, self.schema_param)

    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}


# -- checks -----------------------------------------------------------------------------------


def check_history(messages: Sequence[ChatMessage]) -> None:
    """Tool turns must make sense: calls only on assistant messages, and each tool message
    answers a call an earlier assistant message made (400 naming the message)."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"messages.{i}: only assistant messages carry tool_calls",
                              f"messages.{i}.tool_calls")
        if m.tool_call_id is not None and m.role != "tool":
            raise bad_request(f"messages.{i}: only tool messages carry a tool_call_id",
                              f"messages.{i}.tool_call_id")
        if m.tool_calls:
            called.update(call.id for call in m.tool_calls)
        if m.role == "tool":
            if m.tool_call_id is None:
                raise bad_request(f"messages.{i}: a tool message needs the tool_call_id of "
                                  "the call it answers", f"messages.{i}.tool_call_id")
            if m.tool_call_id not in called:
                raise bad_request(
                    f"messages.{i}: a message with role 'tool' must answer a tool call of an "
                    f"earlier assistant message; no call has the id {m.tool_call_id[:80]!r}",
                    f"messages.{i}",
                )


def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool calling, checked (400s naming the field); None when no call can
    happen (no tools, or `tool_choice: "none"`)."""
    check_history(req.messages)
    choice = req.tool_choice
    if req.tools is None:
        if choice is not None:
            raise bad_request("tool_choice is only allowed when tools are specified",
                              "tool_choice")
        return None
    tools = tuple(req.tools)
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise bad_request(f"tools: the function name {name!r} is given twice",
                              f"tools.{i}.function.name")
        seen.add(name)
        _check_parameters(tool, f"tools.{i}.function.parameters")
    total = sum(len(json.dumps(parameters_of(t))) for t in tools)
    if total > MAX_SCHEMA_BYTES:
        # Every schema is checked (and rendered into the prompt) per request: the tools
        # together get the bound one schema has.
        raise bad_request(f"tools: the functions' parameters are {total} bytes as JSON "
                          f"together; at most {MAX_SCHEMA_BYTES}", "tools")
    if choice == "none":
        return None
    parallel = req.parallel_tool_calls is not False  # OpenAI's default: true
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in seen:
            raise bad_request(
                f"tool_choice names the function {name[:80]!r}, which is not among tools "
                f"({', '.join(sorted(seen))})", "tool_choice")
        i = next(i for i, t in enumerate(tools) if t.function.name == name)
        return ToolPlan(tools, "named", parallel=False, name=name,
                        schema=copy.deepcopy(parameters_of(tools[i])),
                        schema_param=f"tools.{i}.function.parameters")
    if choice == "required":
        return ToolPlan(tools, "required", parallel, schema=call_schema(tools, parallel))
    return ToolPlan(tools, "auto", parallel)


def parameters_of(tool: FunctionTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def _check_parameters(tool: FunctionTool, param: str) -> None:
    schema = tool.function.parameters
    if schema is None:
        return
    if schema.get("type", "object") != "object":
        raise bad_request(f"{param}: a function's parameters must be a JSON Schema of type "
                          f"'object', not {schema.get('type')!r}", param)
    try:
        check_schema(schema)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from exc


# -- the schema of a forced call ----------------------------------------------------------------


def call_schema(tools: Sequence[FunctionTool], parallel: bool) -> dict[str, Any]:
    """What `tool_choice: "required"` constrains decoding to: one `{"name", "arguments"}`
    object of one of the tools (`oneOf` over them; the names are consts, so exactly one
    matches), or with parallel calls a non-empty array of them. Each tool's `$defs` move to
    the root (renamed per tool) and its `#` references are rewritten to follow them."""
    defs: dict[str, Any] = {}
    options = []
    for i, tool in enumerate(tools):
        arguments = _hoisted(parameters_of(tool), i, defs, f"tools.{i}.function.parameters")
        options.append({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    one: dict[str, Any] = options[0] if len(options) == 1 else {"oneOf": options}
    schema: dict[str, Any] = {"type": "array", "items": one, "minItems": 1} if parallel else one
    if defs:
        schema = {**schema, "$defs": defs}
    try:
        return check_schema(schema)  # the caps hold for the combination too
    except ValueError as exc:
        raise bad_request(f"tools: together the tools' schemas are too large: {exc}",
                          "tools") from exc


def _hoisted(schema: dict[str, Any], i: int, defs: dict[str, Any], param: str) -> dict[str, Any]:
    """Tool `i`'s parameters for a place under another root: its definitions go into `defs`
    as `tool{i}_<name>`; when anything refers into it, the schema itself goes there as
    `tool{i}` and the returned schema is a reference to it."""
    schema = copy.deepcopy(schema)
    refs = [node for node in _dicts(schema) if isinstance(node.get("$ref"), str)]
    if not refs:
        return schema
    if any(key in node for node in _dicts(schema) for key in _UNMOVABLE):
        raise bad_request(f"{param}: with tool_choice 'required' a tool's schema may refer "
                          "only by JSON pointer ('#/...'), not through $id or anchors", param)
    own: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        own.update(schema.pop(key, None) or {})
    root = f"tool{i}"
    # `refs` already holds the references inside the definitions (found before they were
    # popped): each is rewritten once.
    for node in refs:
        node["$ref"] = _moved_ref(node["$ref"], root)
    for key, sub in own.items():
        defs[f"{root}_{key}"] = sub
    defs[root] = schema
    return {"$ref": f"#/$defs/{root}"}


def _moved_ref(ref: str, root: str) -> str:
    pointer = ref[1:] if ref.startswith("#") else ref
    for section in ("/$defs/", "/definitions/"):
        if pointer.startswith(section):
            name, _, rest = pointer[len(section):].partition("/")
            return f"#/$defs/{root}_{name}" + (f"/{rest}" if rest else "")
    return f"#/$defs/{root}{pointer}"


def _dicts(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# -- what the engine and the strategies get ---------------------------------------------------

# Strategies that keep the conversation (and so its tools) and the constraint on every
# candidate, and pick a whole candidate: the returned answer is one of the calls generated.
STEERABLE = frozenset({"none", "best_of_n", "self_consistency"})


def engine_messages(req: ChatCompletionRequest, plan: ToolPlan | None) -> list[Message]:
    """The conversation as the engine renders it: calls and results in their own fields,
    and the tools (unless `tool_choice` is `none`) on its first message."""
    out = [
        Message(
            role="system" if m.role == "developer" else m.role,
            content=m.text(),
            tool_calls=tuple(EngineToolCall(c.id, c.function.name, c.function.arguments)
                             for c in m.tool_calls or ()),
            tool_call_id=m.tool_call_id,
            name=m.name,
        )
        for m in req.messages
    ]
    if plan is not None:
        offered = tuple(
            Tool(t.function.name, t.function.description,
                 None if t.function.parameters is None else json.dumps(t.function.parameters))
            for t in plan.tools
        )
        out[0] = replace(out[0], tools=offered)
    return out


def with_constraint(params: SamplingParams, plan: ToolPlan | None) -> SamplingParams:
    """A forced call's schema is what decoding follows; it takes the place of a
    `response_format` (which then applies to no content: a forced answer has none)."""
    constraint = plan.constraint() if plan is not None else None
    return params if constraint is None else replace(params, constraint=constraint)


def check_steering(plan: ToolPlan | None, strategy: str) -> None:
    """Which strategies can steer a tool call (400 naming the field otherwise)."""
    if plan is None or strategy == "none":
        return
    if strategy not in STEERABLE:
        raise bad_request(
            f"tools: the steering strategy {strategy!r} does not work with tool calls (it "
            "rewrites the conversation or composes an answer from several generations); "
            f"use one of {', '.join(sorted(STEERABLE - {'none'}))}", "tools")
    if not plan.constrained:
        raise bad_request(
            f"tool_choice: with the steering strategy {strategy!r}, ask for 'required' or a "
            "named function: under 'auto' candidates may be text or calls, which neither a "
            "vote nor a critic can compare", "tool_choice")


# -- reading calls back -----------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A generation read as an answer: its text (None when it is only calls) and calls."""

    content: str | None
    calls: tuple[ToolCall, ...] = ()

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=call_id(), function=CallFunction(name=name, arguments=arguments))


def parse_forced(plan: ToolPlan, text: str) -> Parsed:
    """A constrained generation (required / named) as calls. A named call is always a call
    (its arguments as generated, even cut short by max_tokens: OpenAI's behaviour); a
    `required` answer that is not a complete call (cut short) stays text."""
    if plan.mode == "named":
        assert plan.name is not None
        return Parsed(None, (_call(plan.name, text.strip()),))
    value = _loads(text)
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in plan.names()
                and isinstance(item.get("arguments"), dict)):
            return Parsed(text)
        calls.append(_call(item["name"], json.dumps(item["arguments"], ensure_ascii=False)))
    return Parsed(None, tuple(calls)) if calls else Parsed(text)


class AutoParser:
    """One of vLLM's tool parsers (by `--tool-call-parser` name) for one choice of one
    request: it keeps streaming state, so each choice gets its own."""

    def __init__(self, parser_cls: Any, tokenizer: Any, plan: ToolPlan) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VllmRequest,
        )

        self.plan = plan
        self._parser = parser_cls(tokenizer)
        # The parsers read the tools (some check names against them) from vLLM's request.
        self._request = VllmRequest.model_validate({
            "model": "steer", "messages": [{"role": "user", "content": ""}],
            "tool_choice": "auto", "tools": [t.model_dump(exclude_none=True) for t in plan.tools],
        })
        self._text = ""

    def parse(self, text: str) -> Parsed:
        info = self._parser.extract_tool_calls(text, self._request)
        if not info.tools_called:
            return Parsed(text)
        calls = [_call(c.function.name, c.function.arguments) for c in info.tool_calls]
        if not calls or any(c.function.name not in self.plan.names() for c in calls):
            return Parsed(text)  # a call of a function never offered is no call
        if not self.plan.parallel:
            calls = calls[:1]  # parallel_tool_calls: false means at most one call
        return Parsed(info.content or None, tuple(calls))

    def feed(self, delta_text: str) -> tuple[str | None, list[tuple[int, str | None, str]]]:
        """New content, and call pieces `(index, name when it first appears, argument
        text)`, since the previous piece of this choice."""
        previous, self._text = self._text, self._text + delta_text
        out = self._parser.extract_tool_calls_streaming(
            previous, self._text, delta_text, [], [], [], self._request)
        if out is None:
            return None, []
        pieces = []
        for call in out.tool_calls or ():
            fn = call.function
            if fn is None:
                continue
            if not isinstance(fn, dict):
                fn = fn.model_dump(exclude_none=True)
            pieces.append((call.index, fn.get("name"), fn.get("arguments") or ""))
        return out.content or None, pieces


ParserFactory = Callable[[ToolPlan], AutoParser]


def vllm_parsers(name: str, tokenizer: Any) -> ParserFactory:
    """A factory of `name`'s parser (a KeyError for a name vLLM does not know)."""
    from vllm.tool_parsers import ToolParserManager

    parser_cls = ToolParserManager.get_tool_parser(name)
    return lambda plan: AutoParser(parser_cls, tokenizer, plan)


def require_parser(plan: ToolPlan | None, parsers: ParserFactory | None) -> None:
    """`auto` reads calls with a parser: without one, refuse before generating (400)."""
    if plan is not None and not plan.constrained and parsers is None:
        raise APIError(400, "tool_choice 'auto' needs a tool-call parser, and this server has "
                       "none (--tool-call-parser); ask for 'required' or a named function",
                       param="tool_choice")


def parse(plan: ToolPlan, text: str, parsers: ParserFactory | None) -> Parsed:
    if plan.constrained:
        return parse_forced(plan, text)
    require_parser(plan, parsers)
    assert parsers is not None
    return parsers(plan).parse(text)


Answer = Callable[[str, str], tuple[AssistantMessage, str]]


def answerer(plan: ToolPlan | None, parsers: ParserFactory | None) -> Answer | None:
    """`answer` for one request (None without tools: the text is the content)."""
    if plan is None:
        return None
    require_parser(plan, parsers)
    return lambda text, finish_reason: answer(plan, text, finish_reason, parsers)


def answer(plan: ToolPlan | None, text: str, finish_reason: str,
           parsers: ParserFactory | None) -> tuple[AssistantMessage, str]:
    """A generation as the assistant message OpenAI returns, and its finish reason."""
    if plan is None:
        return AssistantMessage(content=text), finish_reason
    parsed = parse(plan, text, parsers)
    return (AssistantMessage(content=parsed.content, tool_calls=list(parsed.calls) or None),
            parsed.finish_reason(finish_reason))


# -- streaming ----------------------------------------------------------------------------------


@dataclass
class _Call:
    id: str
    name: str
    sent: str = ""  # argument text sent so far


@dataclass
class _Choice:
    text: str = ""
    calls: dict[int, _Call] = field(default_factory=dict)
    content_sent: bool = False
    auto: AutoParser | None = None


class ToolStream:
    """Turns one streamed request's text deltas into OpenAI's deltas: content, or tool-call
    pieces (the first piece of a call with its id, type and name, then argument text).

    A named call streams its arguments as they are generated; `auto` streams what vLLM's
    parser finds as it goes; `required` is read once its JSON is complete (a partial
    `{"name": ...}` object is not a call yet), at the end of the choice. Every choice ends by
    checking the streamed calls against the whole output parsed at once, sending what the
    incremental reading held back."""

    def __init__(self, plan: ToolPlan, parsers: ParserFactory | None) -> None:
        require_parser(plan, parsers)
        self.plan = plan
        self._parsers = parsers
        self._choices: dict[int, _Choice] = {}

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice()
            if not self.plan.constrained:
                assert self._parsers is not None
                choice.auto = self._parsers(self.plan)
        return choice

    def feed(self, index: int, text: str) -> list[Delta]:
        choice = self._choice(index)
        choice.text += text
        if self.plan.mode == "named":
            assert self.plan.name is not None
            piece = text if choice.calls else text.lstrip()
            if not piece:
                return []
            return [self._piece(choice, 0, self.plan.name, piece)]
        if choice.auto is None:
            return []  # required: read whole at the end
        content, pieces = choice.auto.feed(text)
        deltas = []
        if content:
            choice.content_sent = True
            deltas.append(Delta(content=content))
        for i, name, arguments in pieces:
            if i not in choice.calls and name not in self.plan.names():
                continue  # no name yet, or one never offered: the whole parse decides
            if i > 0 and not self.plan.parallel:
                continue
            deltas.append(self._piece(choice, i, name or choice.calls[i].name, arguments))
        return deltas

    def _piece(self, choice: _Choice, i: int, name: str, arguments: str) -> Delta:
        call = choice.calls.get(i)
        if call is None:
            call = choice.calls[i] = _Call(call_id(), name, arguments)
            fn = DeltaFunction(name=name, arguments=arguments)
            return Delta(tool_calls=[DeltaToolCall(index=i, id=call.id, type="function",
                                                   function=fn)])
        call.sent += arguments
        return Delta(tool_calls=[DeltaToolCall(index=i, function=DeltaFunction(
            arguments=arguments))])

    def finish(self, index: int, reason: str) -> tuple[list[Delta], str]:
        """What is left to send of choice `index`, and its finish reason."""
        choice = self._choice(index)
        if self.plan.mode == "named":
            return [], ("tool_calls" if reason == "stop" else reason)
        whole = parse(self.plan, choice.text, self._parsers)
        if not whole.calls:
            if choice.calls:  # streamed pieces the whole parse disowns: cannot be unsent
                logger.warning("streamed tool call pieces not confirmed by the whole output")
                return [], reason
            unsent = choice.text if not choice.content_sent else ""
            return ([Delta(content=unsent)] if unsent else []), reason
        deltas = []
        for i, call in enumerate(whole.calls):
            streamed = choice.calls.get(i)
            if streamed is None:
                deltas.append(self._piece(choice, i, call.function.name, ""))
                streamed = choice.calls[i]
            rest = call.function.arguments
            if rest.startswith(streamed.sent):
                rest = rest[len(streamed.sent):]
            elif streamed.sent:
                logger.warning("streamed arguments of call %d differ from the whole parse", i)
                continue
            if rest:
                deltas.append(self._piece(choice, i, call.function.name, rest))
        return deltas, whole.finish_reason(reason)
