"""Where online keys load from: the data directory's keys/ (made on the first start), or a secret every
coordinator mounts — files read-only, ``FLEETLOOP_KEY_*`` variables winning over them — which a
coordinator never writes to."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from fleetloop_cloud.config import load_cloud_config
from fleetloop_cloud.ota.online_keys import (
    RELEASE_KEY,
    KeyFiles,
    MemoryKeys,
    SecretKeys,
    env_name,
    release_signer,
)
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_shared.errors import ConfigError, StateError
from fleetloop_shared.update.artifact import ReleaseSigner


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_key_files_make_the_release_key_once_owner_only(tmp_path: Path) -> None:
    keys = KeyFiles(tmp_path / "keys")
    first = release_signer(keys)
    pem = tmp_path / "keys" / RELEASE_KEY
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "release.pub.pem").read_bytes() == first.public_key_pem()
    assert release_signer(KeyFiles(tmp_path / "keys")).public_key_pem() == first.public_key_pem()


def test_a_secret_loads_from_its_files_and_its_environment_wins(tmp_path: Path) -> None:
    mounted = tmp_path / "secret"
    mounted.mkdir()
    in_file, in_env = ReleaseSigner.generate(), ReleaseSigner.generate()
    (mounted / RELEASE_KEY).write_bytes(in_file.pem())
    assert release_signer(SecretKeys(mounted, {})).public_key_pem() == in_file.public_key_pem()
    environ = {env_name(RELEASE_KEY): in_env.pem().decode()}
    assert env_name(RELEASE_KEY) == "FLEETLOOP_KEY_RELEASE_PEM"
    assert release_signer(SecretKeys(mounted, environ)).public_key_pem() == in_env.public_key_pem()
    assert listing(mounted) == {RELEASE_KEY: in_file.pem()}  # nothing written beside it


def test_a_secret_without_the_key_is_a_clear_error_and_no_key_is_made(tmp_path: Path) -> None:
    mounted = tmp_path / "secret"
    mounted.mkdir()
    with pytest.raises(ConfigError, match=r"FLEETLOOP_KEY_RELEASE_PEM.*fleetloop cloud init"):
        release_signer(SecretKeys(mounted, {}))
    assert listing(mounted) == {}
    with pytest.raises(ConfigError, match=r"FLEETLOOP_KEY_RELEASE_PEM.*not an unencrypted PEM"):
        release_signer(SecretKeys(mounted, {"FLEETLOOP_KEY_RELEASE_PEM": "hunter2"}))
    with pytest.raises(ConfigError, match="not a directory"):
        SecretKeys(tmp_path / "not-mounted", {})


@pytest.mark.parametrize("name", ["../release.pem", "/etc/shadow", "tuf/../../x.pem", "", "a b.pem"])
def test_key_names_stay_inside_their_source(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="key name"):
        KeyFiles(tmp_path).load(name)
    with pytest.raises(ConfigError, match="key name"):
        MemoryKeys(tmp_path).store(name, b"x")


def test_the_memory_fake_is_read_only_when_asked(tmp_path: Path) -> None:
    keys = MemoryKeys(tmp_path, writable=False)
    with pytest.raises(ConfigError, match="read-only"):
        release_signer(keys)
    keys = MemoryKeys(tmp_path)
    signer = release_signer(keys)
    assert keys.keys[RELEASE_KEY] == signer.pem()


def test_a_second_coordinator_signs_with_the_keys_of_the_secret_and_writes_none(tmp_path: Path) -> None:
    first = Coordinator(tmp_path / "a")
    try:
        release_key = first.signer.public_key_pem()
        director_root = first.tuf.director_authority.root_bytes()
    finally:
        first.close()
    secret = tmp_path / "secret"
    shutil.copytree(tmp_path / "a" / "keys", secret)  # what an operator puts into the secret store
    before = listing(secret)
    # a data directory without the TUF repositories those keys sign: refused, nothing made
    with pytest.raises(ConfigError, match="holds no TUF repositories"):
        Coordinator(tmp_path / "fresh", keys=SecretKeys(secret, {}))
    # with them, the keys come from the secret: the same release key, the same director root
    shutil.copytree(tmp_path / "a" / "artifacts" / "tuf", tmp_path / "b" / "artifacts" / "tuf")
    second = Coordinator(tmp_path / "b", keys=SecretKeys(secret, {}))
    try:
        assert second.signer.public_key_pem() == release_key
        assert second.tuf.director_authority.root_bytes() == director_root
        assert (tmp_path / "b" / "keys" / "director-root.json").read_bytes() == director_root
        # a rotation would make keys in the secret: refused with what to do, nothing written
        with pytest.raises(StateError, match="read-only secret"):
            second.releases.rotate_root(
                Caller.local(), "director", root_keys=None, threshold=None, online=True, now=0.0
            )
    finally:
        second.close()
    assert listing(secret) == before


def test_cloud_yaml_names_the_secret(tmp_path: Path) -> None:
    config = tmp_path / "cloud.yaml"
    config.write_text(f"keys:\n  dir: {tmp_path / 'secret'}\n")
    assert load_cloud_config(config)["keys.dir"] == tmp_path / "secret"
    assert load_cloud_config(None)["keys.dir"] is None
