"""Who may do what: ``fleetloop cloud init`` (the first admin token), ``fleetloop tokens
create|list|revoke``, ``fleetloop config set-context|use-context|get-contexts|delete-context`` and
``fleetloop audit list|verify``.

A token's secret is printed once, when it is made, and never again: only its hash is stored. ``audit
verify`` walks the whole hash chain here, in the CLI, with the same code the coordinator uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetloop_cli import contexts
from fleetloop_cli.client import client_from_args, cloud_command
from fleetloop_cli.output import render_object, render_records
from fleetloop_shared.errors import ConfigError, IntegrityError, UserError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Entries fetched per request while verifying.
_PAGE = 10_000


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``30d``, ``2w`` in seconds; UserError for anything else."""
    m = _DURATION.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"duration {text!r}: expected a positive number with s, m, h, d or w (e.g. 30d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_since(text: str, now: float) -> float:
    """A point in time: a duration ago (``1h``), a Unix time, or an ISO 8601 date/time (UTC if no zone)."""
    try:
        return now - parse_duration(text)
    except UserError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--since {text!r}: expected a duration (1h), a Unix time or an ISO date") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- cloud init ------------------------------------------------------------------------------------
def cmd_cloud_init(args: argparse.Namespace) -> int:
    from fleetloop_cloud.ota.tuf_repository import ImageKeyCustody
    from fleetloop_cloud.server import initialise

    data_dir = Path(args.dir)
    offline = (
        Path(args.release_keys) if args.release_keys else data_dir.with_name(data_dir.name + "-release-keys")
    )
    fresh = not (data_dir / "artifacts" / "tuf" / "image" / "root").is_dir()
    custody = ImageKeyCustody(
        release_keys=offline, targets_key_files=tuple(Path(k) for k in args.targets_key),
        targets_threshold=args.targets_threshold,
    )  # fmt: skip
    issued = initialise(data_dir, db=args.db, recover=args.recover, custody=custody)
    if args.token_file:
        path = Path(args.token_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", opener=lambda p, flags: os.open(p, flags, 0o600)) as fh:
            fh.write(issued.secret + "\n")
    if args.output == "json":
        out = {"data_dir": str(data_dir), "name": issued.token.record.name, "role": issued.token.record.role}
        if not args.token_file:
            out["token"] = issued.secret
        print(json.dumps(out), flush=True)
        return 0
    metadata = "in PostgreSQL" if args.db else f"in {data_dir / 'metadata.sqlite'}"
    print(f"initialised {data_dir}: keys in {data_dir / 'keys'}, metadata {metadata}")
    if fresh:
        made = "\n".join(f"  {p}" for p in sorted(offline.glob("image-*.pem")))
        signer = "the --targets-key keys" if args.targets_key else "the image-targets key"
        print(f"image repository keys, for the release managers (move them off this machine; releases are "
              f"signed with {signer}, docs/decisions/0026):\n{made}")  # fmt: skip
    where = f"written to {args.token_file} (mode 0600)" if args.token_file else "shown once, store it now"
    print(f"admin token {issued.token.record.name!r} ({where}):")
    if not args.token_file:
        print(issued.secret)
    print("use it: export FLEETLOOP_TOKEN=<token>, or fleetloop config set-context NAME --cloud URL "
          "--token-stdin --use", flush=True)  # fmt: skip
    return 0


# -- tokens ----------------------------------------------------------------------------------------
def cmd_tokens_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "role": args.role}
    if args.expires:
        body["expires_in_s"] = parse_duration(args.expires)
    created = client_from_args(args).post_json("/v1/tokens", body)
    if args.output == "json":
        print(json.dumps(created), flush=True)
        return 0
    expiry = f", expires {_iso(created.get('expires_at'))}" if created.get("expires_at") else ""
    print(f"token {created['name']!r} ({created['role']}{expiry}); shown once, store it now:",
          file=sys.stderr)  # fmt: skip
    print(created["token"], flush=True)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    tokens = client_from_args(args).get("/v1/tokens")
    if args.output in ("table", "csv"):
        rows = [t | {k: _iso(t.get(k)) for k in ("created_at", "expires_at", "revoked_at", "last_used_at")}
                for t in tokens]  # fmt: skip
        cols = ["name", "role", "state", "created_by", "created_at", "expires_at", "last_used_at"]
        print(render_records(rows, args.output, cols), flush=True)
    else:
        print(render_object(tokens, args.output), flush=True)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    revoked = client_from_args(args).request("DELETE", f"/v1/tokens/{args.name}")
    print(f"token {revoked['name']!r} revoked", flush=True)
    return 0


