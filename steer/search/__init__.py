"""Steering strategies and the request/result/trace/budget types they share.

May import `steer.critics` and `steer.engine`, never `steer.service`. Importing this
package registers the built-in strategies.
"""

from steer.search import strategies
from steer.search.aliases import from_optillm, split_model, with_reasoning_effort
from steer.search.base import (
    STRATEGIES,
    Context,
    FinalPrompt,
    FinalText,
    SteerResult,
    Strategy,
    StrategyOptions,
    register_strategy,
)
from steer.search.choices import choice_id, run_many, stream_many
from steer.search.runner import Limits, Plan, Progress, Steerer, SteeringSpec
from steer.search.session import Budget, BudgetExhausted, SearchError, Session, SteeringInvalid
from steer.search.templates import TemplateLibrary
from steer.search.trace import Node, Trace

__all__ = [
    "STRATEGIES",
    "Budget",
    "BudgetExhausted",
    "Context",
    "FinalPrompt",
    "FinalText",
    "Limits",
    "Node",
    "Plan",
    "Progress",
    "SearchError",
    "Session",
    "SteerResult",
    "Steerer",
    "SteeringInvalid",
    "SteeringSpec",
    "Strategy",
    "StrategyOptions",
    "TemplateLibrary",
    "Trace",
    "choice_id",
    "from_optillm",
    "register_strategy",
    "run_many",
    "split_model",
    "strategies",
    "stream_many",
    "with_reasoning_effort",
]
