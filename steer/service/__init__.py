"""HTTP only: FastAPI routes, OpenAI wire models, SSE, auth, errors -> HTTP, metrics, CLI."""
