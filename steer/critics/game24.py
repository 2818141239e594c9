"""Game of 24: an exact verifier (a critic), and the parsing the ToT task shares with it.

A state is lines like "4 + 9 = 13 (left: 10 13 13)" and, finally, "Answer: (...) = 24".
The verifier checks arithmetic exactly (fractions, no floats): every step's result, the
"left" bookkeeping, and that the answer uses each puzzle number exactly once to make 24.
It does not search for solutions: a consistent partial state scores 1, not "solvable".
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from pydantic import Field

from steer.critics.base import (
    Candidate,
    Critic,
    CriticOptions,
    ModelCaller,
    Question,
    Score,
    register_critic,
)

_TIMES, _DIVIDE = "\u00d7", "\u00f7"  # models sometimes write these for * and /
_STEP = re.compile(
    r"^\s*(-?[\d.]+)\s*([-+*/" + _TIMES + _DIVIDE + r"])\s*(-?[\d.]+)\s*=\s*(-?[\d.]+)"
    r"\s*\(left:\s*([^)]*)\)"
)
_LEFT = re.compile(r"\(left:\s*([^)]*)\)")


def puzzle_numbers(text: str) -> list[int]:
    """The four puzzle numbers: the first four integers in the question."""
    return [int(x) for x in re.findall(r"\d+", text)[:4]]


def current_numbers(state: str) -> str | None:
    """The numbers left after the last step, as the paper's `get_current_numbers`."""
    lines = [line for line in state.strip().split("\n") if line.strip()]
    if not lines:
        return None
    m = _LEFT.search(lines[-1])
    return m.group(1).strip() if m else None


def _num(text: str) -> Fraction:
    return Fraction(text)


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in ("*", _TIMES):
        return a * b
    if b == 0:
        return None
    return a / b


def evaluate(expr: str) -> tuple[Fraction, list[Fraction]] | None:
    """Exact value of + - * / over integer literals, and the literals used; None if invalid."""
    try:
        tree = ast.parse(expr.strip().replace(_TIMES, "*").replace(_DIVIDE, "/"), mode="eval")
    except SyntaxError:
        return None
    used: list[Fraction] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            value = Fraction(str(node.value))
            used.append(value)
            return value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult
                                                      | ast.Div):
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
            result = _apply(walk(node.left), op, walk(node.right))
            if result is None:
                raise ZeroDivisionError
            return result
        raise ValueError("unsupported expression")

    try:
        return walk(tree), used
    except (ValueError, ZeroDivisionError):
        return None


def check_state(puzzle: Sequence[int], state: str) -> tuple[bool, bool, str]:
    """(consistent, solved, reason) for a ToT state of steps and maybe an answer line."""
    remaining = Counter(Fraction(n) for n in puzzle)
    solved = False
    for line in (raw for raw in state.strip().split("\n") if raw.strip()):
        if line.strip().lower().startswith("answer"):
            expr = line.split(":", 1)[-1].split("=")[0]
            result = evaluate(expr)
            if result is None:
                return False, False, f"cannot evaluate {expr.strip()!r}"
            value, used = result
            if Counter(used) != Counter(Fraction(n) for n in puzzle):
                return False, False, "the answer must use each puzzle number exactly once"
            if value != 24:
                return False, False, f"{expr.strip()} = {value}, not 24"
            solved = True
            continue
        m = _STEP.match(line)
        if not m:
            return False, False, f"not a step: {line.strip()!r}"
        a, op, b, claimed, left = m.groups()
        try:
            fa, fb, fc = _num(a), _num(b), _num(claimed)
            left_nums = Counter(_num(x) for x in left.split())
        except (ValueError, ZeroDivisionError):
            return False, False, f"bad number in {line.strip()!r}"
        actual = _apply(fa, op, fb)
        if actual is None or actual != fc:
            return False, False, f"{a} {op} {b} is {actual}, not {claimed}"
        for x in (fa, fb):
            if remaining[x] <= 0:
                return False, False, f"{x} is not available in {line.strip()!r}"
            remaining[x] -= 1
        remaining[fc] += 1
        remaining = +remaining
        if left_nums != remaining:
            return False, False, f"numbers left should be {sorted(remaining.elements())}"
    return True, solved, "solved" if solved else "consistent so far"


@register_critic
class Game24Verifier(Critic):
    """Exact check of a Game of 24 state: 1 when every step and the answer are right."""

    name = "game24"

    class Options(CriticOptions):
        numbers: list[int] | None = Field(None, min_length=4, max_length=4)

    async def score(
        self, caller: ModelCaller, question: Question, candidates: Sequence[Candidate]
    ) -> list[Score]:
        opts = self.options
        assert isinstance(opts, Game24Verifier.Options)
        puzzle = opts.numbers or puzzle_numbers(question.text)
        scores = []
        for c in candidates:
            ok, solved, reason = check_state(puzzle, c.text)
            scores.append(Score(1.0 if ok else 0.0, reason, passed=solved))
        return scores
