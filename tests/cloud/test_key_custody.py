"""Key custody (Uptane): the image repository's targets key lives with release managers, so an attacker
holding everything of the coordinator — its data directory, its database, an admin token, its online
keys and its code — still cannot make a device install an image no release manager signed.

Real coordinator (HTTP on loopback), real release-manager keys made by the CLI, the CLI as a subprocess,
and the device's own verification: the agent's TUF client (python-tuf's ngclient) over HTTP. The same
attack against a lab coordinator (one holding the targets key) succeeds, which shows the attack is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, Root, Targets

from fleetloop_agent.ota.download import HttpFetcher
from fleetloop_agent.ota.tuf_client import TufClient
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.ota.tuf_repository import ImageKeyCustody, KeyStore, RootAuthority, target_file
from fleetloop_cloud.ota.writers import MetadataFolder
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.storage.objects import MemoryObjectStore
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.errors import ArtifactVerificationError, ConfigError, UserError
from fleetloop_shared.update.artifact import ReleaseManifest, sha256_hex
from fleetloop_shared.update.release_keys import (
    check_proposal,
    generate_key_file,
    load_key_file,
    public_pem_path,
)
from fleetloop_shared.update.tuf_metadata import image_facts, image_target_path

HW = "gen1"
DEVICE = "car-1"
PASSPHRASE = "correct horse battery staple"


@dataclass
class Cloud:
    coordinator: Coordinator
    base: str
    admin: str
    release_manager: str
    data_dir: Path

    def call(self, method: str, path: str, body: bytes = b"", token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + path, data=body if method == "POST" else None, method=method,
                                     headers={"Authorization": f"Bearer {token or self.admin}"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def device(self, tmp: Path) -> TufClient:
        keys = self.data_dir / "keys"
        anchors = [(keys / "image-root.json").read_bytes(), (keys / "director-root.json").read_bytes()]
        return TufClient(tmp / "device-tuf", anchors, device_id=DEVICE, fetcher=HttpFetcher(),
                         max_target_bytes=1 << 24)  # fmt: skip

    def close(self) -> None:
        self.coordinator.close()


def start(tmp: Path, custody: ImageKeyCustody | None) -> tuple[Cloud, Any]:
    c = Coordinator(tmp / "cloud", custody=custody)
    now = time.time()
    again = c.tokens.exist()  # a data directory served a second time
    admin = c.tokens.bootstrap(now, recover=again).secret
    server, port = start_http_server(c, "127.0.0.1", 0)
    cloud = Cloud(c, f"http://127.0.0.1:{port}", admin, "", tmp / "cloud")
    status, made = cloud.call(
        "POST",
        "/v1/tokens",
        json.dumps({"name": "rm-2" if again else "rm", "role": "release-manager"}).encode(),
    )
    assert status == 201, made
    cloud.release_manager = made["token"]
    return cloud, server


@pytest.fixture
def rm_keys(tmp_path: Path) -> list[Path]:
    """Two release managers' keys, made on "their machines" (outside the coordinator's directory)."""
    keys = [tmp_path / "rm-1" / "rm.pem", tmp_path / "rm-2" / "rm.pem"]
    generate_key_file(keys[0], PASSPHRASE.encode())
    generate_key_file(keys[1], None)
    return keys


def serve(tmp: Path, custody: ImageKeyCustody | None) -> Iterator[Cloud]:
    cloud, server = start(tmp, custody)
    try:
        yield cloud
    finally:
        server.shutdown()
        cloud.close()


@pytest.fixture
def cloud(tmp_path: Path, rm_keys: list[Path]) -> Iterator[Cloud]:
    """A coordinator whose image repository's targets key is release manager 1's."""
    custody = ImageKeyCustody(
        release_keys=tmp_path / "root-keys", targets_key_files=(public_pem_path(rm_keys[0]),)
    )
    yield from serve(tmp_path, custody)


def cli(cloud: Cloud, *args: str, token: str | None = None, passphrase: str | None = PASSPHRASE
        ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "FLEETLOOP_TOKEN": token or cloud.release_manager, "FLEETLOOP_CLOUD": cloud.base}
    env.pop("FLEETLOOP_KEY_PASSPHRASE", None)
    if passphrase is not None:
        env["FLEETLOOP_KEY_PASSPHRASE"] = passphrase
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)  # fmt: skip


def upload_cli(cloud: Cloud, tmp: Path, version: str, *keys: Path, passphrase: str | None = PASSPHRASE
               ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    image = tmp / f"fw-{version}.img"
    image.write_bytes(build_image(version, HW, size_hint=4096))
    flags = [arg for k in keys for arg in ("--key", str(k))]
    return cli(cloud, "artifacts", "upload", str(image), "--name", "fw", "--version", version,
               "--hardware", HW, *flags, "-o", "json", passphrase=passphrase)  # fmt: skip


def direct(cloud: Cloud, version: str, job_id: str) -> None:
    """The director (online keys: the attacker has them) points the device at ``version``."""
    release = ReleaseManifest("fw", version, HW, "0" * 64, 0, (), 0, 0)
    cloud.coordinator.director.assign(
        DEVICE, job_id=job_id, rollout_id="r", release=release, installed_sha256=""
    )


# ---------------------------------------------------------------------------------------- the attacker
def keys_in(directory: Path) -> list[CryptoSigner]:
    """Every private key anywhere in ``directory`` (what an attacker with the data directory holds)."""
    signers = []
    for path in directory.rglob("*.pem"):
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            continue
        if isinstance(private, Ed25519PrivateKey):
            signers.append(CryptoSigner(private, SSlibKey.from_crypto(private.public_key())))
    return signers


def plant_evil_image(cloud: Cloud, version: str) -> None:
    """Everything an attacker can do with the coordinator's files and code: store an image, add it to the
    image repository's targets signed with every key found, publish it (snapshot and timestamp signed
    with the coordinator's online keys, as the coordinator would) and direct the device to it."""
    c = cloud.coordinator
    evil = build_image(version, HW, size_hint=4096)
    sha = c.artifacts.add_image(evil)
    path = image_target_path("fw", HW, version)
    proposal = c.tuf.image.propose(
        {path: target_file(path, sha, len(evil), image_facts("fw", version, HW, f"files/{sha}"))}
    )
    md = Metadata(Targets.from_dict(proposal))
    for signer in keys_in(cloud.data_dir):
        md.sign(signer, append=True)
    c.tuf.image._write(md)
    direct(cloud, version, "evil-job")


