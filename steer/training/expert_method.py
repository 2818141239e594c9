"""The reinforcement method of a fine-tuning job, in OpenAI's shape with Steer's extras:
its pydantic models, defaults, and `parse_method`, which validates it (at job creation and
again when the job runs) and resolves the defaults into a `Config`.

The method::

    {"type": "reinforcement", "reinforcement": {
        "grader": <an OpenAI/Steer grader (steer.training.graders)>
                | {"type": "agreement", "threshold": 0.5, "extract": "last_number"},
        "hyperparameters": {
            # OpenAI's, for each round's supervised training (and the search's width):
            "n_epochs", "batch_size", "learning_rate_multiplier": int/float or "auto",
            "compute_multiplier": scales `samples` ("auto" = 1),
            "eval_interval", "eval_samples": "auto" only (one evaluation per round),
            "reasoning_effort": "default" only,
            # Steer's:
            "rounds": 2, "samples": 8 (per prompt), "temperature": 0.7 (0.4 label-free:
            DESIGN measured self-consistency at 0.4 above 0.8 on the default model),
            "max_tokens": 128, "keep_per_prompt": null (all passing samples, deduped) or k,
            "accumulate": true (train on every round's kept samples; false: this round's
            only, as ReST-EM does), "concurrency": 16 (search requests in flight)},
        "steering": null | a Steer steering spec for the search (strategy, options, critic,
            budget, template); default best_of_n with n=samples and the grader as critic
            (label-free: self_consistency with k=samples)}}

Loop knobs sit in `hyperparameters` beside OpenAI's (they are numbers a client tunes per
job, as OpenAI's are); the search spec sits in `steering`, the same shape a chat request's
`steering` field takes. With a `steering` spec whose critic is not the grader, every answer
in its trace is graded here by the grader (rule graders only: a score_model grader's scores
come from the search's critic, so give it as the critic or leave `critic` out).

Exceptions: `MethodError(ValueError)`, `param` naming the field at fault
(`method.reinforcement.<field>`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steer.critics.extract import extractor
from steer.training import graders

Auto = Literal["auto"]
MAX_ROUNDS = 20


class MethodError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgreementGrader(_Closed):
    """Label-free: keep the samples whose extracted answer is the majority's, when its share
    of all samples is at least `threshold`. `validation_grader` grades the validation file
    (default: the extracted answer equals `{{item.reference}}`)."""

    type: Literal["agreement"]
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    extract: Literal["last_number", "answer_line", "choice", "regex"] = "last_number"
    pattern: str | None = Field(default=None, max_length=500)
    name: str | None = None
    validation_grader: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _pattern(self) -> AgreementGrader:
        extractor(self.extract, self.pattern)  # ValueError when a regex is missing or bad
        return self


class Hyperparameters(_Closed):
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0.0, le=100.0)] | Auto = "auto"
    compute_multiplier: Annotated[float, Field(gt=0.0, le=8.0)] | Auto = "auto"
    eval_interval: Auto = "auto"
    eval_samples: Auto = "auto"
    reasoning_effort: Literal["default"] = "default"
    rounds: int = Field(default=2, ge=1, le=MAX_ROUNDS)
    samples: int = Field(default=8, ge=1, le=64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    keep_per_prompt: int | None = Field(default=None, ge=1, le=64)
    accumulate: bool = True
    concurrency: int = Field(default=16, ge=1, le=256)


class SearchSpec(_Closed):
    """A `steering` spec as a chat request takes it (the server validates its contents)."""

    strategy: str = "best_of_n"
    options: dict[str, Any] = Field(default_factory=dict)
    critic: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    template: dict[str, Any] | None = None


class ReinforcementMethod(_Closed):
    grader: dict[str, Any]
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    steering: SearchSpec | None = None


@dataclass(frozen=True)
class Config:
    """A validated method: the grader parsed, defaults resolved."""

    grader: Any  # a graders.Grader, or AgreementGrader for the label-free mode
    validation_grader: Any  # what grades the validation file
    hp: Hyperparameters
    steering: SearchSpec | None
    samples: int
    temperature: float

    @property
    def label_free(self) -> bool:
        return isinstance(self.grader, AgreementGrader)


def _parse_grader(raw: Mapping[str, Any], param: str) -> Any:
    try:
        return graders.parse_grader(dict(raw), param)
    except graders.GraderError as exc:
        raise MethodError(str(exc), exc.param) from exc


_BRANCHES = {"int", "float", "str", "bool", "none"}


def _loc(exc: ValidationError) -> str:
    """The first error's field path, without pydantic's union-branch tags
    ("constrained-int", "literal['auto']")."""
    parts = [str(p) for p in exc.errors()[0]["loc"]]
    return ".".join(p for p in parts if not ("-" in p or "[" in p or p in _BRANCHES))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = _loc(exc)
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def parse_method(method: Mapping[str, Any]) -> Config:
    """Validate a reinforcement `method` (MethodError names the bad field)."""
    base = "method.reinforcement"
    if method.get("type") != "reinforcement":
        raise MethodError("method.type must be 'reinforcement' here", "method.type")
    body = method.get("reinforcement")
    if not isinstance(body, Mapping):
        raise MethodError("method.reinforcement must be an object with a grader", base)
    try:
        parsed = ReinforcementMethod.model_validate(body)
    except ValidationError as exc:
        raise MethodError(_first_error(exc), f"{base}.{_loc(exc)}") from exc
    hp = parsed.hyperparameters
    if parsed.grader.get("type") == "agreement":
        try:
            grader: Any = AgreementGrader.model_validate(parsed.grader)
        except (ValidationError, ValueError) as exc:
            message = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
            raise MethodError(message, f"{base}.grader") from exc
        valid = _parse_grader(grader.validation_grader or _reference_grader(grader),
                              f"{base}.grader.validation_grader")
    else:
        grader = valid = _parse_grader(parsed.grader, f"{base}.grader")
    scale = 1.0 if hp.compute_multiplier == "auto" else hp.compute_multiplier
    samples = max(1, min(64, round(hp.samples * scale)))
    label_free = isinstance(grader, AgreementGrader)
    temperature = hp.temperature if hp.temperature is not None else (0.4 if label_free else 0.7)
    return Config(grader, valid, hp, parsed.steering, samples, temperature)


def _reference_grader(g: AgreementGrader) -> dict[str, Any]:
    critic: dict[str, Any] = {"name": "exact_answer", "reference": "{{item.reference}}",
                              "extract": g.extract}
    if g.pattern is not None:
        critic["pattern"] = g.pattern
    return {"type": "steer_critic", "critic": critic, "pass_threshold": 1.0}
