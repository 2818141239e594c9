"""Graders for graded (reinforcement) training: OpenAI's grader shapes, mapped onto Steer
critics so the engine-batched search scores every candidate with them.

Accepted (`parse_grader`), with what maps and what does not:

- `string_check` (`input` must be `{{sample.output_text}}`; `reference` a template over
  `{{item.<field>}}`): `eq` with a numeric reference means "the output's final number is the
  reference" (Steer's `exact_answer` critic, `extract: last_number`: samples are free text,
  reasoning included); `eq` with any other reference is the whole output (stripped) equal to
  it and `like` / `ilike` the output containing it (case-folded for `ilike`), both as Steer's
  `regex` critic over an escaped pattern; `ne` is not `eq`.
- `text_similarity`, `evaluation_metric: "fuzzy_match"` only (difflib's ratio); the other
  metrics are refused.
- `score_model`: Steer's `llm_judge` (yes/no verdict from one token's logprobs). Maps: the
  instructions in `input` (with `{{item.x}}` filled) become its rubric; `model` its adapter
  (none when it names the base model); `range` scales `pass_threshold`. Does not map: the
  exact prompt (Steer's judge fences the candidate in its own prompt), `sampling_params`
  (refused), non-text content (refused).
- `multi`: `graders` (a dict name -> `string_check` / `text_similarity`) and
  `calculate_output`, a formula over their names (`formula`).
- `steer_critic`: `{"type": "steer_critic", "critic": <steering.critic spec>}`, any Steer
  critic by name, `{{item.x}}` filled in its string fields.
- `python` and `label_model` are refused: Steer never runs client-supplied code.

Every grader also takes `pass_threshold` (a Steer extension): a sample passes when its score
reaches it. Scores are on [0, 1] (a formula's value is clipped to it; a `score_model`'s
threshold is in its `range`'s units). Defaults: 1.0 (full marks), a `score_model` range's
midpoint.

Graders with no native critic (`ne`, `text_similarity`, `multi`, a reference too long for a
pattern) score through the `python` critic `steer_grader`, which is this module's
`grade_text`; importing this module registers it (server-side code, not the client's).

Exceptions: `GraderError(message, param)`, `param` the request field at fault
(`method.reinforcement.grader.<field>`), or `item` for a line that lacks a field.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steer.critics import CRITICS, Candidate, CriticError, Question, Score
from steer.critics.extract import last_number, normalize_reference
from steer.critics.patterns import compile_pattern
from steer.critics.rules import register_python_critic
from steer.engine import AdapterRef, Generation, Message, Prompt, SamplingParams
from steer.training import formula

PARAM = "method.reinforcement.grader"
PYTHON_CRITIC = "steer_grader"
SAMPLE_TEXT = "sample.output_text"
MAX_FUZZY_CHARS = 4000  # difflib is quadratic in the worst case: compare heads only
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}")
_NUMERIC = re.compile(r"\s*-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)\s*")
_KEY = re.compile(r"^[A-Za-z_]\w{0,63}$")


class GraderError(ValueError):
    def __init__(self, message: str, param: str | None = PARAM) -> None:
        super().__init__(message)
        self.param = param


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field("grader", max_length=256)
    pass_threshold: float | None = None


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: str = Field(max_length=256)
    reference: str = Field(max_length=4096)
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    input: str = Field(max_length=256)
    reference: str = Field(max_length=4096)
    evaluation_metric: Literal["fuzzy_match"]


class ScoreModelInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["user", "assistant", "system", "developer"]
    content: str = Field(max_length=4096)
    type: Literal["message"] | None = None


class ScoreModelGrader(_Grader):
    type: Literal["score_model"]
    model: str = Field(max_length=256)
    input: list[ScoreModelInput] = Field(min_length=1, max_length=16)
    range: list[float] | None = Field(None, min_length=2, max_length=2)


SubGrader = Annotated[StringCheckGrader | TextSimilarityGrader, Field(discriminator="type")]


class MultiGrader(_Grader):
    type: Literal["multi"]
    graders: dict[str, SubGrader] = Field(min_length=1, max_length=16)
    calculate_output: str = Field(max_length=formula.MAX_CHARS)


class SteerCriticGrader(_Grader):
    type: Literal["steer_critic"]
    critic: dict[str, Any]


Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | ScoreModelGrader | MultiGrader | SteerCriticGrader,
    Field(discriminator="type"),
]
TYPES = ("string_check", "text_similarity", "score_model", "multi", "steer_critic")
_REFUSED = {
    "python": "python graders run client-supplied code, which Steer never does; use "
              "string_check, text_similarity, multi, score_model, or steer_critic (any Steer "
              "critic, e.g. exact_answer, regex, json_schema)",
    "label_model": "label_model graders are not supported; use score_model (Steer's llm_judge) "
                   "or steer_critic",
}


class _Holder(BaseModel):
    grader: Grader


# -- parsing -------------------------------------------------------------------------------


def parse_grader(raw: Any, param: str = PARAM) -> Grader:
    """The grader a request names, checked whole; GraderError naming the field."""
    _precheck(raw, param)
    try:
        grader = _Holder.model_validate({"grader": raw}).grader
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())[1:] if str(p) not in TYPES]
        where = ".".join([param, *loc])
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            message = "unknown field"
        elif err.get("type") == "missing":
            message = "field required"
        raise GraderError(f"Invalid value for '{where}': {message}", where) from None
    _check(grader, param)
    return grader


def _precheck(raw: Any, param: str) -> None:
    if not isinstance(raw, dict):
        raise GraderError("a grader must be an object", param)
    kind = raw.get("type")
    if kind in _REFUSED:
        raise GraderError(_REFUSED[kind], f"{param}.type")
    if kind not in TYPES:
        raise GraderError(f"grader type {kind!r} is not one of {', '.join(TYPES)}",
                          f"{param}.type")
    if kind == "text_similarity" and raw.get("evaluation_metric") != "fuzzy_match":
        raise GraderError(f"evaluation_metric {raw.get('evaluation_metric')!r} is not supported "
                          "here; only fuzzy_match", f"{param}.evaluation_metric")
    if kind == "score_model" and raw.get("sampling_params") is not None:
        raise GraderError("sampling_params does not apply: Steer's judge reads one verdict "
                          "token greedily", f"{param}.sampling_params")
    if kind == "multi" and isinstance(raw.get("graders"), dict):
        for key, sub in raw["graders"].items():
            at = f"{param}.graders.{key}"
            if not isinstance(key, str) or not _KEY.match(key) or key in formula.FUNCTIONS:
                raise GraderError(f"sub-grader name {key!r} must be an identifier (not min, "
                                  "max, abs), for calculate_output to name it", at)
            _precheck(sub, at)
            if isinstance(sub, dict) and sub.get("type") not in ("string_check",
                                                                  "text_similarity"):
                raise GraderError("a multi grader's sub-graders must need no model: "
                                  "string_check or text_similarity", f"{at}.type")


def _check(grader: Grader, param: str) -> None:
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader):
        _check_text_grader(grader, param)
    elif isinstance(grader, MultiGrader):
        for key, sub in grader.graders.items():
            _check(sub, f"{param}.graders.{key}")
        try:
            formula.parse(grader.calculate_output, grader.graders)
        except formula.FormulaError as exc:
            raise GraderError(f"calculate_output: {exc}", f"{param}.calculate_output") from None
    elif isinstance(grader, ScoreModelGrader):
        lo, hi = grader.range or (0.0, 1.0)
        if not lo < hi:
            raise GraderError("range must be [low, high] with low < high", f"{param}.range")
        for i, message in enumerate(grader.input):
            _item_only(message.content, f"{param}.input.{i}.content", allow_sample=True)
    else:
        _critic_spec(grader.critic, {}, f"{param}.critic", placeholder=True)
    t = grader.pass_threshold
    lo, hi = (grader.range or (0.0, 1.0)) if isinstance(grader, ScoreModelGrader) else (0.0, 1.0)
    if t is not None and not lo <= t <= hi:
        raise GraderError(f"pass_threshold must be within [{lo}, {hi}]",
                          f"{param}.pass_threshold")


def _check_text_grader(grader: StringCheckGrader | TextSimilarityGrader, param: str) -> None:
    fields = _TEMPLATE.findall(grader.input)
    if fields != [SAMPLE_TEXT] or _TEMPLATE.sub("", grader.input).strip():
        raise GraderError("input must be {{sample.output_text}} (Steer's samples are text)",
                          f"{param}.input")
    _item_only(grader.reference, f"{param}.reference")


def _item_only(template: str, param: str, allow_sample: bool = False) -> None:
    for field in _TEMPLATE.findall(template):
        if field == SAMPLE_TEXT and allow_sample:
            continue
        if not field.startswith("item.") or len(field) == len("item."):
            raise GraderError(f"{{{{{field}}}}} is not a template this grader can fill; use "
                              "{{item.<field>}}", param)


# -- templates -----------------------------------------------------------------------------


def item_fields(grader: Grader) -> set[str]:
    """The item fields (top-level names) the grader reads, e.g. {"reference"}."""
    if isinstance(grader, MultiGrader):
        return set().union(*(item_fields(g) for g in grader.graders.values()))
    texts: list[str] = []
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader):
        texts = [grader.reference]
    elif isinstance(grader, ScoreModelGrader):
        texts = [m.content for m in grader.input]
    else:
        texts = list(_strings(grader.critic))
    return {f.removeprefix("item.").split(".")[0] for t in texts
            for f in _TEMPLATE.findall(t) if f.startswith("item.")}


def check_items(grader: Grader, lines: Sequence[dict[str, Any]],
                param: str = "training_file") -> None:
    """Every line has the fields the grader reads, else GraderError naming the first."""
    for number, line in enumerate(lines, 1):
        missing = sorted(f for f in item_fields(grader) if f not in line)
        if missing:
            raise GraderError(f"line {number}: the grader reads {{{{item.{missing[0]}}}}}, "
                              "which the line lacks", param)


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _value(item: dict[str, Any], field: str) -> Any:
    node: Any = item
    for part in field.removeprefix("item.").split("."):
        if not isinstance(node, dict) or part not in node:
            raise GraderError(f"the item has no field '{field.removeprefix('item.')}'", "item")
        node = node[part]
    return node


def fill(template: str, item: dict[str, Any]) -> str:
    """`template` with every `{{item.x}}` replaced by the item's value (as text)."""
    def one(match: re.Match[str]) -> str:
        if match.group(1) == SAMPLE_TEXT:
            return match.group(0)
        value = _value(item, match.group(1))
        return value if isinstance(value, str) else _text(value)

    return _TEMPLATE.sub(one, template)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fill_any(node: Any, item: dict[str, Any]) -> Any:
    """Fill templates in every string; a string that is one template keeps the value's type."""
    if isinstance(node, str):
        whole = _TEMPLATE.fullmatch(node.strip())
        if whole and whole.group(1).startswith("item."):
            return _value(item, whole.group(1))
        return fill(node, item)
    if isinstance(node, dict):
        return {k: _fill_any(v, item) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_any(v, item) for v in node]
    return node


