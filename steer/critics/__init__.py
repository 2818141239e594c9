"""Critics: candidate(s) in, `Score`s out. May import `steer.engine` only.

Importing this package registers every built-in critic in `CRITICS`.
"""

from steer.critics import game24, model, rules
from steer.critics.base import (
    CRITICS,
    Candidate,
    Critic,
    CriticError,
    CriticOptions,
    ModelCaller,
    Question,
    Score,
    mean_logprob,
    register_critic,
)
from steer.critics.rules import register_python_critic

__all__ = [
    "CRITICS",
    "Candidate",
    "Critic",
    "CriticError",
    "CriticOptions",
    "ModelCaller",
    "Question",
    "Score",
    "game24",
    "mean_logprob",
    "model",
    "register_critic",
    "register_python_critic",
    "rules",
]
