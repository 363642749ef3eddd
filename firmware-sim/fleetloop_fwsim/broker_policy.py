"""Who may do what on the broker: the dynamic-security commands that register devices and coordinators.

mosquitto 2.0's ``acl_file`` checks PUBLISH and delivery but grants every SUBSCRIBE, so any device could
join the coordinators' shared subscription and be handed — then denied — its share of the fleet's uplink.
The dynamic-security plugin also checks SUBSCRIBE, but 2.0 has no ``%u``/``%c`` patterns: each device
gets a role of its own, written when it is registered, naming its fleet and its id — which also ties the
device to its fleet. Coordinators are clients of the group ``coordinators`` (its role lives in
``packaging/mosquitto/dynamic-security.json``), each under a certificate CN of its own.

Pure: builds the plugin's ``$CONTROL`` commands and applies them to its config document, so registrations
made while the broker is stopped land in the file the plugin loads, with the effect the plugin would give
them (docs/decisions: "mqtt-identity-dynamic-security").
"""

from __future__ import annotations

from typing import Any

from fleetloop_shared.errors import ConfigError
from fleetloop_shared.names import safe_name

#: The group whose role may join ``$share/coordinators/…`` (packaging/mosquitto/dynamic-security.json).
COORDINATOR_GROUP = "coordinators"
#: The CN of the certificate that may send ``$CONTROL/dynamic-security/v1`` commands.
ADMIN = "broker-admin"
DEVICE_ROLE_PREFIX = "device:"

Command = dict[str, Any]


def check_name(what: str, value: str) -> str:
    """Ids and fleets become topic levels: a plain name (:mod:`fleetloop_shared.names`) has no MQTT
    wildcard, no ``/`` and no ``$`` (a device named ``+`` would otherwise be granted every device's
    topics)."""
    return safe_name(value, what, becomes="a broker identity", error=ConfigError)


def device_role(fleet: str, device_id: str) -> Command:
    """The role of one device: publish on its own ``up`` topics, subscribe to and receive its own
    ``down`` topics, under its own fleet only; everything else falls to the default (deny)."""
    check_name("fleet", fleet)
    check_name("device id", device_id)
    prefix = f"fl/v1/{fleet}/{device_id}"
    return {
        "rolename": DEVICE_ROLE_PREFIX + device_id,
        "acls": [
            {"acltype": "publishClientSend", "topic": f"{prefix}/up/#", "allow": True},
            {"acltype": "subscribePattern", "topic": f"{prefix}/down/#", "allow": True},
            {"acltype": "publishClientReceive", "topic": f"{prefix}/down/#", "allow": True},
        ],
    }


def device_commands(fleet: str, device_id: str) -> list[Command]:
    role = device_role(fleet, device_id)
    return [
        {"command": "createRole", **role},
        {"command": "createClient", "username": device_id, "roles": [{"rolename": role["rolename"]}]},
    ]


def coordinator_commands(name: str) -> list[Command]:
    check_name("coordinator name", name)
    return [
        {"command": "createClient", "username": name},
        {"command": "addGroupClient", "groupname": COORDINATOR_GROUP, "username": name},
    ]


def apply(config: dict[str, Any], commands: list[Command]) -> list[Command]:
    """Apply ``commands`` to the plugin's config document in place; returns those that changed it.

    Registering the same identity twice changes nothing; registering a name again with other rights
    (a device in another fleet, a device's CN as a coordinator) is refused with :class:`ConfigError`
    rather than silently widening or moving what the certificate may do. Linear in the document and the
    commands (fleets of thousands are registered in one call)."""
    clients: list[dict[str, Any]] = config.setdefault("clients", [])
    roles: list[dict[str, Any]] = config.setdefault("roles", [])
    groups: list[dict[str, Any]] = config.setdefault("groups", [])
    client_by_name = {c["username"]: c for c in clients}
    role_by_name = {r["rolename"]: r for r in roles}
    group_by_name = {g["groupname"]: g for g in groups}
    changed: list[Command] = []
    for cmd in commands:
        kind = cmd["command"]
        if kind == "createRole":
            role = {k: v for k, v in cmd.items() if k != "command"}
            have = role_by_name.get(role["rolename"])
            if have is None:
                roles.append(role)
                role_by_name[role["rolename"]] = role
                changed.append(cmd)
            elif have.get("acls") != role["acls"]:
                raise ConfigError(
                    f"broker role {role['rolename']!r} exists with other rights: {have.get('acls')}"
                )
        elif kind == "createClient":
            client = {k: v for k, v in cmd.items() if k != "command"}
            client.setdefault("roles", [])
            had = client_by_name.get(client["username"])
            if had is None:
                clients.append(client)
                client_by_name[client["username"]] = client
                changed.append(cmd)
            elif had.get("roles", []) != client["roles"]:
                raise ConfigError(f"broker client {client['username']!r} is registered with other roles")
        elif kind == "addGroupClient":
            group = group_by_name.get(cmd["groupname"])
            if group is None:
                raise ConfigError(f"broker group {cmd['groupname']!r} is missing from the policy")
            members = group.setdefault("clients", [])
            if all(m.get("username") != cmd["username"] for m in members):
                members.append({"username": cmd["username"]})
                changed.append(cmd)
        else:
            raise ConfigError(f"unsupported broker command {kind!r}")
    return changed
