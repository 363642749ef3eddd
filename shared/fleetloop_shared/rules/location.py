"""Turning an offset inside an expression into the line and column an operator sees in their file.

An expression usually lives inside a YAML document, quoted or not, sometimes folded over several lines.
The compiler only knows offsets into the expression text; a :class:`Locator` maps those back to the
document so every :class:`RuleError` points at the exact character that is wrong.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from fleetloop_shared.errors import RuleError


class Locator:
    """Maps expression offsets to 1-based (line, column) in the source document."""

    def __init__(self, source: str, positions: Sequence[tuple[int, int]]) -> None:
        # positions[i] = (line, col) of expression character i; one extra entry for "end of text".
        self.source = source
        self._positions = positions

    @classmethod
    def standalone(cls, text: str, *, source: str = "", line: int = 1, col: int = 1) -> Locator:
        """Expression text that starts at ``line``:``col`` and is copied verbatim from the source."""
        positions: list[tuple[int, int]] = []
        cur_line, cur_col = line, col
        for ch in text:
            positions.append((cur_line, cur_col))
            if ch == "\n":
                cur_line, cur_col = cur_line + 1, 1
            else:
                cur_col += 1
        positions.append((cur_line, cur_col))
        return cls(source, positions)

    @classmethod
    def within(cls, value: str, document: str, start: int, end: int, *, source: str = "") -> Locator:
        """``value`` is the parsed content of ``document[start:end]`` (a YAML scalar in any style).

        Quoting, escapes, folding and indentation make the parsed value differ from the raw text, so the
        characters are aligned greedily: each value character maps to the next raw character equal to it
        (any whitespace matches any whitespace). For plain and simply-quoted scalars this is exact.
        """
        line_starts = [0]
        line_starts.extend(i + 1 for i, ch in enumerate(document) if ch == "\n")

        def line_col(index: int) -> tuple[int, int]:
            row = bisect.bisect_right(line_starts, index) - 1
            return row + 1, index - line_starts[row] + 1

        positions: list[tuple[int, int]] = []
        j = start
        last = start
        for ch in value:
            k = j
            while k < end and not (document[k] == ch or (ch.isspace() and document[k].isspace())):
                k += 1
            if k < end:
                last, j = k, k + 1
            positions.append(line_col(last))
        positions.append(line_col(j))
        return cls(source, positions)

    def position(self, offset: int) -> tuple[int, int]:
        offset = max(0, min(offset, len(self._positions) - 1))
        return self._positions[offset]

    def error(self, message: str, offset: int) -> RuleError:
        line, col = self.position(offset)
        return RuleError(message, line=line, col=col, source=self.source)
