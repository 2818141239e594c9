"""Stands in for optillm's tests/test_utils.py (0.4.0) beside its vendored API-compatibility
suite: the same three names that suite imports, with the server and model read from
OPTILLM_TEST_BASE_URL and OPTILLM_TEST_MODEL (upstream hardcodes them; its defaults are kept,
so without those variables this behaves as upstream's file does). Nothing else differs."""

import os

from openai import OpenAI

TEST_MODEL = os.environ.get("OPTILLM_TEST_MODEL", "codelion/dhara-250m")
BASE_URL = os.environ.get("OPTILLM_TEST_BASE_URL", "http://localhost:8000/v1")


def setup_test_env() -> str:
    """As upstream: the api key optillm's server expects, and the model under test."""
    os.environ["OPTILLM_API_KEY"] = "optillm"
    return TEST_MODEL


def get_test_client(base_url: str = BASE_URL) -> OpenAI:
    """As upstream (an OpenAI client with optillm's key), pointed at the server under test."""
    return OpenAI(api_key="optillm", base_url=base_url)
