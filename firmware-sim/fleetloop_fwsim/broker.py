"""A private MQTT 5 broker for the demo, the simulator and the tests: mosquitto with the shipped config.

The broker runs ``packaging/mosquitto/mosquitto.conf`` and ``packaging/mosquitto/acl`` as shipped (only
the ``@...@`` placeholders are filled in), so whatever runs here exercises the configuration operators
deploy: TLS with client certificates, identity = certificate CN = MQTT username, per-device ``%u`` ACLs.
:class:`CertificateAuthority` issues the throwaway certificates (a CA, the broker's, one per client).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import pwd
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetloop_shared.errors import ConfigError, UnavailableError

#: The shipped broker configuration (repository checkout; the systemd packaging installs the same files).
PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"
CERT_VALIDITY = dt.timedelta(days=30)


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class MosquittoProcess:
    """mosquitto on a free loopback port with the shipped config; restartable on the same port."""

    def __init__(self, workdir: Path, *, ca: CertificateAuthority | None = None, port: int = 0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = ca or CertificateAuthority(self.workdir / "certs")
        self.ca.issue("broker", server=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _config(self) -> Path:
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        conf = (PACKAGING / "mosquitto.conf").read_text()
        for placeholder, value in {
            "@PORT@": str(self.port),
            "@HOST@": self.host,
            "@CERT_DIR@": str(self.ca.dir),
            "@ACL_FILE@": str(PACKAGING / "acl"),
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
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-600:]
                raise UnavailableError(f"mosquitto exited with code {self.proc.returncode}: {tail}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise UnavailableError(f"mosquitto did not listen on port {self.port}") from None
                time.sleep(0.05)

    def _raise_open_files_limit(self) -> None:
        """Let the broker hold as many connections as the system allows: every device holds one, and the
        usual soft limit of 1,024 descriptors would refuse device 1,025 (set on the child alone)."""
        assert self.proc is not None
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(OSError, ValueError):
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (hard, hard))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        if down_s > 0:
            time.sleep(down_s)
        self.start()
        self.restarts += 1