def test_with_the_whole_data_directory_an_attacker_cannot_make_a_device_install_an_unsigned_image(
    cloud: Cloud, rm_keys: list[Path], tmp_path: Path
) -> None:
    # a release manager releases 1.0.0 with their key, and the device accepts it
    done = upload_cli(cloud, tmp_path, "1.0.0", rm_keys[0])
    assert done.returncode == 0, done.stderr
    device = cloud.device(tmp_path)
    direct(cloud, "1.0.0", "job-1")
    assert device.decide(cloud.base, job_id="job-1", hardware_id=HW, installed_sha256="").version == "1.0.0"
    # nothing in the data directory is a root or targets key of the image repository
    roles = cloud.coordinator.tuf.image_authority.root.signed.roles
    offline = set(roles["root"].keyids) | set(roles["targets"].keyids)
    assert keys_in(cloud.data_dir) and not offline & {s.public_key.keyid for s in keys_in(cloud.data_dir)}

    # the admin token cannot make the coordinator sign, nor rotate the image root without the offline keys
    image = build_image("6.6.6", HW, size_hint=4096)
    status, body = cloud.call("POST", f"/v1/releases?name=fw&version=6.6.6&hardware={HW}", image)
    assert status == 409 and "--key" in body["error"], body
    root_before = cloud.coordinator.tuf.image_authority.root_bytes()
    status, body = cloud.call("POST", "/v1/tuf/image/rotate", b"{}")
    assert status == 409 and "root keys are offline" in body["error"], body
    assert cloud.coordinator.tuf.image_authority.root_bytes() == root_before

    # with the files: signed with every key in the data directory, published, directed ...
    plant_evil_image(cloud, "6.6.6")
    with pytest.raises(ArtifactVerificationError, match=r"image repository.*threshold"):
        device.decide(cloud.base, job_id="evil-job", hardware_id=HW, installed_sha256="")

    # ... or with a forged image root naming the attacker's own targets key: the device's root refuses it
    attacker = Ed25519PrivateKey.generate()
    signer = CryptoSigner(attacker, SSlibKey.from_crypto(attacker.public_key()))
    authority = cloud.coordinator.tuf.image_authority
    forged = Metadata[Root].from_bytes(authority.root_bytes())
    forged.signed.version += 1
    for keyid in list(forged.signed.roles["targets"].keyids):
        forged.signed.revoke_key(keyid, "targets")
    forged.signed.add_key(signer.public_key, "targets")
    forged.signatures.clear()
    for s in [*keys_in(cloud.data_dir), signer]:
        forged.sign(s, append=True)
    authority.folder.write(f"{forged.signed.version}.root.json", forged.to_bytes())
    with pytest.raises(ArtifactVerificationError, match="image repository"):
        device.decide(cloud.base, job_id="evil-job", hardware_id=HW, installed_sha256="")


