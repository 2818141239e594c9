"""The record of what a search did: every candidate with its parent, role, scores and fate.

Kept detailed enough to become training data later (SFT from chosen answers, preference
pairs from chosen vs. pruned siblings).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx


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

    def graph(self) -> nx.DiGraph:
        """The search tree (or debate graph) as a networkx DiGraph, node attributes included."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.id, **{k: v for k, v in asdict(n).items() if k != "id"})
        g.add_edges_from((n.parent, n.id) for n in self.nodes if n.parent is not None)
        return g

    def to_dot(self) -> str:
        """Graphviz DOT: kept nodes solid, pruned dashed, the chosen answer bold."""
        lines = [f"digraph {json.dumps(self.strategy)} {{", "  node [shape=box];"]
        for node_id, data in self.graph().nodes(data=True):
            score = data["scores"] and next(iter(data["scores"].values()))
            text = data["text"].strip().replace("\n", " | ")[:80]
            label = f"#{node_id} {data['role']}" + (f" {score:.3g}" if score else "")
            style = "bold" if data["chosen"] else "dashed" if data["pruned"] else "solid"
            full = json.dumps(label + "\n" + text)
            lines.append(f"  n{node_id} [label={full}, style={style}];")
        for a, b in self.graph().edges():
            lines.append(f"  n{a} -> n{b};")
        lines.append("}")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        """The inverse of `to_dict` (for traces kept serialized)."""
        info = {k: v for k, v in data.items() if k not in ("strategy", "nodes", "edges")}
        return cls(data["strategy"], [Node(**n) for n in data["nodes"]], info)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [[n.parent, n.id] for n in self.nodes if n.parent is not None],
            **self.info,
        }
