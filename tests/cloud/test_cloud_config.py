"""``cloud serve --config cloud.yaml``: every key is read and reaches the part it configures, unknown
keys and bad values are refused with FILE:LINE:COL, a flag overrides the file, every flag is a key, the
packaged default file holds every key at its default, and the packaged systemd unit's command line
parses (run with ``--check``)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetloop_cli import cloud_commands
from fleetloop_cli.main import build_parser, main
from fleetloop_cloud.config import KEYS, load_cloud_config
from fleetloop_cloud.server import Coordinator, served_url
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.broker import CertificateAuthority
from fleetloop_shared.errors import ConfigError, MalformedMessageError
from fleetloop_shared.wire import device_pb2, ingest_pb2

REPO = Path(__file__).resolve().parents[2]
PACKAGED = REPO / "packaging" / "config" / "cloud.yaml"
UNIT = REPO / "packaging" / "systemd" / "fleetloop-coordinator.service"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)  # fmt: skip


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *sections, leaf = path.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return out


def every_key(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every key set to something other than its default: (as written, as read)."""
    ca = CertificateAuthority(tmp / "pki")
    cert, key = ca.issue("coordinator", server=True)
    mcert, mkey = ca.client("coordinator-mqtt")
    table: dict[str, tuple[Any, Any]] = {
        "data_dir": ("data", tmp / "data"),
        "database": ("postgresql://fleet@db.internal/fleet", "postgresql://fleet@db.internal/fleet"),
        "log_level": ("DEBUG", "debug"),
        "ready_file": ("run/ready.json", tmp / "run" / "ready.json"),
        "listen.host": ("0.0.0.0", "0.0.0.0"),
        "listen.grpc_port": (50443, 50443),
        "listen.http_port": (8443, 8443),
        "public_url": ("https://fleet.example.com:8443/", "https://fleet.example.com:8443"),
        "insecure": (True, True),
        "tls.http.cert": ("pki/coordinator.pem", cert),
        "tls.http.key": (str(key), key),
        "tls.grpc.cert": (str(cert), cert),
        "tls.grpc.key": (str(key), key),
        "tls.grpc.ca": (str(ca.ca_path), ca.ca_path),
        "mqtt.broker": ("broker.internal:8883", "broker.internal:8883"),
        "mqtt.ca": (str(ca.ca_path), ca.ca_path),
        "mqtt.cert": (str(mcert), mcert),
        "mqtt.key": (str(mkey), mkey),
        "http.workers": (3, 3),
        "http.max_inflight": (7, 7),
        "http.body_limits": ({"uploadRelease": "2GiB", "query": "16KiB"}, {"uploadRelease": 2 << 30,
                                                                         "query": 16 << 10}),
        "uploads.budget.global_bytes_per_s": ("10MiB", 10 << 20),
        "uploads.budget.per_network_bytes_per_s": ({"cellular": "1MB", "wifi": 0},
                                                   {"cellular": 10**6, "wifi": 0}),
        "uploads.budget.quantum_bytes": (65536, 65536),
        "uploads.budget.aging_s": ("1m", 60.0),
        "uploads.budget.forget_after_s": (600, 600.0),
        "uploads.budget.max_devices": (500, 500),
        "uploads.staging.max_upload_bytes": ("1KiB", 1024),
        "uploads.staging.max_total_bytes": ("512MiB", 512 << 20),
        "uploads.staging.max_per_device": (2, 2),
        "uploads.staging.ttl_s": ("2h", 7200.0),
        "query.timeout_s": (30, 30.0),
        "query.memory_limit": ("512MiB", "512MiB"),
        "query.threads": (1, 1),
        "query.max_rows": (5, 5),
        "storage.bucket": ("fleet-data", "fleet-data"),
        "storage.prefix": ("/prod/eu/", "prod/eu"),
        "storage.endpoint": ("http://minio.internal:9000/", "http://minio.internal:9000"),
        "storage.region": ("eu-central-1", "eu-central-1"),
        "storage.credentials_file": ("pki/coordinator.pem", cert),
        "storage.profile": ("fleet", "fleet"),
        "storage.request_timeout_s": ("3s", 3.0),
        "storage.connect_timeout_s": (2, 2.0),
        "storage.max_attempts": (4, 4),
        "keys.dir": ("secrets/fleetloop", tmp / "secrets" / "fleetloop"),
        "classification.file": ("pki/coordinator.pem", cert),
        "fleet_store.format": ("iceberg", "iceberg"),
        "fleet_store.batch_wait_s": ("20ms", 0.02),
        "fleet_store.batch_max_segments": (64, 64),
        "fleet_store.snapshot_retention_s": ("1h", 3600.0),
        "fleet_store.compact_min_files": (8, 8),
    }  # fmt: skip
    assert set(table) == {k.path for k in KEYS}, "a key without a case here"
    return {k: w for k, (w, _) in table.items()}, {k: r for k, (_, r) in table.items()}