def test_the_same_attack_succeeds_where_the_coordinator_holds_the_targets_key(tmp_path: Path) -> None:
    """The control: a lab coordinator signs with a key in its data directory, so the attack works."""
    for cloud in serve(tmp_path, None):
        assert cloud.coordinator.releases.coordinator_signs()
        plant_evil_image(cloud, "6.6.6")
        plan = cloud.device(tmp_path).decide(
            cloud.base, job_id="evil-job", hardware_id=HW, installed_sha256=""
        )
        assert plan.version == "6.6.6"


def test_a_release_manager_token_without_the_key_cannot_publish(cloud: Cloud, rm_keys: list[Path]) -> None:
    rm = cloud.release_manager
    image = build_image("1.0.0", HW, size_hint=4096)
    status, staged = cloud.call("POST", f"/v1/releases/staged?name=fw&version=1.0.0&hardware={HW}", image, rm)
    assert status == 201, staged
    sid = staged["staging_id"]
    unsigned = json.dumps({"signed": staged["targets"], "signatures": []}).encode()
    status, body = cloud.call("POST", f"/v1/releases/staged/{sid}", unsigned, rm)
    assert status == 403 and "needs 1 signature(s)" in body["error"], body
    # signed, but by a key that is not the image repository's targets key (here: rm-2's)
    md = Metadata(Targets.from_dict(dict(staged["targets"])))
    md.sign(load_key_file(rm_keys[1], None).signer)
    status, body = cloud.call("POST", f"/v1/releases/staged/{sid}", md.to_bytes(), rm)
    assert status == 403, body
    assert cloud.coordinator.tuf.image.version() == 0
    assert cloud.call("GET", "/v1/releases", token=rm)[1] == []
    refused = [
        e for e in cloud.call("GET", "/v1/audit?kind=releases")[1] if e["action"] == "releases.refused"
    ]
    assert len(refused) == 2 and refused[0]["actor"] == "rm", refused


def test_a_tampered_upload_is_refused(cloud: Cloud, rm_keys: list[Path]) -> None:
    rm = cloud.release_manager
    image = build_image("1.0.0", HW, size_hint=4096)
    status, staged = cloud.call("POST", f"/v1/releases/staged?name=fw&version=1.0.0&hardware={HW}", image, rm)
    assert status == 201
    key = load_key_file(rm_keys[0], PASSPHRASE.encode())
    path = image_target_path("fw", HW, "1.0.0")
    # the signed targets point the image at other bytes: no longer what was proposed
    md = Metadata(Targets.from_dict(json.loads(json.dumps(staged["targets"]))))
    md.signed.targets[path].hashes["sha256"] = "f" * 64
    md.sign(key.signer)
    status, body = cloud.call("POST", f"/v1/releases/staged/{staged['staging_id']}", md.to_bytes(), rm)
    assert status == 422 and "not what the coordinator proposed" in body["error"], body
    # the proposal as it was, with its signature's bytes flipped
    md = Metadata(Targets.from_dict(json.loads(json.dumps(staged["targets"]))))
    md.sign(key.signer)
    doc = json.loads(md.to_bytes())
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    status, body = cloud.call(
        "POST", f"/v1/releases/staged/{staged['staging_id']}", json.dumps(doc).encode(), rm
    )
    assert status == 403, body
    status, body = cloud.call("POST", f"/v1/releases/staged/{staged['staging_id']}", b"not json", rm)
    assert status == 422, body
    assert cloud.coordinator.tuf.image.version() == 0

    # and the release manager's CLI refuses to sign a proposal that is not the file it uploaded
    proposal = json.loads(json.dumps(staged["targets"]))
    proposal["targets"][path]["length"] += 1
    with pytest.raises(ArtifactVerificationError, match="not the file you uploaded"):
        check_proposal(proposal, None, image_path=path, sha256=sha256_hex(image), length=len(image),
                       hardware_id=HW, version="1.0.0")  # fmt: skip
    proposal = json.loads(json.dumps(staged["targets"]))
    proposal["targets"]["fw/gen1/9.9.9.img"] = proposal["targets"][path]
    with pytest.raises(ArtifactVerificationError, match="not a delta"):
        check_proposal(proposal, None, image_path=path, sha256=sha256_hex(image), length=len(image),
                       hardware_id=HW, version="1.0.0")  # fmt: skip


