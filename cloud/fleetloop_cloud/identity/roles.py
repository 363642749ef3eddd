"""Roles and the operator actions each one may take: the one table every route and service agrees on.

Four roles, as Mender and hawkBit split them: ``viewer`` reads, ``operator`` changes campaigns,
``release-manager`` uploads releases and drives rollouts, ``admin`` manages tokens and keys and may do
everything. ``operator`` and ``release-manager`` are siblings, not ranks: whoever changes what devices
capture need not be able to ship firmware, and the other way round. Every action names one role; the
roles allowed to take it are that role, ``admin``, and (for reads) everyone.
"""

from __future__ import annotations

from enum import StrEnum

from fleetloop_shared.classification import SignalClass, Visibility


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    RELEASE_MANAGER = "release-manager"
    ADMIN = "admin"


#: Every operator action and the role it needs. Services name their action when they ask
#: ``services.access.Access``; routes declare the action they call, so the OpenAPI document, the
#: route table and the services cannot disagree.
ACTIONS: dict[str, Role] = {
    "whoami": Role.VIEWER,
    "summary": Role.VIEWER,
    "devices.list": Role.VIEWER,
    "devices.get": Role.VIEWER,
    "campaigns.list": Role.VIEWER,
    "query": Role.VIEWER,
    "releases.list": Role.VIEWER,
    "rollouts.list": Role.VIEWER,
    "rollouts.get": Role.VIEWER,
    "audit.list": Role.VIEWER,
    "audit.verify": Role.VIEWER,
    "metrics": Role.VIEWER,
    "captures.get": Role.VIEWER,
    "captures.export": Role.VIEWER,
    "campaigns.validate": Role.VIEWER,
    "catalog.list": Role.VIEWER,
    "campaigns.apply": Role.OPERATOR,
    "campaigns.delete": Role.OPERATOR,
    "catalog.push": Role.OPERATOR,
    "releases.upload": Role.RELEASE_MANAGER,
    "releases.stage": Role.RELEASE_MANAGER,
    "rollouts.create": Role.RELEASE_MANAGER,
    "rollouts.pause": Role.RELEASE_MANAGER,
    "rollouts.resume": Role.RELEASE_MANAGER,
    "rollouts.abort": Role.RELEASE_MANAGER,
    "rollouts.approve": Role.RELEASE_MANAGER,
    "rollouts.rollback": Role.RELEASE_MANAGER,
    "rollouts.undo": Role.RELEASE_MANAGER,
    "rollouts.retry": Role.RELEASE_MANAGER,
    "rollouts.remove": Role.RELEASE_MANAGER,
    "tokens.create": Role.ADMIN,
    "tokens.list": Role.ADMIN,
    "tokens.revoke": Role.ADMIN,
    "keys.rotate": Role.ADMIN,
    "retention.get": Role.VIEWER,
    "retention.set": Role.ADMIN,
    "devices.erase": Role.ADMIN,
}


def parse_role(text: str) -> Role:
    """A role by name; ValueError listing the roles for anything else."""
    try:
        return Role(text)
    except ValueError:
        raise ValueError(f"unknown role {text!r}; roles are {', '.join(r.value for r in Role)}") from None


def required_role(action: str) -> Role:
    """The role ``action`` needs; KeyError for an action nobody declared (a bug, never allowed)."""
    return ACTIONS[action]


def allows(role: Role, action: str) -> bool:
    """May a holder of ``role`` take ``action``?"""
    needed = ACTIONS.get(action)
    if needed is None:
        return False
    return role is Role.ADMIN or needed is Role.VIEWER or role is needed


#: Actions that change nothing (every other action is a write, and leaves an audit entry).
READS = frozenset(a for a, role in ACTIONS.items() if role is Role.VIEWER) | {"tokens.list"}


def is_write(action: str) -> bool:
    return action in ACTIONS and action not in READS


_F, _C, _W = Visibility.FULL, Visibility.COARSENED, Visibility.WITHHELD
#: What each role sees of each signal class, in query results, exports and the console alike (the query
#: layer builds ``samples`` from this; docs/privacy.md shows it as a table). ``viewer`` and
#: ``release-manager`` read the fleet's engineering data with positions rounded to a ~1 km grid and no
#: identifier; ``operator``, who designs what devices capture, needs exact positions but no identifiers;
#: ``admin`` sees everything, and every read records the classes it touched in the audit log.
CLASS_ACCESS: dict[Role, dict[SignalClass, Visibility]] = {
    Role.VIEWER: {SignalClass.PUBLIC: _F, SignalClass.INTERNAL: _F, SignalClass.LOCATION: _C,
                  SignalClass.PERSONAL: _W, SignalClass.SENSITIVE: _W},
    Role.OPERATOR: {SignalClass.PUBLIC: _F, SignalClass.INTERNAL: _F, SignalClass.LOCATION: _F,
                    SignalClass.PERSONAL: _W, SignalClass.SENSITIVE: _W},
    Role.RELEASE_MANAGER: {SignalClass.PUBLIC: _F, SignalClass.INTERNAL: _F, SignalClass.LOCATION: _C,
                           SignalClass.PERSONAL: _W, SignalClass.SENSITIVE: _W},
    Role.ADMIN: {c: _F for c in SignalClass},
}  # fmt: skip


def class_access(role: Role | None) -> dict[SignalClass, Visibility]:
    """What ``role`` sees of each class; no role (not an operator): the viewer's, the least."""
    return dict(CLASS_ACCESS[role if role is not None else Role.VIEWER])
