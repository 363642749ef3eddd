"""Tokenizer of the trigger language.

Hand-written on purpose: the language is a whitelist, and a tokenizer that only knows our tokens refuses
everything else (attribute tricks, lambdas, subscripts) at the first character, with its position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fleetloop_shared.errors import RuleError
from fleetloop_shared.rules.durations import is_duration_unit, parse_duration
from fleetloop_shared.rules.location import Locator

#: Longest expression text accepted; trigger conditions are one-liners, this only stops abuse.
MAX_EXPRESSION_CHARS = 8192
INT64_MAX = 2**63 - 1

KEYWORDS = frozenset({"and", "or", "not", "true", "false"})
#: Python words that people try; refused by name so the message says it is not part of the language.
_FOREIGN_WORDS = frozenset(
    {
        "lambda",
        "if",
        "else",
        "for",
        "in",
        "is",
        "import",
        "from",
        "def",
        "class",
        "return",
        "yield",
        "while",
        "with",
        "as",
        "assert",
        "del",
        "global",
        "nonlocal",
        "pass",
        "raise",
        "try",
        "except",
        "finally",
        "async",
        "await",
        "None",
        "True",
        "False",
        "null",
    }
)


class TokenKind(Enum):
    INT = "integer"
    FLOAT = "number"
    DURATION = "duration"
    STRING = "string"
    NAME = "name"
    KEYWORD = "keyword"
    OP = "operator"
    LPAREN = "'('"
    RPAREN = "')'"
    COMMA = "','"
    END = "end of expression"


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    text: str
    offset: int
    value: int | float | str | None = None


_DIGITS = frozenset("0123456789")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_SUFFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*", re.ASCII)
_OPERATORS = ("**", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%")
#: Spellings from other languages, refused with a pointer to ours.
_FOREIGN = {
    "//": "'//' is not an operator; use floor(a / b)",
    "[": "subscripts ('[...]') are not part of the rule language",
    "{": "'{' is not part of the rule language",
    ":": "':' is not part of the rule language (no lambdas or slices)",
    "@": "'@' is not part of the rule language",
    "^": "'^' is not an operator; use '**' for powers",
    "~": "'~' is not an operator; use 'not'",
    "&&": "use 'and' instead of '&&'",
    "||": "use 'or' instead of '||'",
    "=": "use '==' to compare ('=' is not an operator)",
    "!": "use 'not' instead of '!'",
    "&": "use 'and' instead of '&'",
    "|": "use 'or' instead of '|'",
}
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


def tokenize(text: str, locator: Locator) -> list[Token]:
    """The tokens of ``text``, ending with an END token; :class:`RuleError` at the first bad character."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise locator.error(f"expression is longer than {MAX_EXPRESSION_CHARS} characters", 0)
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch in _DIGITS or (ch == "." and i + 1 < n and text[i + 1] in _DIGITS):
            token = _number(text, i, locator)
        elif ch in _NAME_START:
            token = _name(text, i, locator)
        elif ch in "\"'":
            token = _string(text, i, locator)
        elif ch == "(":
            token = Token(TokenKind.LPAREN, ch, i)
        elif ch == ")":
            token = Token(TokenKind.RPAREN, ch, i)
        elif ch == ",":
            token = Token(TokenKind.COMMA, ch, i)
        else:
            token = _operator(text, i, locator)
        tokens.append(token)
        i += len(token.text)
    tokens.append(Token(TokenKind.END, "", n))
    return tokens


def _number(text: str, i: int, locator: Locator) -> Token:
    match = _NUMBER.match(text, i)
    assert match is not None  # the caller saw a digit
    literal = match[0]
    suffix_match = _SUFFIX.match(text, match.end())
    if suffix_match is not None:
        suffix = suffix_match[0]
        full = literal + suffix
        if not is_duration_unit(suffix) or "e" in literal.lower():
            raise locator.error(f"{full!r} is neither a number nor a duration (units: ms, s, m, h)", i)
        try:
            ns = parse_duration(full)
        except RuleError as exc:
            raise locator.error(exc.reason, i) from None
        return Token(TokenKind.DURATION, full, i, ns)
    if text[match.end() : match.end() + 1] == ".":
        raise locator.error(f"malformed number {literal + '.'!r}", i)
    if literal.isdigit():
        value = int(literal)
        if value > INT64_MAX:
            raise locator.error(f"integer {literal} does not fit in 64 bits", i)
        return Token(TokenKind.INT, literal, i, value)
    number = float(literal)
    if number in (float("inf"), float("-inf")):
        raise locator.error(f"number {literal} is out of range", i)
    return Token(TokenKind.FLOAT, literal, i, number)


def _name(text: str, i: int, locator: Locator) -> Token:
    match = _NAME.match(text, i)
    assert match is not None  # the caller saw a letter
    name = match[0]
    after = match.end()
    if text[after : after + 1] == ".":
        raise locator.error(f"incomplete signal path {name + '.'!r}", i)
    for part_offset, part in _parts(name, i):
        if part.startswith("_"):
            raise locator.error(f"names may not start with '_' ({part!r})", part_offset)
    if name in KEYWORDS:
        return Token(TokenKind.KEYWORD, name, i)
    if name in _FOREIGN_WORDS:
        hint = {"True": " (write true)", "False": " (write false)", "None": "", "null": ""}.get(name, "")
        raise locator.error(f"{name!r} is not part of the rule language{hint}", i)
    return Token(TokenKind.NAME, name, i, name)


def _parts(name: str, offset: int) -> list[tuple[int, str]]:
    """The dot-separated parts of ``name`` with their offsets."""
    parts: list[tuple[int, str]] = []
    for part in name.split("."):
        parts.append((offset, part))
        offset += len(part) + 1
    return parts


def _string(text: str, i: int, locator: Locator) -> Token:
    quote = text[i]
    chars: list[str] = []
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == quote:
            return Token(TokenKind.STRING, text[i : j + 1], i, "".join(chars))
        if ch == "\n":
            break
        if ch == "\\":
            escaped = text[j + 1 : j + 2]
            if escaped not in _ESCAPES:
                raise locator.error(f"unknown escape '\\{escaped}' in string", j)
            chars.append(_ESCAPES[escaped])
            j += 2
            continue
        chars.append(ch)
        j += 1
    raise locator.error("string is not closed", i)


def _operator(text: str, i: int, locator: Locator) -> Token:
    for foreign, message in _FOREIGN.items():
        if text.startswith(foreign, i) and not any(
            text.startswith(op, i) and len(op) >= len(foreign) for op in _OPERATORS
        ):
            raise locator.error(message, i)
    for op in _OPERATORS:
        if text.startswith(op, i):
            return Token(TokenKind.OP, op, i)
    raise locator.error(f"unexpected character {text[i]!r}", i)
