"""A private MQTT 5 broker for the demo, the simulator and the tests: mosquitto with the shipped config.

The broker runs ``packaging/mosquitto/mosquitto.conf`` and ``packaging/mosquitto/dynamic-security.json``
as shipped (only the ``@...@`` placeholders are filled in), so whatever runs here exercises the
configuration operators deploy: TLS with client certificates, identity = certificate CN = MQTT username =
client id, every PUBLISH, SUBSCRIBE and delivery checked by the dynamic-security plugin.
:class:`CertificateAuthority` issues the throwaway certificates (a CA, the broker's, one per client);
:meth:`MosquittoProcess.add_devices` and :meth:`MosquittoProcess.add_coordinator` register identities with
the broker (:mod:`fleetloop_fwsim.broker_policy`) — a certificate the broker does not know may connect but
do nothing.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import glob
import ipaddress
import json
import os
import pwd
import queue
import resource
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from fleetloop_fwsim.broker_policy import ADMIN, Command, apply, coordinator_commands, device_commands
from fleetloop_fwsim.child_process import RestartableChild, await_listening, free_port, terminate
from fleetloop_shared.errors import ConfigError, UnavailableError

#: The shipped broker configuration (repository checkout; the systemd packaging installs the same files).
PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"
CERT_VALIDITY = dt.timedelta(days=30)
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
#: Commands per ``$CONTROL`` message (two per device). mosquitto 2.0 saves its whole config after every
#: command, so a running broker registers devices in time growing with the square of their number
#: (measured: 300 in ~3 s, 1,000 in ~18 s); register large fleets before :meth:`MosquittoProcess.start`
#: (written at once).
CONTROL_BATCH = 100
CONTROL_TIMEOUT_S = 120.0


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)


def dynsec_plugin() -> str | None:
    """The dynamic-security plugin that comes with mosquitto (Debian: package mosquitto, multiarch path)."""
    candidates = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))
    candidates += ["/usr/lib/mosquitto_dynamic_security.so", "/usr/local/lib/mosquitto_dynamic_security.so"]
    return next((p for p in candidates if Path(p).is_file()), None)


def _answer(answers: queue.Queue[Any], what: str) -> Any:
    try:
        return answers.get(timeout=CONTROL_TIMEOUT_S)
    except queue.Empty:
        raise UnavailableError(f"the broker did not answer {what} within {CONTROL_TIMEOUT_S:.0f} s") from None


class CertificateAuthority:
    """A throwaway CA (EC P-256) that issues the broker's and the clients' certificates into ``directory``."""

    def __init__(self, directory: Path, name: str = "fleetloop private CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = self.dir / "ca.pem"
        self.ca_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, *, server: bool = False) -> tuple[Path, Path]:
        """(certificate, key) files for CN=``common_name``; ``server`` adds localhost / 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.dir / f"{common_name}.pem"
        key_path = self.dir / f"{common_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    def client(self, common_name: str) -> tuple[Path, Path]:
        """The client certificate for ``common_name``, issued on first use."""
        cert, key = self.dir / f"{common_name}.pem", self.dir / f"{common_name}.key"
        if cert.is_file() and key.is_file():
            return cert, key
        return self.issue(common_name)