# -- config contexts -------------------------------------------------------------------------------
def cmd_config_set_context(args: argparse.Namespace) -> int:
    doc = contexts.load()
    ctx = dict(doc["contexts"].get(args.name, {}))
    if args.cloud:
        ctx["cloud"] = args.cloud
    if args.token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            raise UserError("--token-stdin: no token on standard input")
        ctx["token"] = token
    if args.ca:
        if not Path(args.ca).is_file():
            raise ConfigError(f"--ca {args.ca}: no such file")
        ctx["ca"] = str(Path(args.ca).resolve())
    if "cloud" not in ctx:
        raise UserError(f"context {args.name!r} needs --cloud URL")
    doc["contexts"][args.name] = ctx
    if args.use or not doc.get("current-context"):
        doc["current-context"] = args.name
    path = contexts.save(doc)
    print(f"context {args.name!r} saved in {path}"
          + (" and in use" if doc["current-context"] == args.name else ""), flush=True)  # fmt: skip
    return 0


def cmd_config_use_context(args: argparse.Namespace) -> int:
    doc = contexts.load()
    if args.name not in doc["contexts"]:
        known = ", ".join(sorted(doc["contexts"])) or "none"
        raise ConfigError(f"no context {args.name!r} in {contexts.config_path()} (contexts: {known})")
    doc["current-context"] = args.name
    contexts.save(doc)
    print(f"using context {args.name!r}", flush=True)
    return 0


def cmd_config_get_contexts(args: argparse.Namespace) -> int:
    doc = contexts.load()
    current = doc.get("current-context")
    rows = [
        {"current": "*" if name == current else "", "name": name, "cloud": ctx.get("cloud", ""),
         "token": "set" if ctx.get("token") else "", "ca": ctx.get("ca", "")}
        for name, ctx in sorted(doc["contexts"].items())
    ]  # fmt: skip
    print(render_records(rows, "table", ["current", "name", "cloud", "token", "ca"]), flush=True)
    return 0


def cmd_config_delete_context(args: argparse.Namespace) -> int:
    doc = contexts.load()
    if doc["contexts"].pop(args.name, None) is None:
        raise ConfigError(f"no context {args.name!r} in {contexts.config_path()}")
    if doc.get("current-context") == args.name:
        doc.pop("current-context")
    contexts.save(doc)
    print(f"context {args.name!r} deleted", flush=True)
    return 0


