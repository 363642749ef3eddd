"""Precedence-climbing (Pratt) parser of the trigger language.

Precedence, loosest first, as in Python: ``or``, ``and``, ``not``, comparisons, ``+ -``, ``* / %``,
unary ``-``, ``**`` (right-associative, and binding tighter than a unary minus on its left: ``-2 ** 2``
is ``-(2 ** 2)``, while ``2 ** -1`` is allowed). Comparisons do not chain (``a < b < c`` is refused:
say ``a < b and b < c``), because Python's chaining surprises people who know any other language.
"""

from __future__ import annotations

from fleetloop_shared.rules.lexer import Token, TokenKind, tokenize
from fleetloop_shared.rules.location import Locator
from fleetloop_shared.rules.syntax import Binary, Boolean, Call, Duration, Node, Number, Signal, String, Unary

#: Deepest nesting accepted; deeper input is abuse, and refusing it keeps Python's stack safe.
MAX_DEPTH = 64

_COMPARISONS = frozenset({"==", "!=", "<", "<=", ">", ">="})
#: Left binding power of each infix operator.
_INFIX_POWER: dict[str, int] = {
    "or": 1,
    "and": 3,
    **dict.fromkeys(_COMPARISONS, 7),
    "+": 9,
    "-": 9,
    "*": 11,
    "/": 11,
    "%": 11,
    "**": 15,
}
_NOT_POWER = 5
_NEGATE_POWER = 13


def parse(text: str, locator: Locator) -> Node:
    """The syntax tree of ``text``; :class:`RuleError` (with position) on any syntax error."""
    return _Parser(tokenize(text, locator), locator).parse()


class _Parser:
    def __init__(self, tokens: list[Token], locator: Locator) -> None:
        self._tokens = tokens
        self._pos = 0
        self._loc = locator
        self._depth = 0

    def parse(self) -> Node:
        if self._peek().kind is TokenKind.END:
            raise self._loc.error("expression is empty", 0)
        node = self._expression(0)
        token = self._peek()
        if token.kind is not TokenKind.END:
            raise self._unexpected(token, "an operator or the end of the expression")
        return node

    def _peek(self) -> Token:
        return self._tokens[self._pos]

    def _next(self) -> Token:
        token = self._tokens[self._pos]
        if token.kind is not TokenKind.END:
            self._pos += 1
        return token

    def _unexpected(self, token: Token, expected: str) -> Exception:
        found = "end of expression" if token.kind is TokenKind.END else repr(token.text)
        return self._loc.error(f"expected {expected}, found {found}", token.offset)

    def _infix_power(self, token: Token) -> int | None:
        if token.kind in (TokenKind.OP, TokenKind.KEYWORD):
            return _INFIX_POWER.get(token.text)
        return None

    def _expression(self, min_power: int) -> Node:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._loc.error(f"expression is nested deeper than {MAX_DEPTH} levels", self._peek().offset)
        left = self._prefix()
        while True:
            token = self._peek()
            power = self._infix_power(token)
            if power is None or power <= min_power:
                break
            self._next()
            # '**' is right-associative: its right side may hold another '**'.
            right = self._expression(power - 1 if token.text == "**" else power)
            left = Binary(token.text, left, right, _start(left), token.offset)
            if token.text in _COMPARISONS:
                follow = self._peek()
                if follow.kind is TokenKind.OP and follow.text in _COMPARISONS:
                    raise self._loc.error(
                        "comparisons cannot be chained; combine them with 'and'", follow.offset
                    )
        self._depth -= 1
        return left

    def _prefix(self) -> Node:
        token = self._next()
        kind = token.kind
        if kind is TokenKind.INT or kind is TokenKind.FLOAT:
            assert isinstance(token.value, int | float)
            return Number(token.value, token.offset)
        if kind is TokenKind.DURATION:
            assert isinstance(token.value, int)
            return Duration(token.value, token.text, token.offset)
        if kind is TokenKind.STRING:
            assert isinstance(token.value, str)
            return String(token.value, token.offset)
        if kind is TokenKind.KEYWORD:
            if token.text in ("true", "false"):
                return Boolean(token.text == "true", token.offset)
            if token.text == "not":
                return Unary("not", self._expression(_NOT_POWER), token.offset)
            raise self._unexpected(token, "a value")
        if kind is TokenKind.OP and token.text == "-":
            return Unary("-", self._expression(_NEGATE_POWER), token.offset)
        if kind is TokenKind.LPAREN:
            inner = self._expression(0)
            closing = self._next()
            if closing.kind is not TokenKind.RPAREN:
                raise self._unexpected(closing, "')'")
            if self._peek().kind is TokenKind.LPAREN:
                raise self._loc.error("only functions can be called", self._peek().offset)
            return inner
        if kind is TokenKind.NAME:
            if self._peek().kind is TokenKind.LPAREN:
                if "." in token.text:
                    raise self._loc.error(
                        f"{token.text!r} is a signal, not a function; it cannot be called", token.offset
                    )
                self._next()
                return Call(token.text, self._arguments(), token.offset)
            return Signal(token.text, token.offset)
        raise self._unexpected(token, "a value")

    def _arguments(self) -> tuple[Node, ...]:
        args: list[Node] = []
        if self._peek().kind is TokenKind.RPAREN:
            self._next()
            return ()
        while True:
            args.append(self._expression(0))
            token = self._next()
            if token.kind is TokenKind.RPAREN:
                return tuple(args)
            if token.kind is not TokenKind.COMMA:
                raise self._unexpected(token, "',' or ')'")


def _start(node: Node) -> int:
    return node.offset
