"""``fleetloop cloud serve``: the coordinator, from a configuration file and flags.

The options are built from the coordinator's key table (:data:`fleetloop_cloud.config.KEYS`), so each
flag is also a configuration key and a flag given overrides the file. ``--check`` reads and checks
everything ``serve`` would before it starts anything, prints the effective settings (with where each
came from) and exits: what the packaged systemd unit's command line is tested with.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetloop_shared.errors import ConfigError

#: Options of ``cloud serve`` that are not configuration keys.
OWN_OPTIONS = ("--config", "--check")


def _config_keys() -> tuple[Any, ...]:
    from fleetloop_cloud.config import KEYS

    return KEYS


def register(
    groups: dict[str, Any],
    with_cloud: Callable[[argparse.ArgumentParser], None],
    *,
    serve_options: bool = True,
) -> None:
    """``cloud serve`` and ``cloud migrate``; ``serve_options=False`` leaves out serve's options built from
    the configuration table, whose defaults import most of the coordinator (seconds of every other
    command's start: an agent, a far side, an operator's query)."""
    s = groups["cloud"].add_parser(
        "serve", help="serve gRPC + HTTP with embedded storage",
        description="Every option is also a key of the configuration file (--config); an option given "
        "overrides the file. packaging/config/cloud.yaml is the commented default.",
    )  # fmt: skip
    s.add_argument("--config", help="configuration file (YAML; keys as in packaging/config/cloud.yaml)")
    s.add_argument(
        "--check", action="store_true",
        help="check the configuration and print the effective settings; start nothing",
    )  # fmt: skip
    for key in _config_keys() if serve_options else ():
        if key.flag is None:
            continue
        text = f"{key.help} [{key.path}]"
        if key.flag_type is bool:
            s.add_argument(key.flag, dest=key.path, action="store_true", default=None, help=text)
        else:
            s.add_argument(key.flag, dest=key.path, type=key.flag_type, default=None, help=text,
                           metavar=key.path.rsplit(".", 1)[-1].upper())  # fmt: skip
    s.set_defaults(func=cmd_cloud_serve)

    m = groups["cloud"].add_parser(
        "migrate", help="copy a data directory's Parquet fleet store into Iceberg tables (and, with a "
        "bucket, its artifacts into the bucket)",
        description="Copies samples/fleet=*/date=* (compacted files included) and the captures into the "
        "Iceberg tables that serve --table-format iceberg uses, in the same database and storage, and with "
        "storage.bucket the artifacts (images, deltas, manifests, TUF metadata) into the bucket; safe to "
        "run again. Then serve with fleet_store.format: iceberg.",
    )  # fmt: skip
    m.add_argument("--config", help="the coordinator's configuration file (data_dir, database, storage)")
    m.add_argument("--dir", dest="data_dir", help="data directory [data_dir]")
    m.add_argument("--db", dest="database", help="postgresql://... metadata database [database]")
    m.set_defaults(func=cmd_cloud_migrate)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration keys the command line set (key path → value)."""
    from fleetloop_cloud.config import KEYS

    return {k.path: getattr(args, k.path) for k in KEYS if k.flag and getattr(args, k.path) is not None}


def cmd_cloud_migrate(args: argparse.Namespace) -> int:
    from fleetloop_cloud.config import load_cloud_config
    from fleetloop_cloud.server import migrate

    flags = {k: v for k, v in (("data_dir", args.data_dir), ("database", args.database)) if v is not None}
    config = load_cloud_config(Path(args.config) if args.config else None, flags)
    report = migrate(config["data_dir"], db=config["database"], storage=config.storage)
    print(json.dumps({"data_dir": str(config["data_dir"]), **report.__dict__}), flush=True)
    return 0


def cmd_cloud_serve(args: argparse.Namespace) -> int:
    from fleetloop_cloud.config import load_cloud_config
    from fleetloop_cloud.server import exposure_refusal, serve
    from fleetloop_shared import jsonlog

    config = load_cloud_config(Path(args.config) if args.config else None, given_flags(args))
    host = config["listen.host"]
    if args.check:
        refusal = exposure_refusal(host, http=config.http, grpc_tls=config.grpc_tls is not None)
        if refusal is not None:
            raise ConfigError(refusal)
        if config.http.tls is not None:
            config.http.tls.context()  # the certificate and key load together
        print(json.dumps({"config": str(config.source or ""), "settings": config.describe(),
                          "from": {k: v for k, v in config.origins.items() if v != "default"}},
                         indent=2, default=str))  # fmt: skip
        return 0
    jsonlog.configure("cloud", level=config["log_level"])
    ready = config["ready_file"]
    return serve(
        config["data_dir"],
        host=host,
        grpc_port=config["listen.grpc_port"],
        http_port=config["listen.http_port"],
        ready_file=Path(ready) if ready else None,
        mqtt=config.mqtt,
        db=config["database"],
        grpc_tls=config.grpc_tls,
        http=config.http,
        limits=config.limits,
        public_url=config["public_url"],
        storage=config.storage,
        tables=config.tables,
        keys_dir=config["keys.dir"],
        classification=config["classification.file"],
    )
