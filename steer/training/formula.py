"""The arithmetic of a `multi` grader's `calculate_output`, parsed with `ast` and evaluated by
walking the tree: numbers, the names of sub-graders, `+ - * /`, unary minus, parentheses and
`min` / `max` / `abs`. Nothing else parses (no attributes, subscripts, keywords, `**`, other
calls), so a formula can't run code or take long. Division by zero gives 0: a score, never an
exception in the middle of a search."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Collection, Mapping

MAX_CHARS = 1000
FUNCTIONS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if b else 0.0,
}


class FormulaError(ValueError):
    """The formula uses something outside the allowed arithmetic, or an unknown name."""


def parse(formula: str, names: Collection[str]) -> ast.expr:
    """The checked tree of `formula`, whose free names must be in `names`."""
    if len(formula) > MAX_CHARS:
        raise FormulaError(f"longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(formula.strip(), mode="eval").body
    except (SyntaxError, RecursionError, ValueError) as exc:
        raise FormulaError(f"not a formula ({exc})") from None
    _check(tree, set(names))
    return tree


def _check(node: ast.expr, names: set[str]) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise FormulaError(f"{node.value!r} is not a number")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise FormulaError(f"unknown name {node.id!r}; the sub-graders are "
                               f"{', '.join(sorted(names)) or 'none'}")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise FormulaError("only + - * / are allowed")
        _check(node.left, names)
        _check(node.right, names)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub | ast.UAdd):
            raise FormulaError("only unary - and + are allowed")
        _check(node.operand, names)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise FormulaError("the only functions are min, max and abs")
        if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            raise FormulaError(f"{node.func.id}() takes plain arguments")
        if node.func.id == "abs" and len(node.args) != 1:
            raise FormulaError("abs() takes one argument")
        for arg in node.args:
            _check(arg, names)
    else:
        raise FormulaError(f"{type(node).__name__} is not allowed (numbers, sub-grader names, "
                           "+ - * /, min, max, abs)")


def evaluate(tree: ast.expr, values: Mapping[str, float]) -> float:
    """The value of a checked tree; a non-finite result counts as 0."""
    result = _eval(tree, values)
    return result if math.isfinite(result) else 0.0


def _eval(node: ast.expr, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # _check let nothing else through
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        operand = _eval(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args)))
