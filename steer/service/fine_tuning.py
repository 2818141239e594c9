"""OpenAI's fine-tuning jobs API: create, list, retrieve, events, cancel, checkpoints.

Routes parse, call `FineTuning`, render. `FineTuning.create` checks everything a job needs
before it exists (a 4xx naming the field), then writes it `validating_files` and moves it to
`queued`, each with its event; a worker (`steer.training.worker`) claims and runs it. The
job object carries Steer's `lineage` once the job trained a model.

Decisions:
- `model` must be the served base model. An `ft:` model is refused (400, param `model`):
  Steer trains a fresh LoRA over the base weights and adapters don't stack, so "continue
  training ft:X" would silently start again from the base. To learn from an `ft:` model's
  answers, train on a file built from its stored completions: the new adapter's lineage
  names that model as its parent and lists its ancestors.
- Cancelling a finished job is a 409 (it can't change any more).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Query, Request

from steer.engine import InvalidAdapter
from steer.engine.lora_files import check_name
from steer.service.errors import APIError, bad_request
from steer.service.fine_tuning_protocol import (
    CheckpointPage,
    EventPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    JobHyperparameters,
    JobPage,
)
from steer.service.settings import Settings
from steer.store import Conflict, Database, NotFound
from steer.store import adapters as adapter_store
from steer.store import files as file_store
from steer.store import jobs as job_store
from steer.training import expert, graders
from steer.training.expert_method import MAX_ROUNDS
from steer.training.formats import parse_lines

# The line format each method trains on (steer.training.formats).
KINDS = {"supervised": "sft", "dpo": "preference", "reinforcement": "graded"}
KIND_NAMES = {"sft": "chat SFT", "preference": "preference (DPO)",
              "graded": "graded (prompt + reference)"}


class FineTuning:
    """The jobs API over the store, for the model this server serves."""

    def __init__(self, db: Database, settings: Settings, base_model: Callable[[], str]) -> None:
        self.db = db
        self.settings = settings
        self.base_model = base_model

    async def create(self, body: FineTuningJobCreate) -> FineTuningJob:
        # The files first: an unknown one is a 404 whatever else the body says.
        kind = KINDS[body.method.type if body.method is not None else "supervised"]
        training = await self._file(body.training_file, "training_file", kind)
        if body.validation_file is not None:
            await self._file(body.validation_file, "validation_file", kind)
        method = _method(body)
        base = self.base_model()
        if body.model != base:
            hint = (" Steer trains from the base model; to learn from a fine-tuned model's "
                    "answers, train on a file built from its stored completions."
                    if body.model.startswith("ft:") else "")
            raise bad_request(f"Model '{body.model}' is not available for fine-tuning on "
                              f"this server: it serves '{base}'.{hint}", "model",
                              code="model_not_available")
        config = self._check_method(method)
        if config is not None and not config.label_free:
            await self._check_items(config.grader, training.id, "training_file")
        if config is not None and body.validation_file is not None:
            await self._check_items(config.validation_grader, body.validation_file,
                                    "validation_file")
        name_example = expert.final_name(_Named(base, body.suffix, "ftjob-" + "0" * 24))
        if method.get("type") == "reinforcement":  # its round checkpoints are longer names
            name_example += f":ckpt-round-{MAX_ROUNDS}"
        try:
            check_name(name_example)
        except InvalidAdapter as exc:
            raise bad_request(f"The fine-tuned model's name would be invalid ({exc}); use a "
                              "shorter suffix.", "suffix") from exc
        try:
            job = await job_store.create_job(
                self.db, model=base, training_file=training.id,
                validation_file=body.validation_file, suffix=body.suffix,
                seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
                method=method, metadata=body.metadata)
        except NotFound as exc:  # deleted between the check and the insert
            raise _file_not_found(exc.key, "training_file" if exc.key == training.id
                                  else "validation_file") from exc
        job = await job_store.transition(self.db, job.id, "queued",
                                         "Files validated, moving job to queued state")
        return await self.render(job)

    async def _file(self, file_id: str, param: str, kind: str) -> file_store.StoredFile:
        try:
            stored = await file_store.get_file(self.db, file_id)
        except NotFound as exc:
            raise _file_not_found(file_id, param) from exc
        if stored.purpose != "fine-tune":
            raise bad_request(f"File '{file_id}' has purpose '{stored.purpose}'; fine-tuning "
                              "takes files uploaded with purpose 'fine-tune'.", param,
                              code="invalid_file_purpose")
        if stored.kind != kind:
            raise bad_request(
                f"File '{file_id}' holds {KIND_NAMES.get(stored.kind, stored.kind)} lines; "
                f"this method trains on {KIND_NAMES[kind]} lines.", param,
                code="invalid_file_format")
        if stored.lines < 1:
            raise bad_request(f"File '{file_id}' has no lines.", param, code="empty_file")
        return stored

    def _check_method(self, method: dict[str, Any]) -> expert.Config | None:
        kind = method["type"]
        if kind == "reinforcement":
            try:
                return expert.parse_method(method)
            except expert.MethodError as exc:
                raise bad_request(str(exc), exc.param or "method.reinforcement") from exc
        hp = method[kind].get("hyperparameters", {})
        rank = hp.get("lora_rank")
        if rank is not None and rank > self.settings.max_lora_rank:
            raise bad_request(
                f"lora_rank {rank} exceeds this server's max LoRA rank "
                f"{self.settings.max_lora_rank} (--max-lora-rank): the adapter could not be "
                "served.", f"method.{kind}.hyperparameters.lora_rank", code="lora_rank_too_high")
        return None

    async def _check_items(self, grader: Any, file_id: str, param: str) -> None:
        """Every line has the fields the grader reads (`{{item.x}}`)."""
        content = await file_store.file_content(self.db, file_id)
        lines = await asyncio.to_thread(parse_lines, content)
        try:
            graders.check_items(grader, lines, param)
        except graders.GraderError as exc:
            raise bad_request(f"File '{file_id}': {exc}", param, code="invalid_file_format"
                              ) from exc

    async def get(self, job_id: str) -> FineTuningJob:
        return await self.render(await self._job(job_id))

    async def _job(self, job_id: str) -> job_store.Job:
        try:
            return await job_store.get_job(self.db, job_id)
        except NotFound as exc:
            raise _job_not_found(job_id) from exc

    async def list(self, after: str | None, limit: int,
                   metadata: dict[str, str] | None) -> JobPage:
        try:
            rows, more = await job_store.list_jobs(self.db, after=after, limit=limit,
                                                   metadata=metadata)
        except NotFound as exc:
            raise APIError(404, f"No fine-tuning job '{after}' to list after.",
                           type="not_found_error", param="after", code="job_not_found") from exc
        lineages = await self.lineages(rows)
        return JobPage(data=[self._render(j, lineages.get(j.id)) for j in rows],
                       has_more=more)

    async def cancel(self, job_id: str) -> FineTuningJob:
        await self._job(job_id)
        try:
            job = await job_store.cancel(self.db, job_id)
        except Conflict as exc:
            raise APIError(409, str(exc), type="conflict_error", param="fine_tuning_job_id",
                           code="job_finished") from exc
        return await self.render(job)

    async def events(self, job_id: str, after: str | None, limit: int) -> EventPage:
        await self._job(job_id)
        try:
            rows, more = await job_store.list_events(self.db, job_id, after=after, limit=limit)
        except NotFound as exc:
            raise APIError(404, f"No event '{after}' in job '{job_id}'.",
                           type="not_found_error", param="after", code="event_not_found"
                           ) from exc
        return EventPage(data=[FineTuningJobEvent(
            id=e.id, created_at=e.created_at, level=e.level,  # type: ignore[arg-type]
            message=e.message, type=e.type, data=e.data)  # type: ignore[arg-type]
            for e in rows], has_more=more)

    async def checkpoints(self, job_id: str, after: str | None, limit: int) -> CheckpointPage:
        await self._job(job_id)
        try:
            rows, more = await job_store.list_checkpoints(self.db, job_id, after=after,
                                                          limit=limit)
        except NotFound as exc:
            raise APIError(404, f"No checkpoint '{after}' in job '{job_id}'.",
                           type="not_found_error", param="after",
                           code="checkpoint_not_found") from exc
        data = [FineTuningJobCheckpoint(
            id=c.id, created_at=c.created_at, fine_tuned_model_checkpoint=
            c.fine_tuned_model_checkpoint, fine_tuning_job_id=c.job_id,
            metrics=c.metrics, step_number=c.step_number)  # type: ignore[arg-type]
            for c in rows]
        return CheckpointPage(data=data, has_more=more,
                              first_id=data[0].id if data else None,
                              last_id=data[-1].id if data else None)

    async def render(self, job: job_store.Job) -> FineTuningJob:
        return self._render(job, (await self.lineages([job])).get(job.id))

    def _render(self, job: job_store.Job, lineage: dict[str, Any] | None) -> FineTuningJob:
        kind = job.method.get("type", "supervised")
        hp = dict((job.method.get(kind) or {}).get("hyperparameters") or {})
        return FineTuningJob(
            id=job.id, created_at=job.created_at, error=job.error,  # type: ignore[arg-type]
            fine_tuned_model=job.fine_tuned_model, finished_at=job.finished_at,
            hyperparameters=JobHyperparameters(**{
                k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
                if k in hp}),
            model=job.model, result_files=job.result_files or [], seed=job.seed,
            status=job.status, trained_tokens=job.trained_tokens,  # type: ignore[arg-type]
            training_file=job.training_file, validation_file=job.validation_file,
            metadata=job.job_metadata, method=job.method, lineage=lineage)

    async def lineages(self, jobs: Sequence[job_store.Job]) -> dict[str, dict[str, Any]]:
        """Each job's trained model's lineage with its ancestors (jobs that published none
        are absent): a page of jobs costs two queries, plus one per generation of ancestors
        Steer trained, never one per job."""
        finals = await adapter_store.finals_of_jobs(self.db, [j.id for j in jobs])
        chains = await adapter_store.chains(self.db, list(finals.values()))
        return {job_id: {**final.lineage, "model": final.name, "status": final.status,
                         "ancestors": chains[final.name]}
                for job_id, final in finals.items()}


class _Named:
    """What `expert.final_name` reads of a job, before the job exists."""

    def __init__(self, model: str, suffix: str | None, id: str) -> None:
        self.model, self.suffix, self.id = model, suffix, id


def _method(body: FineTuningJobCreate) -> dict[str, Any]:
    """The method as stored: `{"type": t, t: {...}}`, the deprecated top-level
    `hyperparameters` folded into a supervised method."""
    legacy = body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else None
    if body.method is None:
        return {"type": "supervised", "supervised": {"hyperparameters": legacy or {}}}
    kind = body.method.type
    for other in KINDS:
        if other != kind and getattr(body.method, other) is not None:
            raise bad_request(f"method.{other} is given but method.type is '{kind}'.",
                              f"method.{other}")
    if kind == "reinforcement":
        if body.method.reinforcement is None:
            raise bad_request("A reinforcement method needs method.reinforcement with a "
                              "grader.", "method.reinforcement")
        if legacy is not None:
            raise bad_request("hyperparameters (deprecated) only applies to supervised "
                              "jobs; set method.reinforcement.hyperparameters.",
                              "hyperparameters")
        return {"type": kind, kind: body.method.reinforcement}
    spec = getattr(body.method, kind)
    hp = (spec.hyperparameters.model_dump(exclude_none=True)
          if spec is not None and spec.hyperparameters is not None else None)
    if legacy is not None:
        if kind != "supervised" or hp is not None:
            raise bad_request("Give the hyperparameters once, in method.<type>."
                              "hyperparameters (the top-level field is deprecated).",
                              "hyperparameters")
        hp = legacy
    return {"type": kind, kind: {"hyperparameters": hp or {}}}


def _file_not_found(file_id: str, param: str) -> APIError:
    return APIError(404, f"No such file: '{file_id}' ({param}).", type="not_found_error",
                    param=param, code="file_not_found")


def _job_not_found(job_id: str) -> APIError:
    return APIError(404, f"No fine-tuning job '{job_id}'.", type="not_found_error",
                    param="fine_tuning_job_id", code="job_not_found")


def metadata_filter(request: Request) -> dict[str, str] | None:
    """`metadata[k]=v` query pairs (how the openai SDK sends a dict), as a dict."""
    pairs = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
             if key.startswith("metadata[") and key.endswith("]")}
    return pairs or None


def fine_tuning_router(service: FineTuning) -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs")
    Limit = Query(20, ge=1, le=100)

    @router.post("")
    async def create_job(body: FineTuningJobCreate) -> FineTuningJob:
        return await service.create(body)

    @router.get("")
    async def list_jobs(request: Request, after: str | None = None,
                        limit: int = Limit) -> JobPage:
        return await service.list(after, limit, metadata_filter(request))

    @router.get("/{fine_tuning_job_id}")
    async def retrieve_job(fine_tuning_job_id: str) -> FineTuningJob:
        return await service.get(fine_tuning_job_id)

    @router.get("/{fine_tuning_job_id}/events")
    async def list_events(fine_tuning_job_id: str, after: str | None = None,
                          limit: int = Limit) -> EventPage:
        return await service.events(fine_tuning_job_id, after, limit)

    @router.post("/{fine_tuning_job_id}/cancel")
    async def cancel_job(fine_tuning_job_id: str) -> FineTuningJob:
        return await service.cancel(fine_tuning_job_id)

    @router.get("/{fine_tuning_job_id}/checkpoints")
    async def list_checkpoints(fine_tuning_job_id: str, after: str | None = None,
                               limit: int = Query(10, ge=1, le=100)) -> CheckpointPage:
        return await service.checkpoints(fine_tuning_job_id, after, limit)

    return router
