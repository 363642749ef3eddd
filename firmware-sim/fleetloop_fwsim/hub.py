"""A home hub's own MQTT broker: a plain mosquitto on loopback, as zigbee2mqtt and Home Assistant use.

This is *not* the fleet's broker (:mod:`fleetloop_fwsim.broker`, TLS and dynamic security): it is the
broker inside the house, which the hub's agent reads devices from. It runs with its own minimal config
(one loopback listener, anonymous clients, no persistence), stoppable and restartable on the same port.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from fleetloop_fwsim.broker import mosquitto_binary
from fleetloop_fwsim.child_process import await_listening, free_port, terminate
from fleetloop_shared.errors import ConfigError


class HubBroker:
    """mosquitto for one hub: ``127.0.0.1:<port>``, anonymous, nothing persisted."""

    def __init__(self, workdir: Path, *, port: int = 0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = self.workdir / "hub-mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        path = self.workdir / "hub-mosquitto.conf"
        path.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        )
        return path

    def start(self, timeout_s: float = 15.0) -> None:
        conf = self._config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        await_listening(
            self.proc, self.host, self.port, name="hub mosquitto", timeout_s=timeout_s, log_path=self.log_path
        )

    def stop(self) -> None:
        terminate(self.proc)
