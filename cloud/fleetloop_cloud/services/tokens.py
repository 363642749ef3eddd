"""API tokens: issued to operators by an admin (the first one by ``fleetloop cloud init``), shown once,
stored hashed, each with a name, a role and an optional expiry; checked on every operator request.

:meth:`TokenService.authenticate` is what the HTTP surface calls with the bearer secret: it answers
the :class:`~.access.Caller` the request acts as, or UnauthenticatedError saying whether the token was
missing, unknown, expired or revoked — never echoing the secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fleetloop_cloud.identity.roles import Role, parse_role
from fleetloop_cloud.identity.tokens import (
    TokenState,
    check_name,
    new_secret,
    refusal,
    same_hash,
    token_hash,
)
from fleetloop_cloud.repositories.interfaces import TokenRepository
from fleetloop_cloud.repositories.records import TokenRecord
from fleetloop_cloud.services.access import Access, Caller
from fleetloop_shared.errors import StateError, UnauthenticatedError, UserError

log = logging.getLogger("fleetloop.cloud.tokens")

#: How often a token's "last used" time is written at most (not one metadata write per request).
LAST_USED_RESOLUTION_S = 60.0
#: Longest expiry a token may be given: ten years; "never" is None.
MAX_LIFETIME_S = 10 * 365 * 86400.0
_HOW = "send 'Authorization: Bearer <token>' (fleetloop: $FLEETLOOP_TOKEN or a context's token)"


@dataclass(frozen=True)
class TokenView:
    """A token as ``tokens list`` shows it: its stored record (shown without the hash; the secret is not
    stored) and the state it is in now (``active``, ``expired``, ``revoked``)."""

    record: TokenRecord
    state: str


@dataclass(frozen=True)
class IssuedToken:
    """A new token: its view and, this once, its secret."""

    token: TokenView
    secret: str


def _view(t: TokenRecord, now: float) -> TokenView:
    state = refusal(TokenState(t.name, Role(t.role), t.expires_at, t.revoked_at), now)
    return TokenView(t, state or "active")


class TokenService:
    def __init__(self, tokens: TokenRepository, access: Access) -> None:
        self._tokens = tokens
        self._access = access

    def authenticate(
        self, secret: str | None, now: float, *, transport: str, address: str, request_id: str
    ) -> Caller:
        """The operator a bearer secret stands for; UnauthenticatedError naming what is wrong."""
        if not secret:
            raise UnauthenticatedError(f"no API token: {_HOW}")
        wanted = token_hash(secret)
        record = self._tokens.by_hash(wanted)
        if record is not None and not same_hash(record.token_hash, wanted):
            record = None
        state = None if record is None else TokenState(record.name, Role(record.role), record.expires_at,
                                                       record.revoked_at)  # fmt: skip
        why = refusal(state, now)
        if why is not None or record is None:
            named = f" {record.name!r}" if record is not None else ""
            raise UnauthenticatedError(f"API token{named} is {why}: ask an admin for a new one")
        if record.last_used_at is None or now - record.last_used_at >= LAST_USED_RESOLUTION_S:
            self._tokens.used(record.name, now)
        return Caller.operator(
            record.name, Role(record.role), transport=transport, address=address, request_id=request_id
        )

    def create(
        self, caller: Caller, name: str, role: str, now: float, *, expires_at: float | None = None
    ) -> IssuedToken:
        """A new token (admin only); its secret is in the answer and nowhere else."""
        self._access.operator(caller, "tokens.create")
        issued = self._issue(caller, name, role, now, expires_at)
        self._access.record(
            caller, "tokens.create", name, now, after=issued.token.record.role,
            detail="no expiry" if expires_at is None else f"expires at {expires_at:.0f}",
        )  # fmt: skip
        return issued

    def bootstrap(self, now: float, *, name: str = "admin", recover: bool = False) -> IssuedToken:
        """The first admin token of a coordinator (``fleetloop cloud init``), made in-process by whoever
        holds the data directory. Refused when tokens exist already, unless ``recover`` (a lost admin
        token: a new admin token under a fresh name)."""
        local = Caller.local()
        existing = self._tokens.all()
        if existing and not recover:
            raise StateError(
                f"this coordinator has {len(existing)} API token(s) already; an admin makes more with "
                "'fleetloop tokens create' (lost every admin token? 'fleetloop cloud init --recover')"
            )
        taken, base, i = {t.name for t in existing}, name, 1
        while name in taken:
            i += 1
            name = f"{base}-{i}"
        issued = self._issue(local, name, Role.ADMIN.value, now, None)
        self._access.record(local, "tokens.create", name, now, after=Role.ADMIN.value,
                            detail="recovery" if recover else "bootstrap")  # fmt: skip
        return issued

    def _issue(
        self, caller: Caller, name: str, role: str, now: float, expires_at: float | None
    ) -> IssuedToken:
        try:
            check_name(name)
            parsed = parse_role(role)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if expires_at is not None and not (now < expires_at <= now + MAX_LIFETIME_S):
            raise UserError("expiry must be in the future and at most ten years away")
        secret = new_secret()
        record = TokenRecord(name, parsed.value, token_hash(secret), now, caller.name, expires_at, None, None)
        self._tokens.add(record)
        log.info("token %r (%s) created by %s", name, parsed.value, caller.name)
        return IssuedToken(_view(record, now), secret)

    def all(self, caller: Caller, now: float) -> list[TokenView]:
        self._access.operator(caller, "tokens.list")
        return [_view(t, now) for t in self._tokens.all()]

    def revoke(self, caller: Caller, name: str, now: float) -> TokenView:
        """Revoke at once, on every coordinator sharing the database (tokens are looked up per request)."""
        self._access.operator(caller, "tokens.revoke")
        before = self._tokens.revoke(name, now)
        self._access.record(caller, "tokens.revoke", name, now, before="active", after="revoked")
        revoked = self._tokens.get(name)
        return _view(revoked if revoked is not None else before, now)

    def exist(self) -> bool:
        """Whether any token was ever issued (serving operators without one is pointless)."""
        return bool(self._tokens.all())
