"""Just enough PromQL text handling for the checks: variables in, operands out.

Not a parser: `operands` scans for binary comparison and set operators at the top level
of an expression (outside brackets and quotes), which is where alert rules put their
thresholds. The Prometheus server itself parses and evaluates every expression we check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Comparison and set operators (PromQL "binary operators" that filter), longest first.
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPERATORS = ("and", "or", "unless")
#: Modifiers that may follow a binary operator, with or without a label list.
_MODIFIERS = ("bool", "on", "ignoring", "group_left", "group_right")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(Inf|NaN)", re.IGNORECASE)
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana template variables (`$x`, `${x}`, `${x:fmt}`, `[[x]]`) in `expr`.

    `values` maps a variable name (e.g. `cache`, `__rate_interval`) to its text.

    Raises:
        KeyError: `expr` uses a variable `values` does not define.

    """
    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return values[name]
    return _VARIABLE.sub(one, expr)


def operands(expr: str) -> list[str]:
    """The sub-expressions an alert compares or combines, thresholds left out.

    `(a > 0) and on (node) (b < c)` gives `["a", "b", "c"]`: the expression is split at
    top-level comparison and set operators (with their `on (...)`/`bool` modifiers), a
    part wholly in parentheses is split again, and number literals are dropped. An
    expression with no such operator is its own single operand. `absent(x)` returns data only
    while `x` has none (a target down), so its operands are those of `x`: what shows that
    the expression watches series that exist.
    """
    expr = expr.strip()
    if expr.startswith("absent(") and _unwrap(expr[len("absent"):]) != expr[len("absent"):]:
        return operands(_unwrap(expr[len("absent"):]))
    parts = _split(expr)
    if len(parts) == 1:
        inner = _unwrap(parts[0])
        if inner == parts[0]:
            return [] if _NUMBER.fullmatch(parts[0]) else parts
        parts = [inner]
    found: list[str] = []
    for part in parts:
        found += operands(part)
    return found


def _unwrap(text: str) -> str:
    """`text` without one pair of parentheses that encloses all of it."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and i < len(text) - 1:
            return text  # "(a) + (b)": the first parenthesis closes early
    return text[1:-1].strip()


def _split(expr: str) -> list[str]:
    """`expr` cut at each top-level comparison or set operator (operators dropped)."""
    parts: list[str] = []
    depth, quote, start, i = 0, "", 0, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            width = _operator_at(expr, i)
            if width:
                parts.append(expr[start:i].strip())
                i = _skip_modifiers(expr, i + width)
                start = i
                continue
        i += 1
    parts.append(expr[start:].strip())
    return [p for p in parts if p]


def _operator_at(expr: str, i: int) -> int:
    """Length of the comparison or set operator starting at `expr[i]`, else 0."""
    for op in _COMPARISONS:
        if expr.startswith(op, i):
            return len(op)
    word = re.match(r"[A-Za-z_]\w*", expr[i:])
    before = expr[i - 1] if i else " "
    if word and word.group() in _SET_OPERATORS and not (before.isalnum() or before == "_"):
        return len(word.group())
    return 0


def _skip_modifiers(expr: str, i: int) -> int:
    """Index after any `bool`, `on (...)`, `group_left (...)` … following an operator."""
    while True:
        match = re.match(r"\s*([A-Za-z_]\w*)\s*", expr[i:])
        if not match or match.group(1) not in _MODIFIERS:
            return i
        i += match.end()
        if i < len(expr) and expr[i] == "(":
            i = expr.index(")", i) + 1
