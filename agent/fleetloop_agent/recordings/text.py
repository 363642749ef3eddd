"""Reading a recording's file: bounded size, UTF-8 text, and CSV records that remember quoting and lines.

``csv.reader`` cannot say whether a field was quoted, and here that is the difference between the text
``"1.5"`` and the number ``1.5`` (see :mod:`.cells`); so CSV is tokenized here, once, for the long and wide
CSV readers and for GVRET logs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from fleetloop_shared.errors import ConfigError

#: Largest recording read into memory (policy: refuse, naming the file and the limit).
MAX_INPUT_BYTES: Final = 512 * 1024 * 1024

Field = tuple[str, bool]  # (text, quoted)


def check_size(path: Path, limit: int = MAX_INPUT_BYTES) -> int:
    """The file's size; ConfigError when it is missing, unreadable or over ``limit``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if size > limit:
        raise ConfigError(f"{path}: {size} bytes exceeds the limit of {limit} bytes for a recording")
    return size


def read_bytes(path: Path, limit: int = MAX_INPUT_BYTES) -> bytes:
    check_size(path, limit)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_text(path: Path, limit: int = MAX_INPUT_BYTES) -> str:
    """The file as text (UTF-8, a leading BOM dropped); bytes that are not UTF-8 or a NUL are refused
    with their line."""
    raw = read_bytes(path, limit)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise ConfigError(f"{path}:{line}: a NUL byte; not a text file")
    return text


@functools.cache
def _field_pattern(delimiter: str) -> re.Pattern[str]:
    # One field (RFC 4180: quoted with "" escapes, or bare) and what ends it, matched from the start of a
    # field: a quote inside a bare field or text after a closing quote is an error, not a guess.
    d = re.escape(delimiter)
    return re.compile(rf'(?:"([^"]*(?:""[^"]*)*)"|([^{d}"\r\n]*))({d}|\r\n|\n|\r|\Z)')


def check_delimiter(delimiter: str) -> None:
    if len(delimiter) != 1 or delimiter in '"\r\n':
        raise ConfigError(f"delimiter must be one character (not a quote or newline), got {delimiter!r}")


def csv_records(text: str, source: Path | str, delimiter: str = ",") -> Iterator[tuple[int, list[Field]]]:
    """(line number, fields) per record; blank lines are skipped. A quoted field may span lines."""
    check_delimiter(delimiter)
    pattern = _field_pattern(delimiter)
    pos, line, end = 0, 1, len(text)
    while pos < end:
        start_line = line
        fields: list[Field] = []
        while True:
            m = pattern.match(text, pos)
            if m is None:
                raise ConfigError(f"{source}:{line}: malformed CSV (a stray or unclosed quote)")
            quoted, bare, sep = m.group(1), m.group(2), m.group(3)
            if quoted is not None:
                fields.append((quoted.replace('""', '"'), True))
                line += quoted.count("\n") + quoted.count("\r") - quoted.count("\r\n")
            else:
                fields.append((bare, False))
            pos = m.end()
            if sep != delimiter:
                if sep:
                    line += 1
                break
        if any(q or f.strip() for f, q in fields):  # blank records are skipped
            yield start_line, fields


def sniff_delimiter(text: str) -> str:
    """The delimiter of a CSV whose header line uses ``;``, a tab or ``,`` (the most frequent wins)."""
    header = text.split("\n", 1)[0]
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","
