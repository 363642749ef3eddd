"""API tokens (only the SHA-256 of each secret): SQL and the in-memory fake."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from fleetloop_cloud.repositories.database import Database
from fleetloop_cloud.repositories.records import TokenRecord
from fleetloop_shared.errors import NotFoundError, StateError

_COLUMNS = "name, role, token_hash, created_at, created_by, expires_at, revoked_at, last_used_at"


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _token(r: tuple[Any, ...]) -> TokenRecord:
    return TokenRecord(r[0], r[1], r[2], float(r[3]), r[4], _opt(r[5]), _opt(r[6]), _opt(r[7]))


def _exists(name: str) -> StateError:
    return StateError(f"a token named {name!r} exists already (names are not reused, even revoked)")


def _missing(name: str) -> NotFoundError:
    return NotFoundError(f"no token named {name!r}")


def _revoked_already(name: str) -> StateError:
    return StateError(f"token {name!r} is revoked already")


class SqlTokens:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, token: TokenRecord) -> None:
        t = token
        with self._db.write() as tx:
            cur = tx.execute(
                f"""INSERT INTO api_tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT DO NOTHING""",
                (t.name, t.role, t.token_hash, t.created_at, t.created_by, t.expires_at, t.revoked_at,
                 t.last_used_at),
            )  # fmt: skip
            if cur.rowcount == 0:
                raise _exists(t.name)

    def by_hash(self, token_hash: str) -> TokenRecord | None:
        rows = self._db.read(f"SELECT {_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,))
        return _token(rows[0]) if rows else None

    def get(self, name: str) -> TokenRecord | None:
        rows = self._db.read(f"SELECT {_COLUMNS} FROM api_tokens WHERE name = ?", (name,))
        return _token(rows[0]) if rows else None

    def all(self) -> list[TokenRecord]:
        return [_token(r) for r in self._db.read(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_at")]

    def revoke(self, name: str, now: float) -> TokenRecord:
        with self._db.write() as tx:
            row = tx.execute(f"SELECT {_COLUMNS} FROM api_tokens WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise _missing(name)
            before = _token(row)
            if before.revoked_at is not None:
                raise _revoked_already(name)
            tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ?", (now, name))
            return before

    def used(self, name: str, now: float) -> None:
        with self._db.write() as tx:
            tx.execute("UPDATE api_tokens SET last_used_at = ? WHERE name = ?", (now, name))


class MemoryTokens:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenRecord] = {}

    def add(self, token: TokenRecord) -> None:
        with self._lock:
            if token.name in self._tokens or any(
                t.token_hash == token.token_hash for t in self._tokens.values()
            ):
                raise _exists(token.name)
            self._tokens[token.name] = token

    def by_hash(self, token_hash: str) -> TokenRecord | None:
        with self._lock:
            return next((t for t in self._tokens.values() if t.token_hash == token_hash), None)

    def get(self, name: str) -> TokenRecord | None:
        with self._lock:
            return self._tokens.get(name)

    def all(self) -> list[TokenRecord]:
        with self._lock:
            return sorted(self._tokens.values(), key=lambda t: t.created_at)

    def revoke(self, name: str, now: float) -> TokenRecord:
        with self._lock:
            before = self._tokens.get(name)
            if before is None:
                raise _missing(name)
            if before.revoked_at is not None:
                raise _revoked_already(name)
            self._tokens[name] = dataclasses.replace(before, revoked_at=now)
            return before

    def used(self, name: str, now: float) -> None:
        with self._lock:
            if name in self._tokens:
                self._tokens[name] = dataclasses.replace(self._tokens[name], last_used_at=now)