# -- audit -----------------------------------------------------------------------------------------
def cmd_audit_list(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    q: dict[str, Any] = {"limit": args.limit}
    if args.since:
        q["since"] = parse_since(args.since, time.time())
    if args.actor:
        q["actor"] = args.actor
    if args.kind:
        q["kind"] = args.kind
    entries = client_from_args(args).get(f"/v1/audit?{urlencode(q)}")
    if args.output in ("table", "csv"):
        rows = [e | {"at": _iso(e["at"])} for e in entries]
        cols = ["seq", "at", "actor", "role", "action", "target", "before", "after", "address", "request_id"]
        print(render_records(rows, args.output, cols), flush=True)
    else:
        print(render_object(entries, args.output), flush=True)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fleetloop_cloud.identity.audit_chain import verify

    client = client_from_args(args)

    def walk() -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            page: list[dict[str, Any]] = client.get(f"/v1/audit?after={after}&limit={_PAGE}")
            yield from page
            if len(page) < _PAGE:
                return
            after = int(page[-1]["seq"])

    report = verify(walk())
    if args.output == "json":
        print(json.dumps(report.__dict__), flush=True)
    elif report.ok:
        print(f"audit log intact: {report.entries} entries; head #{report.head_seq} {report.head_hash}",
              flush=True)  # fmt: skip
    if not report.ok:
        raise IntegrityError(f"audit log broken at entry {report.broken_at}: {report.reason}")
    return 0


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """``cloud init`` into ``groups["cloud"]``; ``tokens``, ``config`` and ``audit`` at the top."""
    s = groups["cloud"].add_parser(
        "init", help="make the data directory, its keys and the first admin token (printed once)"
    )
    s.add_argument("--dir", default="fleetloop-cloud", help="data directory")
    s.add_argument("--db", help="metadata in PostgreSQL (postgresql://...) instead of SQLite in --dir")
    s.add_argument(
        "--recover",
        action="store_true",
        help="tokens exist but every admin token is lost: make another admin token",
    )
    s.add_argument("--token-file", help="write the token to this file (mode 0600) instead of printing it")
    s.add_argument(
        "--release-keys", help="where the image repository's offline root keys go (default: DIR-release-keys)"
    )
    s.add_argument(
        "--targets-key",
        action="append",
        default=[],
        help="a release manager's public key (fleetloop keys generate); repeat for several",
    )
    s.add_argument(
        "--targets-threshold",
        type=int,
        default=1,
        help="how many of the --targets-key keys must sign each release",
    )
    s.add_argument("-o", "--output", choices=["text", "json"], default="text")
    s.set_defaults(func=cmd_cloud_init)

    top = groups["top"]
    tokens = top.add_parser("tokens", help="API tokens (admin)").add_subparsers(dest="sub", required=True)
    s = cloud_command(tokens, "create", cmd_tokens_create, help="a new token; its secret is printed once")
    s.add_argument("name")
    s.add_argument("--role", required=True, choices=["viewer", "operator", "release-manager", "admin"])
    s.add_argument("--expires", help="lifetime, e.g. 12h, 30d (default: no expiry)")
    cloud_command(tokens, "list", cmd_tokens_list, help="every token (never their secrets)")
    s = cloud_command(tokens, "revoke", cmd_tokens_revoke, help="revoke a token at once")
    s.add_argument("name")

    config = top.add_parser("config", help="named contexts: coordinator URL, token, CA").add_subparsers(
        dest="sub", required=True
    )
    s = config.add_parser("set-context", help="add or change a context")
    s.add_argument("name")
    s.add_argument("--cloud", help="the coordinator's URL")
    s.add_argument("--token-stdin", action="store_true", help="read the API token from standard input")
    s.add_argument("--ca", help="CA certificate for an https coordinator")
    s.add_argument("--use", action="store_true", help="also make it the current context")
    s.set_defaults(func=cmd_config_set_context)
    s = config.add_parser("use-context", help="make a context the current one")
    s.add_argument("name")
    s.set_defaults(func=cmd_config_use_context)
    s = config.add_parser("get-contexts", help="list the contexts (tokens are not shown)")
    s.set_defaults(func=cmd_config_get_contexts)
    s = config.add_parser("delete-context", help="remove a context")
    s.add_argument("name")
    s.set_defaults(func=cmd_config_delete_context)

    audit = top.add_parser("audit", help="the audit log of every write").add_subparsers(
        dest="sub", required=True
    )
    s = cloud_command(audit, "list", cmd_audit_list, help="entries, oldest first")
    s.add_argument("--since", help="a duration ago (1h, 7d), a Unix time or an ISO date")
    s.add_argument("--actor", help="only this actor (a token name, rollout-controller, a device id)")
    s.add_argument("--kind", help="only this action or kind of action (rollouts, campaigns.apply)")
    s.add_argument("--limit", type=int, default=1000)
    cloud_command(
        audit, "verify", cmd_audit_verify, help="check the whole hash chain; exit 5 if it is broken"
    )