class MosquittoProcess(RestartableChild):
    """mosquitto on a free loopback port with the shipped config; restartable on the same port.

    Holds the broker's identity policy (the dynamic-security document, starting from the shipped one):
    what is registered before :meth:`start` is written with the config, what is registered while the
    broker runs goes through ``$CONTROL`` under the ``broker-admin`` certificate, and every (re)start
    writes the document again — a broker killed while saving it comes back with everything registered.
    """

    def __init__(self, workdir: Path, *, ca: CertificateAuthority | None = None, port: int = 0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        plugin = dynsec_plugin()
        if plugin is None:
            raise ConfigError(
                "mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is not installed; "
                "Debian's package mosquitto ships it"
            )
        self.binary = binary
        self.plugin = plugin
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = ca or CertificateAuthority(self.workdir / "certs")
        self.ca.issue("broker", server=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.dynsec_path = self.workdir / "dynamic-security.json"
        #: The plugin's config as it is (or will be, once started): the shipped policy plus registrations.
        self.policy: dict[str, Any] = json.loads((PACKAGING / "dynamic-security.json").read_text())
        self._policy_lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def add_devices(self, fleet: str, device_ids: Iterable[str]) -> None:
        """Issue each device's certificate (CN = device id) and register it in ``fleet``: it may publish
        on ``fl/v1/{fleet}/{id}/up/#`` and subscribe to and receive ``fl/v1/{fleet}/{id}/down/#``, nothing
        else. Registering a device again in the same fleet changes nothing; in another, is refused."""
        ids = list(device_ids)
        commands = [c for device_id in ids for c in device_commands(fleet, device_id)]
        self._register(commands)
        for device_id in ids:
            self.ca.client(device_id)

    def add_coordinator(self, name: str = "coordinator") -> tuple[Path, Path]:
        """Issue a coordinator's certificate (CN = ``name``) and add it to the group ``coordinators``:
        the only identities that may join ``$share/coordinators/fl/v1/+/+/up/#``. Every coordinator gets
        a name of its own: with one shared certificate they would take over each other's session."""
        self._register(coordinator_commands(name))
        return self.ca.client(name)

    def _register(self, commands: list[Command]) -> None:
        with self._policy_lock:
            policy = copy.deepcopy(self.policy)
            changed = apply(policy, commands)  # refuses conflicts before anything reaches the broker
            if changed and self.running:
                self._control(changed)
            self.policy = policy

    def _control(self, commands: Sequence[Command]) -> None:
        """Send ``commands`` to the running broker's dynamic-security plugin and wait for its answers."""
        cert, key = self.ca.client(ADMIN)
        answers: queue.Queue[bytes] = queue.Queue()
        subscribed: queue.Queue[str] = queue.Queue()
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(self.ca.ca_path), certfile=str(cert), keyfile=str(key))
        client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(
            str(codes[0]) if codes[0].is_failure else ""
        )
        client.on_message = lambda c, u, message: answers.put(bytes(message.payload))
        try:
            client.connect(self.host, self.port)
        except OSError as exc:
            raise UnavailableError(f"broker at {self.host}:{self.port}: {exc}") from None
        client.loop_start()
        try:
            client.subscribe(f"{CONTROL_TOPIC}/response", qos=1)
            refused = _answer(subscribed, "the subscription to $CONTROL answers")
            if refused:
                raise ConfigError(f"the broker refused {ADMIN!r} its $CONTROL answers: {refused}")
            for first in range(0, len(commands), CONTROL_BATCH):
                batch = list(commands[first : first + CONTROL_BATCH])
                client.publish(CONTROL_TOPIC, json.dumps({"commands": batch}), qos=1)
                answer = json.loads(_answer(answers, f"{len(batch)} $CONTROL commands"))
                for sent, got in zip(batch, answer.get("responses", []), strict=False):
                    if got.get("error"):
                        raise ConfigError(f"the broker refused {sent['command']}: {got['error']}")
        finally:
            client.disconnect()
            client.loop_stop()

    def _config(self) -> Path:
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        with self._policy_lock:
            tmp = self.dynsec_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.policy, indent=1))
            os.replace(tmp, self.dynsec_path)
        conf = (PACKAGING / "mosquitto.conf").read_text()
        for placeholder, value in {
            "@PORT@": str(self.port),
            "@HOST@": self.host,
            "@CERT_DIR@": str(self.ca.dir),
            "@DYNSEC_PLUGIN@": self.plugin,
            "@DYNSEC_FILE@": str(self.dynsec_path),
            "@DATA_DIR@": str(data_dir),
            "@PERSISTENCE@": "true",
        }.items():
            conf = conf.replace(placeholder, value)
        # Started as root, mosquitto drops to user "mosquitto", which cannot read a private work
        # directory: stay whoever started it.
        conf += f"\nuser {pwd.getpwuid(os.getuid()).pw_name}\n"
        path = self.workdir / "mosquitto.conf"
        path.write_text(conf)
        return path

    def start(self, timeout_s: float = 15.0) -> None:
        conf = self._config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(conf), "-v"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._raise_open_files_limit()
        await_listening(
            self.proc, self.host, self.port, name="mosquitto", timeout_s=timeout_s, log_path=self.log_path
        )

    def _raise_open_files_limit(self) -> None:
        """Let the broker hold as many connections as the system allows: every device holds one, and the
        usual soft limit of 1,024 descriptors would refuse device 1,025 (set on the child alone)."""
        assert self.proc is not None
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(OSError, ValueError):
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (hard, hard))

    def stop(self) -> None:
        terminate(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=5)
