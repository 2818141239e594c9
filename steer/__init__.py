"""Steer: an OpenAI-compatible inference-time steering service over a vLLM engine."""

__version__ = "0.1.0"
