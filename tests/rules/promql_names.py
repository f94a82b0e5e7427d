"""The names a PromQL expression uses: metric names, label names and label matchers.

promtool tells whether an expression parses but not which names it uses, and Prometheus 2.42 has no
AST dump. So this is a small lexer over PromQL's tokens with just enough context to tell a metric
name from a function, a keyword or a label: it does not build a tree. Run promtool on the same
expression first; this module assumes valid PromQL.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "atan2", "bool", "offset"}
_LABEL_LIST_MODIFIERS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "avg", "count", "min", "max", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
}
_NUMBER_WORDS = {"inf", "nan"}
_MATCH_OPS = {"=", "!=", "=~", "!~"}


@dataclass(frozen=True)
class Matcher:
    metric: str | None  # None for a selector without a name
    label: str
    op: str
    value: str


@dataclass
class Names:
    metrics: set[str] = field(default_factory=set)
    #: Labels the expression reads: in matchers, by/without/on/ignoring/group_* lists, label_* sources.
    labels: set[str] = field(default_factory=set)
    #: Labels the expression creates: label_replace/label_join targets, count_values' label.
    defined_labels: set[str] = field(default_factory=set)
    matchers: list[Matcher] = field(default_factory=list)


@dataclass
class _Token:
    kind: str
    text: str


def tokens(expr: str) -> list[_Token]:
    result: list[_Token] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match:
            raise ValueError(f"cannot lex PromQL at {pos}: {expr[pos:pos + 30]!r}")
        kind = match.lastgroup
        pos = match.end()
        if kind in ("space", "comment"):
            continue
        if kind == "op" and match.group() == "[":
            # Skip a range or subquery [5m] / [6h:5m] / [$__rate_interval] up to its "]".
            end = expr.index("]", pos)
            result.append(_Token("range", expr[pos:end]))
            pos = end + 1
            continue
        result.append(_Token(kind, match.group()))
    return result


def unquote(literal: str) -> str:
    if literal.startswith("`"):
        return literal[1:-1]
    # PromQL strings follow Go's escapes; Python's agree for everything PromQL allows.
    return ast.literal_eval(literal)


# For label_replace(v, dst, replacement, src, regex) and friends: which string arguments are label
# names, and whether the expression creates (dst) or reads (src) them.
_LABEL_ARGS = {
    "label_replace": {1: "defined", 3: "read"},
    "label_join": {1: "defined"},  # 3, 4, ...: read, handled below
    "count_values": {0: "defined"},
}


def names(expr: str) -> Names:
    toks = tokens(expr)
    found = Names()
    calls: list[list] = []  # stack of [function name or None, argument index]
    i = 0

    def peek(offset: int = 1) -> _Token | None:
        j = i + offset
        return toks[j] if j < len(toks) else None

    while i < len(toks):
        tok = toks[i]
        nxt = peek()
        if tok.kind == "ident":
            word = tok.text
            if word.lower() in _NUMBER_WORDS or word in _KEYWORDS:
                pass
            elif word in _AGGREGATIONS and nxt is not None and nxt.text in ("by", "without"):
                # sum by (a, b) (expr): the grouping comes before the argument list.
                i = _label_list(toks, i + 2, found)
                calls.append([word, 0])
                i += 2
                continue
            elif word in _LABEL_LIST_MODIFIERS:
                if nxt is not None and nxt.text == "(":  # group_left/group_right may come without a list
                    i = _label_list(toks, i + 1, found)
            elif nxt is not None and nxt.text == "(":
                calls.append([word, 0])
                i += 2
                continue
            elif nxt is not None and nxt.text == "{":
                found.metrics.add(word)
                i = _matchers(toks, i + 1, word, found)
            else:
                found.metrics.add(word)
        elif tok.text == "{":
            i = _matchers(toks, i, None, found)
        elif tok.text == "(":
            calls.append([None, 0])
        elif tok.text == ")":
            calls.pop()
        elif tok.text == ",":
            calls[-1][1] += 1
        elif tok.kind == "string" and calls:
            function, argument = calls[-1]
            role = _LABEL_ARGS.get(function, {}).get(argument)
            if function == "label_join" and argument >= 3:
                role = "read"
            if role == "defined":
                found.defined_labels.add(unquote(tok.text))
            elif role == "read":
                found.labels.add(unquote(tok.text))
        i += 1
    return found


def _label_list(toks: list[_Token], i: int, found: Names) -> int:
    """toks[i] is the "(" of a by/on/... list; records its labels and returns the index of ")"."""
    while toks[i].text != ")":
        if toks[i].kind == "ident":
            found.labels.add(toks[i].text)
        i += 1
    return i


def _matchers(toks: list[_Token], i: int, metric: str | None, found: Names) -> int:
    """toks[i] is "{"; records the matchers and returns the index of the closing "}"."""
    i += 1
    while toks[i].text != "}":
        if toks[i].text == ",":
            i += 1
            continue
        label, op, value = toks[i], toks[i + 1], toks[i + 2]
        if label.kind != "ident" or op.text not in _MATCH_OPS or value.kind != "string":
            raise ValueError(f"unexpected label matcher near {label.text!r} {op.text!r}")
        text = unquote(value.text)
        if label.text == "__name__" and op.text == "=":
            found.metrics.add(text)
            metric = text
        found.labels.add(label.text)
        found.matchers.append(Matcher(metric, label.text, op.text, text))
        i += 3
    return i


_LITERAL_ALTERNATION = re.compile(r"[\w.:-]+(?:\|[\w.:-]+)*")


def literal_values(matcher: Matcher) -> set[str] | None:
    """The label values a matcher names literally ("a", or "a|b|c" for regexes); None if it's a pattern."""
    if matcher.op in ("=", "!="):
        return {matcher.value}
    if _LITERAL_ALTERNATION.fullmatch(matcher.value) and "." not in matcher.value:
        return set(matcher.value.split("|"))
    return None