def test_a_threshold_of_two_keys_publishes_and_one_of_two_is_refused(
    tmp_path: Path, rm_keys: list[Path]
) -> None:
    custody = ImageKeyCustody(
        release_keys=tmp_path / "root-keys", targets_key_files=tuple(public_pem_path(k) for k in rm_keys),
        targets_threshold=2,
    )  # fmt: skip
    for cloud in serve(tmp_path, custody):
        one = upload_cli(cloud, tmp_path, "1.0.0", rm_keys[0])
        assert one.returncode != 0
        assert "needs 2 signature(s)" in one.stderr and "Traceback" not in one.stderr, one.stderr
        assert cloud.coordinator.tuf.image.version() == 0
        two = upload_cli(cloud, tmp_path, "1.0.1", rm_keys[0], rm_keys[1])
        assert two.returncode == 0, two.stderr
        assert json.loads(two.stdout)["version"] == "1.0.1"
        direct(cloud, "1.0.1", "job-2")
        plan = cloud.device(tmp_path).decide(cloud.base, job_id="job-2", hardware_id=HW, installed_sha256="")
        assert plan.version == "1.0.1"


def test_a_wrong_or_missing_passphrase_is_one_clear_line(
    cloud: Cloud, rm_keys: list[Path], tmp_path: Path
) -> None:
    wrong = upload_cli(cloud, tmp_path, "1.0.0", rm_keys[0], passphrase="not the passphrase")
    assert wrong.returncode != 0
    assert "wrong passphrase" in wrong.stderr and str(rm_keys[0]) in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and "not the passphrase" not in wrong.stderr
    missing = upload_cli(cloud, tmp_path, "1.0.0", rm_keys[0], passphrase=None)
    assert missing.returncode != 0 and "no passphrase" in missing.stderr and "Traceback" not in missing.stderr
    assert cloud.coordinator.tuf.image.version() == 0
    with pytest.raises(UserError, match="wrong passphrase"):
        load_key_file(rm_keys[0], b"nope-nope-nope")


def test_keys_generate_writes_an_encrypted_key_and_never_overwrites(cloud: Cloud, tmp_path: Path) -> None:
    out = tmp_path / "new" / "rm.pem"
    made = cli(cloud, "keys", "generate", "--out", str(out), "-o", "json")
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["encrypted"] and out.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert load_key_file(out, PASSPHRASE.encode()).keyid == report["keyid"]
    again = cli(cloud, "keys", "generate", "--out", str(out))
    assert again.returncode != 0 and "never overwritten" in again.stderr
    short = cli(cloud, "keys", "generate", "--out", str(tmp_path / "short.pem"), passphrase="short")
    assert short.returncode != 0 and "shorter than" in short.stderr and not (tmp_path / "short.pem").exists()


def test_a_lab_data_directory_hands_its_keys_to_release_managers(tmp_path: Path) -> None:
    """Migration: a data directory made when the coordinator held the targets key."""
    for cloud in serve(tmp_path, None):
        assert cloud.coordinator.releases.coordinator_signs()
    inside = cli_local("keys", "export-offline", "--dir", str(tmp_path / "cloud"), "--out",
                       str(tmp_path / "cloud" / "offline"))  # fmt: skip
    assert inside.returncode != 0 and "inside the data directory" in inside.stderr
    data_dir, rm_dir = str(tmp_path / "cloud"), str(tmp_path / "rm")
    done = cli_local("keys", "export-offline", "--dir", data_dir, "--out", rm_dir, "-o", "json")
    assert done.returncode == 0, done.stderr
    moved = [Path(p) for p in json.loads(done.stdout)["moved"]]
    assert len(moved) == 3  # two root keys and the targets key
    targets_key = next(p for p in moved if "-targets-" in p.name)
    for cloud in serve(tmp_path, None):
        assert not cloud.coordinator.releases.coordinator_signs()
        assert keys_in(cloud.data_dir) and not any(
            s.public_key.keyid in cloud.coordinator.tuf.image_authority.root.signed.roles["targets"].keyids
            for s in keys_in(cloud.data_dir)
        )
        done = upload_cli(cloud, tmp_path, "1.0.0", targets_key)
        assert done.returncode == 0, done.stderr


