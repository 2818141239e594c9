"""OpenAI's fine-tuning wire models (`client.fine_tuning.jobs.*` of the openai SDK): the
create request with its methods and hyperparameters, the job, event and checkpoint objects,
and their cursor pages. Steer's extensions: `lora_rank`/`lora_alpha` in the supervised and DPO
hyperparameters, and `lineage` on the job. The reinforcement method (OpenAI's shape plus
Steer's knobs) is validated by `steer.training.expert.parse_method`.

Ranges a schema can state are here (a 400 naming the field, and the OpenAPI document says
so); rules that need the store or the served model (files, kinds, the base model, the
server's LoRA rank limit, the grader) are checked by `fine_tuning.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from steer.service.protocol import Metadata, _Request

SUFFIX_PATTERN = r"^[a-z0-9-]{1,64}$"
Auto = Literal["auto"]
Epochs = Auto | Annotated[int, Field(ge=1, le=50)]
BatchSize = Auto | Annotated[int, Field(ge=1, le=512)]
LrMultiplier = Auto | Annotated[float, Field(gt=0, le=100)]
Beta = Auto | Annotated[float, Field(gt=0, le=2)]


class _Body(_Request):
    """A request part whose integer fields (`_INTS`) take JSON's 2.0 as 2, like the chat
    request's (`_Request` does it for plain `int` fields only)."""

    _INTS: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _whole(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: int(v) if k in cls._INTS and isinstance(v, float) and v.is_integer() else v
                for k, v in data.items()}


class Hyperparameters(_Body):
    """OpenAI's supervised hyperparameters (also the deprecated top-level field), plus the
    LoRA's rank and alpha (Steer's; the rank must fit the server's `max_lora_rank`)."""

    _INTS = frozenset({"n_epochs", "batch_size", "lora_rank", "lora_alpha"})

    n_epochs: Epochs = "auto"
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: LrMultiplier = "auto"
    lora_rank: Annotated[int, Field(ge=1, le=512)] | None = None
    lora_alpha: Annotated[int, Field(ge=1, le=4096)] | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Beta = "auto"


class SupervisedMethod(_Request):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Request):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    # Validated by steer.training.expert.parse_method (grader, rounds, samples, steering).
    reinforcement: dict[str, Any] | None = None


class FineTuningJobCreate(_Body):
    _INTS = frozenset({"seed"})

    model: Annotated[str, Field(min_length=1, max_length=256)]
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    suffix: Annotated[str, Field(pattern=SUFFIX_PATTERN)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Metadata | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of method
    method: Method | None = None
    integrations: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None


# -- responses --------------------------------------------------------------------------------


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: Auto | int = "auto"
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str = "steer"
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed",
                    "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    lineage: dict[str, Any] | None = None  # Steer's: where the trained model's priors came from


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class EventPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
