"""`none` (plain pass-through) and `template` (a named prompt template, one generation).

Both end with that one generation, the answer: decoded under the request's constraint when
it has one."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from steer.search.base import (
    Context,
    Final,
    FinalPrompt,
    Strategy,
    StrategyOptions,
    register_strategy,
)


@register_strategy
class NoStrategy(Strategy):
    """One generation, exactly as asked."""

    name = "none"

    async def run(self, ctx: Context) -> Final:
        return FinalPrompt(ctx.messages, ctx.params)


@register_strategy
class TemplateStrategy(Strategy):
    """Render a named template over the conversation, then one generation. (The runner
    applies the template; `steering.template` does the same for every other strategy.)"""

    name = "template"

    class Options(StrategyOptions):
        name: str = Field(min_length=1, max_length=128)
        variables: dict[str, Any] = Field(default_factory=dict, max_length=64)

    async def run(self, ctx: Context) -> Final:
        return FinalPrompt(ctx.messages, ctx.params)