def cli_local(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetloop_cli.main", *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_a_vanilla_tuf_client_downloads_a_release_at_its_target_path(
    cloud: Cloud, rm_keys: list[Path], tmp_path: Path
) -> None:
    """Targets are served at their TUF target paths (and hash-prefixed), so python-tuf's own Updater —
    not the agent's — verifies and downloads a release a release manager signed."""
    from tuf.ngclient import Updater

    done = upload_cli(cloud, tmp_path, "1.0.0", rm_keys[0])
    assert done.returncode == 0, done.stderr
    image = (tmp_path / "fw-1.0.0.img").read_bytes()
    (tmp_path / "vanilla").mkdir()
    updater = Updater(
        str(tmp_path / "vanilla"), f"{cloud.base}/tuf/image/", str(tmp_path / "vanilla"),
        f"{cloud.base}/tuf/image/targets/",
        bootstrap=(cloud.data_dir / "keys" / "image-root.json").read_bytes(),
    )  # fmt: skip
    updater.refresh()
    info = updater.get_targetinfo(image_target_path("fw", HW, "1.0.0"))
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == image
    sha = sha256_hex(image)
    prefixed = f"{cloud.base}/tuf/image/targets/fw/{HW}/{sha}.1.0.0.img"
    with urllib.request.urlopen(prefixed, timeout=30) as resp:
        assert resp.read() == image
    wrong = f"{cloud.base}/tuf/image/targets/fw/{HW}/{'0' * 64}.1.0.0.img"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(wrong, timeout=30)
    assert err.value.code == 404


def test_at_most_sixteen_releases_wait_for_signatures_and_the_oldest_is_dropped(cloud: Cloud) -> None:
    from fleetloop_cloud.ota.artifact_store import MAX_STAGED
    from fleetloop_shared.errors import NotFoundError

    store = cloud.coordinator.artifacts
    ids = [
        store.stage_release(ReleaseInput(
            build_image(f"1.0.{i}", HW, size_hint=1024), name="fw", version=f"1.0.{i}",
                            hardware_id=HW, bases=[], now=time.time())).staging_id
        for i in range(MAX_STAGED + 1)
    ]  # fmt: skip
    with pytest.raises(NotFoundError):
        store.staged(ids[0])
    assert [store.staged(i).manifest.version for i in ids[1:]] == [
        f"1.0.{i}" for i in range(1, MAX_STAGED + 1)
    ]
    assert cloud.coordinator.tuf.image.version() == 0  # nothing published


def test_the_image_root_rotates_with_the_offline_root_keys_signed_on_the_release_managers_machine(
    cloud: Cloud, rm_keys: list[Path], tmp_path: Path
) -> None:
    root_keys = sorted((tmp_path / "root-keys").glob("image-root-*.pem"))
    assert len(root_keys) == 2
    anchor = cloud.data_dir / "keys" / "image-root.json"
    base = ["keys", "rotate", "--repository", "image", "--trusted-root", str(anchor), "-o", "json"]
    # one of the two root keys is not the threshold
    one = cli(cloud, *base, "--key", str(root_keys[0]), token=cloud.admin)
    assert one.returncode != 0 and "threshold" in one.stderr and "Traceback" not in one.stderr, one.stderr
    # both: a new root (renewed expiry) whose targets key is now release manager 2's
    device = cloud.device(tmp_path)
    both = cli(cloud, *base, "--key", str(root_keys[0]), "--key", str(root_keys[1]),
               "--targets-key", str(public_pem_path(rm_keys[1])), token=cloud.admin)  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["root_version"] == 2
    root = cloud.coordinator.tuf.image_authority.root.signed
    assert root.version == 2 and root.roles["targets"].keyids == [load_key_file(rm_keys[1], None).keyid]
    # the retired targets key can no longer release; the new one can, and the device (walking from
    # root 1) accepts it
    refused = upload_cli(cloud, tmp_path, "1.0.0", rm_keys[0])
    assert refused.returncode != 0 and "signature" in refused.stderr, refused.stderr
    done = upload_cli(cloud, tmp_path, "1.0.1", rm_keys[1])
    assert done.returncode == 0, done.stderr
    direct(cloud, "1.0.1", "job-3")
    assert device.decide(cloud.base, job_id="job-3", hardware_id=HW, installed_sha256="").version == "1.0.1"
    # a root not signed by the current root keys is refused by the coordinator too
    forged = Metadata[Root].from_bytes(cloud.coordinator.tuf.image_authority.root_bytes())
    forged.signed.version += 1
    forged.signatures.clear()
    for signer in keys_in(cloud.data_dir):
        forged.sign(signer, append=True)
    status, body = cloud.call("POST", "/v1/tuf/image/root", forged.to_bytes())
    assert status == 403 and "threshold of root keys" in body["error"], body


def test_a_root_for_an_unknown_repository_is_refused(tmp_path: Path) -> None:
    folder = MetadataFolder(MemoryObjectStore(), "tuf/other/roles")
    with pytest.raises(ConfigError, match=r"^TUF repository must be one of .*, got 'other'$"):
        RootAuthority(folder, KeyStore(tmp_path / "keys"), repository="other", clock=time.time)
