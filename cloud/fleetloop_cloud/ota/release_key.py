"""The coordinator's release-manifest key: made on first start, loaded on every later one.

The Ed25519 manifest is the cloud's own record of a release (rollouts read it); devices trust the TUF
repositories instead. The public half is written beside it for whoever checks a manifest offline.
"""

from __future__ import annotations

from pathlib import Path

from fleetloop_shared.update.artifact import ReleaseSigner


def release_signer(keys_dir: Path) -> ReleaseSigner:
    """``keys_dir/release.pem`` (made if absent) and ``release.pub.pem`` beside it."""
    key_path = keys_dir / "release.pem"
    if key_path.is_file():
        signer = ReleaseSigner.load(key_path)
    else:
        keys_dir.mkdir(parents=True, exist_ok=True)
        signer = ReleaseSigner.generate()
        signer.save(key_path)
    (keys_dir / "release.pub.pem").write_bytes(signer.public_key_pem())
    return signer
