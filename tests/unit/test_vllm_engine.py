"""The parts of the vLLM engine adapter that need no running engine."""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError

from steer.engine import EngineRequestError, SamplingParams
from steer.engine.vllm_engine import VllmEngine, VllmEngineConfig, _greedy_copies
from steer.service.errors import from_engine_error


def test_vllm_refusals_are_400s_naming_the_field() -> None:
    engine = VllmEngine(VllmEngineConfig(model="m", served_model_name="m"))
    refused = engine._translate(VLLMValidationError("bad", parameter="top_k", value=-5))
    assert isinstance(refused, EngineRequestError) and refused.param == "top_k"
    error = from_engine_error(refused)
    assert (error.status, error.param) == (400, "top_k")


def test_greedy_requests_for_n_answers_are_generated_once() -> None:
    params, copies = _greedy_copies(SamplingParams(n=4, temperature=0.0))
    assert (params.n, copies) == (1, 4)
    for sampled in (SamplingParams(n=4, temperature=0.7), SamplingParams(n=1, temperature=0.0)):
        assert _greedy_copies(sampled) == (sampled, 1)


def test_our_own_bugs_inside_the_backend_are_not_client_errors() -> None:
    """Only refusals vLLM attributes to the request (VLLMClientError) are 400s; a ValueError
    or TypeError from inside the backend is a bug of ours: it stays what it is (a 500)."""
    engine = VllmEngine(VllmEngineConfig(model="m", served_model_name="m"))
    for bug in (ValueError("The external_req_id field should not be set"), TypeError("x")):
        assert engine._translate(bug) is bug
