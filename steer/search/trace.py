"""The record of what a search did: every candidate with its parent, role, scores and fate.

Kept detailed enough to become training data later (SFT from chosen answers, preference
pairs from chosen vs. pruned siblings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Node:
    id: int
    role: str  # "generator", "critic", "final", "agent-0", ...
    text: str
    parent: int | None = None
    round: int = 0
    tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    pruned: bool = False
    chosen: bool = False
    started_s: float = 0.0
    ended_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        return next(iter(self.scores.values()), None) if self.scores else None


@dataclass
class Trace:
    strategy: str
    nodes: list[Node] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, role: str, text: str, **fields: Any) -> Node:
        node = Node(id=len(self.nodes), role=role, text=text, **fields)
        self.nodes.append(node)
        return node

    def candidates(self) -> list[Node]:
        return [n for n in self.nodes if n.role != "final"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [[n.parent, n.id] for n in self.nodes if n.parent is not None],
            **self.info,
        }