def _placeholders(node: Any) -> Any:
    """Every template replaced by "0", to check a critic spec before any item fills it."""
    if isinstance(node, str):
        return _TEMPLATE.sub("0", node)
    if isinstance(node, dict):
        return {k: _placeholders(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_placeholders(v) for v in node]
    return node


# -- Steer critics -------------------------------------------------------------------------


def _critic_spec(spec: dict[str, Any], item: dict[str, Any], param: str,
                 placeholder: bool = False) -> dict[str, Any]:
    """A `steering.critic` spec with the item's fields filled, checked as the search layer
    will check it (name, then options)."""
    name = spec.get("name")
    if not isinstance(name, str) or name not in CRITICS:
        raise GraderError(f"unknown critic {name!r}; critics: {', '.join(sorted(CRITICS))}",
                          f"{param}.name")
    filled = _placeholders(spec) if placeholder else _fill_any(spec, item)
    options = filled.get("options", {})
    if not isinstance(options, dict):
        raise GraderError("critic options must be an object", f"{param}.options")
    if not isinstance(filled.get("adapter", ""), str):
        raise GraderError("critic adapter must be a name", f"{param}.adapter")
    flat = {k: v for k, v in filled.items() if k not in ("name", "adapter", "options")}
    try:
        CRITICS[name].Options.model_validate({**options, **flat})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([param, *(str(p) for p in err.get("loc", ()))])
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise GraderError(f"Invalid value for '{where}': {message}", where) from None
    return dict(filled)


def _escape(text: str) -> str:
    """A pattern matching `text` literally; every ASCII sign as \\xHH, which RE2 reads the
    same in any context (Python's re.escape writes escapes RE2 refuses)."""
    return "".join(c if c.isalnum() or not c.isascii() else f"\\x{ord(c):02x}" for c in text)


def _rubric(grader: ScoreModelGrader, item: dict[str, Any]) -> str:
    said = " ".join(
        re.sub(r"\{\{\s*sample\.output_text\s*\}\}", "the candidate answer", fill(m.content, item))
        for m in grader.input if m.role != "assistant"
    )
    return ("correct according to these grading instructions: " + " ".join(said.split()))[:2000]


def to_critic(grader: Grader, item: dict[str, Any], *, base_model: str | None = None,
              ) -> dict[str, Any]:
    """The `steering.critic` spec that scores a candidate as `grader` would for `item`.
    `base_model`: the served base, which a score_model's `model` may name (no adapter)."""
    if isinstance(grader, StringCheckGrader):
        ref = fill(grader.reference, item)
        if grader.operation == "eq" and _NUMERIC.fullmatch(ref):
            return {"name": "exact_answer", "reference": ref.strip(), "extract": "last_number"}
        if grader.operation != "ne":
            pattern = ("(?i)" if grader.operation == "ilike" else "") + _escape(ref)
            try:
                compile_pattern(pattern)
            except ValueError:  # too long or too big for RE2: the python critic instead
                pass
            else:
                mode = "fullmatch" if grader.operation == "eq" else "search"
                return {"name": "regex", "pattern": pattern, "mode": mode}
    if isinstance(grader, ScoreModelGrader):
        spec: dict[str, Any] = {"name": "llm_judge", "mode": "yes_no",
                                "rubric": _rubric(grader, item)}
        if grader.model != base_model:
            spec["adapter"] = grader.model
        return spec
    if isinstance(grader, SteerCriticGrader):
        return _critic_spec(grader.critic, item, f"{PARAM}.critic")
    fields = item_fields(grader)
    grade_text(grader, item, "")  # every field the grader reads is there (GraderError if not)
    return {"name": "python", "function": PYTHON_CRITIC, "kwargs": {
        "grader": grader.model_dump(mode="json", exclude_none=True),
        "item": {f: item[f] for f in sorted(fields)},
    }}


def threshold(grader: Grader) -> float:
    """The score on [0, 1] a sample needs to pass."""
    if isinstance(grader, ScoreModelGrader):
        lo, hi = grader.range or (0.0, 1.0)
        t = grader.pass_threshold if grader.pass_threshold is not None else (lo + hi) / 2
        return (t - lo) / (hi - lo)
    return grader.pass_threshold if grader.pass_threshold is not None else 1.0


def passes(grader: Grader, score: float) -> bool:
    return score >= threshold(grader) - 1e-9


# -- scoring without the search ------------------------------------------------------------


def grade_text(grader: Grader, item: dict[str, Any], text: str) -> float:
    """The score on [0, 1] `grader` gives `text` for `item`, for graders that need no model
    or critic (string_check, text_similarity, multi); the same as their critic's."""
    if isinstance(grader, StringCheckGrader):
        ref = fill(grader.reference, item)
        if grader.operation in ("eq", "ne"):
            if _NUMERIC.fullmatch(ref):
                same = last_number(text) == normalize_reference("last_number", ref.strip())
            else:
                same = text.strip() == ref
            return float(same == (grader.operation == "eq"))
        hay = text.strip()
        if grader.operation == "ilike":
            return float(ref.lower() in hay.lower())
        return float(ref in hay)
    if isinstance(grader, TextSimilarityGrader):
        ref = fill(grader.reference, item)
        return difflib.SequenceMatcher(None, text.strip()[:MAX_FUZZY_CHARS],
                                       ref.strip()[:MAX_FUZZY_CHARS]).ratio()
    if isinstance(grader, MultiGrader):
        values = {k: grade_text(g, item, text) for k, g in grader.graders.items()}
        value = formula.evaluate(formula.parse(grader.calculate_output, values), values)
        return min(1.0, max(0.0, value))
    raise GraderError(f"a {grader.type} grader scores through its critic: use grade()", None)


class _NoModel:
    """The model caller for grading outside a search: model-free critics never call it."""

    async def generate(self, prompts: Sequence[Prompt], params: SamplingParams, role: str,
                       adapter: AdapterRef | None = None) -> list[Generation]:
        raise CriticError("this critic needs a model; grade through the search instead")

    async def context_room(self, prompt: Prompt) -> int:
        raise CriticError("this critic needs a model; grade through the search instead")


async def grade(grader: Grader, item: dict[str, Any], texts: Sequence[str],
                question: str = "") -> list[float]:
    """Scores of `texts` without the search: `grade_text`, or a model-free Steer critic run
    here (a `steer_critic` naming e.g. exact_answer); GraderError for those needing a model."""
    if isinstance(grader, ScoreModelGrader):
        raise GraderError("a score_model grader needs the model: grade through the search", None)
    if not isinstance(grader, SteerCriticGrader):
        return [grade_text(grader, item, t) for t in texts]
    spec = to_critic(grader, item)
    cls = CRITICS[spec["name"]]
    if cls.needs_model:
        raise GraderError(f"the {cls.name} critic needs the model: grade through the search", None)
    flat = {k: v for k, v in spec.items() if k not in ("name", "adapter", "options")}
    critic = cls(cls.Options.model_validate({**spec.get("options", {}), **flat}))
    scores: list[Score] = await critic.score(
        _NoModel(), Question((Message("user", question),)), [Candidate(t) for t in texts])
    return [s.value for s in scores]


def _steer_grader(question: str, candidate: str, *, grader: dict[str, Any],
                  item: dict[str, Any]) -> float:
    """The `python` critic behind graders with no native critic."""
    return grade_text(parse_grader(grader), item, candidate)


register_python_critic(PYTHON_CRITIC, _steer_grader)