def test_every_key_is_read_and_reaches_its_part(tmp_path: Path) -> None:
    written, expected = every_key(tmp_path)
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump(nested(written)))
    config = load_cloud_config(path)
    for key, want in expected.items():
        assert config[key] == want, key
        assert config.origins[key].startswith(f"{path}:"), key
    assert config.http.workers == 3 and config.http.max_inflight == 7 and config.http.insecure
    assert config.http.body_limits == {"uploadRelease": 2 << 30, "query": 16 << 10}
    assert config.http.tls is not None and config.http.tls.cert == expected["tls.http.cert"]
    assert config.grpc_tls is not None and config.grpc_tls.ca == expected["tls.grpc.ca"]
    assert config.mqtt is not None and (config.mqtt.host, config.mqtt.port) == ("broker.internal", 8883)
    assert config.storage is not None and config.storage.location == "s3://fleet-data/prod/eu"
    assert (config.storage.endpoint, config.storage.max_attempts) == ("http://minio.internal:9000", 4)
    assert (config.tables.format, config.tables.batch_max_segments) == ("iceberg", 64)
    budget = config.limits.upload_budget
    assert (budget.global_bytes_per_s, budget.quantum_bytes, budget.aging_s, budget.max_devices) == (
        10 << 20, 65536, 60.0, 500)  # fmt: skip
    assert config.limits.staging.ttl_s == 7200.0 and config.limits.query.max_rows == 5

    # the limits reach the coordinator's parts and hold there
    c = Coordinator(tmp_path / "cloud", limits=config.limits)
    try:
        assert c.grants.scheduler.budget == budget
        assert c.query_engine.limits == config.limits.query and c.compactor.policy.grace_s >= 90
        result = c.queries.sql(Caller.local(), "SELECT * FROM range(50)", max_rows=1000)
        assert len(result.rows) == 5 and result.truncated
        device = Caller.device("car-1", transport="grpc", proven=True)
        piece = ingest_pb2.UploadChunkRequest(
            device_id="car-1",
            segment_id=b"\x01" * 16,
            offset=0,
            total_bytes=2048,
            total_sha256=b"\x00" * 32,
            data=b"x",
        )
        c.devices.connect(device, device_pb2.Hello(device_id="car-1", fleet="f"), c.clock())
        with pytest.raises(MalformedMessageError, match=r"outside 1\.\.1024"):
            c.ingest.chunk(device, piece, c.clock())
    finally:
        c.stop()
        c.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metrics_port: 9\n", "1:1: unknown key 'metrics_port' (known here: "),
        ("listen:\n  hots: 0.0.0.0\n", "2:3: unknown key 'hots' in listen (did you mean 'host'?)"),
        ("uploads:\n  staging:\n    max_total: 1GiB\n",
         "3:5: unknown key 'max_total' in uploads.staging (did you mean 'max_total_bytes'?)"),
        ("uploads:\n  budget:\n    per_network_bytes_per_s:\n      wifi: 1MiB\n      satellite: 1MiB\n",
         "5:7: uploads.budget.per_network_bytes_per_s: unknown network 'satellite'; known: wifi, "),
        ("http:\n  body_limits: {uploadRelaese: 2GiB}\n",
         "2:17: http.body_limits: unknown route 'uploadRelaese' (did you mean 'uploadRelease'?)"),
        ("listen:\n  http_port: 70000\n",
         "2:3: listen.http_port: must be an integer from 0 to 65535, got 70000"),
        ("listen:\n  grpc_port: '50051'\n", "2:3: listen.grpc_port: must be an integer from 0 to 65535"),
        ("insecure: yes please\n", "1:1: insecure: must be true or false, got 'yes please'"),
        ("log_level: loud\n",
         "1:1: log_level: must be one of debug, info, warning, error, critical, got 'loud'"),
        ("query:\n  timeout_s: soon\n", "2:3: query.timeout_s: 'soon' is not a duration"),
        ("query:\n  timeout_s: -1\n", "2:3: query.timeout_s: must be above 0 seconds, got -1"),
        ("query:\n  memory_limit: plenty\n", "2:3: query.memory_limit: query memory limit must look like"),
        ("query: [1]\n", "1:1: query: must be a mapping of settings, got [1]"),
        ("uploads:\n  staging:\n    max_total_bytes: 1 lots\n",
         "3:5: uploads.staging.max_total_bytes: must be a size in bytes like 1048576, 64MiB or 1GB"),
        ("uploads:\n  budget:\n    quantum_bytes: 0\n", "3:5: uploads.budget.quantum_bytes: must be above 0"),
        ("public_url: ftp://fleet.example.com\n", "1:1: public_url: must be an http(s) URL"),
        ("mqtt:\n  broker: broker.internal\n", "2:3: mqtt.broker: must be HOST:PORT"),
        ("tls:\n  http:\n    cert: nowhere.pem\n", "3:5: tls.http.cert: no such file: "),
        ("tls:\n  grpc:\n    cert: cloud.yaml\n",
         "3:5: tls.grpc.cert (--grpc-cert) needs tls.grpc.key (--grpc-key) and tls.grpc.ca (--grpc-ca)"),
        ("listen: {host: [\n", "2:1: invalid YAML"),
        ("- listen\n", "expected a mapping at the top level"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_with_their_place(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_cloud_config(path)
    assert str(refused.value).startswith(str(path)), refused.value
    assert message in str(refused.value), refused.value
    # and the same one line from the command (its entry point, in this process), exit code 2, nothing
    # started; test_a_mistake_leaves_the_real_process_with_one_line_and_exit_code_2 runs the program
    capsys.readouterr()
    assert main(["cloud", "serve", "--config", str(path), "--check"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip().splitlines() == [f"error: {refused.value}"]


def test_a_mistake_leaves_the_real_process_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("listen:\n  http_port: 70000\n")
    checked = cli("cloud", "serve", "--config", str(path), "--check")
    assert checked.returncode == 2 and checked.stdout == ""
    assert checked.stderr.strip().splitlines() == [
        f"error: {path}:2:3: listen.http_port: must be an integer from 0 to 65535, got 70000"
    ]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("listen:\n  http_port: 8081\n  grpc_port: 50052\nquery:\n  max_rows: 7\n")
    config = load_cloud_config(path, {"listen.http_port": 9090})
    assert (config["listen.http_port"], config["listen.grpc_port"]) == (9090, 50052)
    assert config.origins["listen.http_port"] == "--http-port"
    assert config.origins["listen.grpc_port"] == f"{path}:3:3"
    checked = cli("cloud", "serve", "--config", str(path), "--http-port", "9091", "--dir", "d", "--check",
                  cwd=tmp_path)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    shown = json.loads(checked.stdout)
    assert shown["settings"]["listen"] == {"host": "127.0.0.1", "http_port": 9091, "grpc_port": 50052}
    assert shown["settings"]["data_dir"] == str(tmp_path / "d")
    assert shown["settings"]["query"]["max_rows"] == 7
    assert shown["from"]["listen.http_port"] == "--http-port"
    bad = cli("cloud", "serve", "--config", str(path), "--public-url", "fleet.example.com", "--check")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --public-url: must be an http(s) URL"), bad.stderr
    assert cli("cloud", "serve", "--http-port", "eighty", "--check").returncode == 2
    # off loopback, the refusal comes before anything starts, from the file as from the flags
    path.write_text("listen:\n  host: 0.0.0.0\n")
    exposed = cli("cloud", "serve", "--config", str(path), "--check")
    assert exposed.returncode == 2 and "refusing to serve HTTP on 0.0.0.0 without TLS" in exposed.stderr


def test_every_serve_flag_is_a_key() -> None:
    assert build_parser().parse_args(["cloud", "serve"]).func is cloud_commands.cmd_cloud_serve
    cloud = argparse.ArgumentParser().add_subparsers()
    cloud_commands.register({"cloud": cloud}, lambda sp: None)
    options = [a for a in cloud.choices["serve"]._actions if a.option_strings]
    by_path = {k.path: k for k in KEYS}
    flags = set()
    for action in options:
        if action.dest in ("help", "config", "check"):
            continue
        assert action.dest in by_path, action.option_strings
        assert by_path[action.dest].flag in action.option_strings
        flags.add(by_path[action.dest].flag)
    assert flags == {k.flag for k in KEYS if k.flag}
    # the flags the coordinator took before the file existed are all still there
    assert flags >= {"--dir", "--host", "--grpc-port", "--http-port", "--ready-file", "--log-level", "--mqtt",
                     "--mqtt-ca", "--mqtt-cert", "--mqtt-key", "--db", "--grpc-cert", "--grpc-key",
                     "--grpc-ca", "--http-cert", "--http-key", "--insecure"}  # fmt: skip


def test_the_packaged_file_holds_every_key_at_its_default() -> None:
    config = load_cloud_config(PACKAGED)
    defaults = load_cloud_config(None)
    for key in KEYS:
        assert config.origins[key.path].startswith(f"{PACKAGED}:"), f"{key.path} is not in {PACKAGED}"
        if key.path != "data_dir":
            assert config[key.path] == defaults[key.path], key.path
    assert config["data_dir"] == Path("/var/lib/fleetloop-cloud")


def test_the_systemd_unit_runs_the_packaged_file(tmp_path: Path) -> None:
    lines = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1
    argv = shlex.split(lines[0].removeprefix("ExecStart="))
    assert argv[0].endswith("/fleetloop") and argv[1:3] == ["cloud", "serve"]
    assert "--config" in argv
    at = argv.index("--config") + 1
    assert argv[at] == "/etc/fleetloop/cloud.yaml"  # where the README says to install packaging's file
    argv[at] = str(PACKAGED)
    checked = cli(*argv[1:], "--check")
    assert checked.returncode == 0, checked.stderr
    shown = json.loads(checked.stdout)
    assert shown["settings"]["data_dir"] == "/var/lib/fleetloop-cloud"
    assert shown["settings"]["listen"]["host"] == "127.0.0.1"
    state = next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("StateDirectory="))
    assert shown["settings"]["data_dir"] == "/var/lib/" + state.split("=", 1)[1]


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("# nothing set yet\n")
    assert load_cloud_config(path).values == load_cloud_config(None).values


def test_the_artifact_url_without_public_url() -> None:
    assert served_url("https", "fleet.internal", 8443) == "https://fleet.internal:8443"
    assert served_url("http", "::1", 8080) == "http://[::1]:8080"
    wildcard = served_url("https", "0.0.0.0", 8443)
    assert "0.0.0.0" not in wildcard and wildcard.startswith("https://") and wildcard.endswith(":8443")


def test_check_does_not_print_the_database_password(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("database: postgresql://fleet:s3cret-pw@db.internal/fleet\n")
    assert load_cloud_config(path)["database"] == "postgresql://fleet:s3cret-pw@db.internal/fleet"
    checked = cli("cloud", "serve", "--config", str(path), "--check")
    assert checked.returncode == 0, checked.stderr
    assert "s3cret-pw" not in checked.stdout
    assert json.loads(checked.stdout)["settings"]["database"] == "postgresql://fleet:***@db.internal/fleet"
