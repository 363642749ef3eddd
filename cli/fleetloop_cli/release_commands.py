"""A release manager's commands: ``fleetloop keys generate``, ``fleetloop artifacts upload`` (signed
here, with the release manager's keys) and ``fleetloop keys export-offline`` (a lab's coordinator
handing its image repository keys to the release managers; its TUF metadata in its data directory or, with
``--config`` naming ``storage.*``, in the bucket).

``artifacts upload FILE --key KEY.pem`` sends the image, receives the targets metadata the coordinator
proposes for it, checks that the proposal adds exactly this release (the hash and length of the local
file, at its standard target path, plus deltas building it) and signs it on this machine; the
coordinator verifies the signatures against the image repository's root before it publishes. Without
``--key`` the upload asks the coordinator to sign, which only a lab's coordinator (one holding the targets
key) does.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fleetloop_cli.client import CoordinatorClient, client_from_args
from fleetloop_cli.output import render_object
from fleetloop_shared.errors import NotFoundError, UserError
from fleetloop_shared.update.passphrases import PASSPHRASE_ENV, passphrase_from_env, read_passphrase_file

if TYPE_CHECKING:
    from fleetloop_shared.update.release_keys import ReleaseKey


def _passphrase(args: argparse.Namespace, what: str, *, confirm: bool) -> bytes:
    """From ``--passphrase-file``, ``$FLEETLOOP_KEY_PASSPHRASE`` or a prompt (never a flag's value:
    it would show in the process list and the shell's history)."""
    if getattr(args, "passphrase_file", None):
        return read_passphrase_file(Path(args.passphrase_file))
    env = passphrase_from_env()
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UserError(
            f"{what}: no passphrase; set ${PASSPHRASE_ENV}, use --passphrase-file, or run in a terminal"
        )
    first = getpass.getpass(f"passphrase for {what}: ").encode()
    if confirm and getpass.getpass("again: ").encode() != first:
        raise UserError("the passphrases differ")
    return first


def load_keys(args: argparse.Namespace, paths: Sequence[str]) -> list[ReleaseKey]:
    """The release keys named by ``--key``, each decrypted with its passphrase."""
    # TUF and its signers are imported by the commands that sign, not by every command line
    from fleetloop_shared.update.release_keys import is_encrypted, load_key_file

    keys: list[ReleaseKey] = []
    for raw in paths:
        path = Path(raw)
        secret = _passphrase(args, str(path), confirm=False) if is_encrypted(path) else None
        key = load_key_file(path, secret)
        if any(k.keyid == key.keyid for k in keys):
            raise UserError(f"{path} is the same key as an earlier --key; a threshold needs distinct keys")
        keys.append(key)
    return keys


def upload_release(
    client: CoordinatorClient,
    data: bytes,
    *,
    name: str,
    version: str,
    hardware: str,
    keys: Sequence[ReleaseKey],
) -> Any:
    """Upload one release; with ``keys``, sign its targets metadata here. Returns the release as the
    coordinator published it."""
    from fleetloop_shared.update.release_keys import publish_release

    if not keys:
        q = urlencode({"name": name, "version": version, "hardware": hardware})
        return client.request("POST", f"/v1/releases?{q}", body=data, content_type="application/octet-stream")

    def request(method: str, path: str, body: bytes | None, content_type: str) -> Any:
        return client.request(method, path, body=body, content_type=content_type)

    return publish_release(request, data, name=name, version=version, hardware=hardware, keys=keys)


def cmd_artifacts_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    keys = load_keys(args, args.key)
    result = upload_release(
        client_from_args(args), path.read_bytes(), name=args.name, version=args.version,
        hardware=args.hardware, keys=keys,
    )  # fmt: skip
    print(render_object(result, "yaml" if args.output == "yaml" else "json"), flush=True)
    return 0


def rotate_offline(args: argparse.Namespace) -> int:
    """``keys rotate --repository image --key R1.pem [--key R2.pem] ...``: the new image root is built
    from the current one (checked from ``--trusted-root`` or version 1) and signed here."""
    from fleetloop_shared.update.release_keys import public_key_file, rotate_image_root

    if args.repository != "image":
        raise UserError("--key signs an image root; the director's keys are online: rotate without --key")
    if args.online_keys:
        raise UserError("--online-keys with --key: the coordinator's online keys rotate without --key")
    client = client_from_args(args)

    def request(method: str, path: str, body: bytes | None, content_type: str) -> Any:
        return client.request(method, path, body=body, content_type=content_type)

    trusted = Path(args.trusted_root).read_bytes() if args.trusted_root else None
    result = rotate_image_root(
        request, load_keys(args, args.key), now=datetime.now(UTC), trusted=trusted,
        root_keys=[public_key_file(Path(p)) for p in args.new_root_key], root_threshold=args.threshold,
        targets_keys=[public_key_file(Path(p)) for p in args.targets_key],
        targets_threshold=args.targets_threshold,
    )  # fmt: skip
    print(render_object(result, "json" if args.output == "json" else "yaml"), flush=True)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from fleetloop_shared.update.release_keys import generate_key_file, public_pem_path

    out = Path(args.out)
    secret = None if args.no_passphrase else _passphrase(args, f"the new key {out}", confirm=True)
    keyid = generate_key_file(out, secret)
    report = {"keyid": keyid, "private": str(out), "public": str(public_pem_path(out)),
              "encrypted": secret is not None}  # fmt: skip
    if args.output == "json":
        print(json.dumps(report), flush=True)
    else:
        state = "encrypted" if secret is not None else "NOT encrypted"
        print(f"key {keyid}\n  private: {out} ({state}, mode 0600; keep it off the coordinator)\n"
              f"  public:  {report['public']} (for whoever sets up the image repository)",
              flush=True)  # fmt: skip
    return 0


def cmd_keys_export_offline(args: argparse.Namespace) -> int:
    """The keys the coordinator holds (its data directory's ``keys/``, or the secret ``keys.dir`` names)
    out to ``--out``; which keys, from the image root where the coordinator keeps its TUF repositories
    (the data directory's ``artifacts/``, or the bucket of ``storage.*``)."""
    from fleetloop_cloud.config import load_cloud_config
    from fleetloop_cloud.ota.tuf_repository import export_offline_keys
    from fleetloop_cloud.storage import open_object_store

    if not args.config and not args.dir:
        raise UserError("keys export-offline: give the coordinator's --config cloud.yaml or its --dir")
    flags = {"data_dir": args.dir} if args.dir else {}
    config = load_cloud_config(Path(args.config) if args.config else None, flags)
    data: Path = config["data_dir"]
    secret: Path | None = config["keys.dir"]
    store = open_object_store(config.storage, data / "artifacts", area="artifacts")
    key_root = (secret if secret is not None else data / "keys") / "tuf"
    done = export_offline_keys(store, key_root, Path(args.out), data_dir=data, read_only=secret is not None)
    out = {"moved": [str(p) for p in done.moved], "to": args.out, "from": str(key_root),
           "metadata": store.location, "left": [str(p) for p in done.left]}  # fmt: skip
    if args.output == "json":
        print(json.dumps(out), flush=True)
        return 0
    lines = [f"moved {len(done.moved)} key(s) to {args.out}; the coordinator no longer signs releases:",
             *(f"  {p}" for p in done.moved)]  # fmt: skip
    if done.left:
        lines = [f"copied {len(done.moved)} key(s) to {args.out}:", *(f"  {p}" for p in done.moved),
                 f"{secret} is a mounted secret: remove these from it (until then every coordinator "
                 "still signs releases):", *(f"  {p}" for p in done.left)]  # fmt: skip
    print("\n".join(lines), flush=True)
    return 0


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """``artifacts upload`` into ``groups["artifacts"]``, ``keys generate|export-offline`` into the
    ``keys`` group (made by the OTA commands)."""
    s = groups["artifacts"].add_parser(
        "upload", help="upload a release; with --key, sign its targets metadata here (release managers' keys)"
    )
    s.add_argument("file")
    s.add_argument("--name", default="firmware")
    s.add_argument("--version", required=True)
    s.add_argument("--hardware", required=True)
    s.add_argument("--key", action="append", default=[],
                   help="release manager's targets key (PEM); repeat for a threshold of several")  # fmt: skip
    s.add_argument(
        "--passphrase-file", help=f"file holding the keys' passphrase (else ${PASSPHRASE_ENV} or a prompt)"
    )
    with_cloud(s)
    s.set_defaults(func=cmd_artifacts_upload)

    keys = groups["keys"]
    s = keys.add_parser(
        "generate", help="a new release manager's key (Ed25519, encrypted PKCS#8) and its .pub.pem"
    )
    s.add_argument("--out", required=True, help="the private key file to write (never overwritten)")
    s.add_argument("--no-passphrase", action="store_true", help="leave the key unencrypted (labs, demos)")
    s.add_argument(
        "--passphrase-file", help=f"file holding the passphrase (else ${PASSPHRASE_ENV} or a prompt)"
    )
    s.add_argument("-o", "--output", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_keys_generate)
    s = keys.add_parser(
        "export-offline",
        help="move a lab data directory's image repository root and targets keys out, to release managers",
    )
    s.add_argument(
        "--config", help="the coordinator's cloud.yaml (data_dir, storage.* with the TUF metadata, keys.dir)"
    )
    s.add_argument("--dir", help="the coordinator's data directory (stopped); overrides the file's data_dir")
    s.add_argument("--out", required=True, help="where the keys go (not inside the data directory)")
    s.add_argument("-o", "--output", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_keys_export_offline)
