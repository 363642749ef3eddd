"""The broker's identity policy: registrations written into the plugin's file while the broker is stopped
must mean what the same commands mean when the running plugin applies them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleetloop_fwsim.broker import PACKAGING, MosquittoProcess, mosquitto_binary
from fleetloop_fwsim.broker_policy import apply, coordinator_commands, device_commands, device_role
from fleetloop_shared.errors import ConfigError


def shipped() -> dict[str, Any]:
    return dict(json.loads((PACKAGING / "dynamic-security.json").read_text()))


def rights(doc: dict[str, Any]) -> dict[str, Any]:
    """What a dynamic-security document grants, whatever the plugin adds in formatting or defaults."""
    return {
        "default": doc["defaultACLAccess"],
        "clients": {c["username"]: sorted(r["rolename"] for r in c.get("roles", [])) for c in doc["clients"]},
        "roles": {
            r["rolename"]: sorted((a["acltype"], a["topic"], a["allow"]) for a in r.get("acls", []))
            for r in doc["roles"]
        },
        "groups": {
            g["groupname"]: (
                sorted(r["rolename"] for r in g.get("roles", [])),
                sorted(c["username"] for c in g.get("clients", [])),
            )
            for g in doc["groups"]
        },
    }


def test_a_device_role_names_its_fleet_and_id_only() -> None:
    role = device_role("cars", "car-1")
    assert role["rolename"] == "device:car-1"
    assert sorted((a["acltype"], a["topic"]) for a in role["acls"]) == [
        ("publishClientReceive", "fl/v1/cars/car-1/down/#"),
        ("publishClientSend", "fl/v1/cars/car-1/up/#"),
        ("subscribePattern", "fl/v1/cars/car-1/down/#"),
    ]


def test_registering_twice_changes_nothing_and_conflicts_are_refused() -> None:
    doc = shipped()
    assert len(apply(doc, device_commands("cars", "car-1") + coordinator_commands("coord-a"))) == 4
    before = json.dumps(doc, sort_keys=True)
    assert apply(doc, device_commands("cars", "car-1") + coordinator_commands("coord-a")) == []
    assert json.dumps(doc, sort_keys=True) == before
    with pytest.raises(ConfigError, match="other rights"):
        apply(doc, device_commands("trucks", "car-1"))
    with pytest.raises(ConfigError, match="other roles"):
        apply(doc, coordinator_commands("car-1"))
    with pytest.raises(ConfigError, match="other roles"):
        apply(doc, device_commands("cars", "coord-a"))
    with pytest.raises(ConfigError, match="unsupported"):
        apply(doc, [{"command": "deleteClient", "username": "car-1"}])


def test_the_file_written_offline_grants_what_the_running_plugin_saves(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    offline = MosquittoProcess(tmp_path / "offline")
    online = MosquittoProcess(tmp_path / "online")
    for broker in (offline, online):
        if broker is online:
            broker.start()  # registrations below go through $CONTROL
        broker.add_coordinator("coordinator-a")
        broker.add_devices("cars", ["car-1", "car-2"])
        broker.add_devices("plcs", ["plc-1"])
        broker.add_coordinator("coordinator-b")
    try:
        saved_by_plugin = json.loads(online.dynsec_path.read_text())
        offline.start()  # writes its file; the plugin loads it
        written_offline = json.loads(offline.dynsec_path.read_text())
        assert rights(saved_by_plugin) == rights(written_offline) == rights(online.policy)
        assert rights(written_offline)["groups"]["coordinators"][1] == ["coordinator-a", "coordinator-b"]
        # the plugin accepted the offline file: it saves it back unchanged in meaning on the next change
        offline.add_devices("cars", ["car-3"])
        assert rights(json.loads(offline.dynsec_path.read_text())) == rights(offline.policy)
    finally:
        online.stop()
        offline.stop()
