"""``fleetloop``: one command for integrators, fleet operators, release managers and data teams.

Exit codes scripts can rely on: 0 success, 1 internal error, 2 bad input (config, rule, SQL, arguments),
3 not found, 5 integrity failure, 6 cloud unreachable, 7 conflicting state, 130 interrupted; see
``fleetloop_shared.errors``. Every error is one line on stderr; no traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetloop_cli import (
    access_commands,
    catalog_commands,
    cloud_commands,
    fleet_commands,
    ota_commands,
    privacy_commands,
    release_commands,
    rollout_commands,
    rules_commands,
    store_commands,
)
from fleetloop_cli.client import CoordinatorClient, client_from_args, cloud_command, with_cloud
from fleetloop_cli.output import render_object, render_records, render_rows
from fleetloop_shared.errors import EXIT_INTERRUPTED, FleetloopError, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, like every other user error
        self.exit(2, f"error: {self.prog}: {message}\n")


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return client_from_args(args)


def _print(text: str) -> None:
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    sys.stdout.flush()


# -- cloud / agent / sim ---------------------------------------------------------------------------
def cmd_agent_run(args: argparse.Namespace) -> int:
    import signal

    from fleetloop_agent.config import load_agent_config
    from fleetloop_agent.runtime import AgentRuntime
    from fleetloop_shared import jsonlog

    config = load_agent_config(args.config)
    jsonlog.configure(f"agent:{config.device_id}", level=args.log_level)
    runtime = AgentRuntime(config)
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    signal.signal(signal.SIGINT, lambda *_: runtime.stop())
    return runtime.run()


def cmd_sim_device(args: argparse.Namespace) -> int:
    from fleetloop_fwsim.device import DeviceSupervisor

    argv = [sys.executable, "-m", "fleetloop_cli.main", "agent", "run", "--config", args.config]
    log_path = Path(args.log) if args.log else None
    return DeviceSupervisor(Path(args.dir), argv, log_path=log_path).run()


def cmd_sim_far_side(args: argparse.Namespace) -> int:
    from fleetloop_fwsim.far_side import serve
    from fleetloop_shared.datapaths import find_recordings

    recordings = find_recordings(args.data) if args.data else None
    socket = Path(args.socket) if args.socket else None
    return serve(
        args.kind,
        Path(args.dir),
        Path(args.ready_file),
        recordings=recordings,
        speed=args.speed,
        socket=socket,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    if args.scenario:
        from fleetloop_cli.demo_scenarios import run_scenario

        if args.inject or args.serve or args.transport != "grpc" or args.data or args.simulated:
            raise UserError("demo --scenario runs its own simulated cars over gRPC: it takes --json, "
                            "--workdir and --timeout only")  # fmt: skip
        args.timeout = 300.0 if args.timeout is None else args.timeout
        return run_scenario(args)
    args.timeout = 170.0 if args.timeout is None else args.timeout
    from fleetloop_cli.demo import run_demo

    return run_demo(args)


# -- data ------------------------------------------------------------------------------------------
def cmd_query(args: argparse.Namespace) -> int:
    body = {"sql": args.sql, "max_rows": args.max_rows}
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    result = _client(args).post_json("/v1/query", body)
    _print(render_rows(result["columns"], result["rows"], args.output))
    if result.get("truncated"):
        print(f"(truncated at {args.max_rows} rows)", file=sys.stderr)
    return 0


def cmd_devices_catalog(args: argparse.Namespace) -> int:
    catalog = _client(args).get(f"/v1/devices/{args.id}/catalog")
    if args.output in ("table", "csv"):
        _print(render_records(catalog["signals"], args.output, ["id", "path", "data_type", "unit", "class"]))
    else:
        _print(render_object(catalog, args.output))
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    devices = _client(args).get("/v1/devices")
    cols = ["device_id", "fleet", "online", "firmware_version", "hardware_id", "data_origin"]
    _print(render_records(devices, args.output, cols if args.output in ("table", "csv") else None))
    return 0


def cmd_captures_list(args: argparse.Namespace) -> int:
    caps = _client(args).get("/v1/captures")
    _print(render_records(caps, args.output))
    return 0


def cmd_captures_export(args: argparse.Namespace) -> int:
    """One capture as an MCAP, Parquet or CSV file, made by the coordinator (``-o -``: standard output)."""
    from urllib.parse import quote, urlencode

    query = {"format": args.format} | ({"device": args.device} if args.device else {})
    path = f"/v1/captures/{quote(args.id, safe='')}/export?{urlencode(query)}"
    data, filename = _client(args).download(path)
    if args.file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    suggested = filename if filename and not filename.startswith(".") else f"{args.id}.{args.format}"
    target = Path(args.file or Path(suggested).name)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    print(f"wrote {target} ({len(data)} bytes, {args.format})", file=sys.stderr)
    return 0


# -- artifacts and rollouts ------------------------------------------------------------------------
def cmd_artifacts_list(args: argparse.Namespace) -> int:
    rel = _client(args).get("/v1/releases")
    cols = ["name", "version", "hardware_id"]
    _print(render_records(rel, args.output, cols if args.output in ("table", "csv") else None))
    return 0


def build_parser(words: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the ``words`` it will parse, the coordinator's own options (its
    configuration table) only when they are a ``cloud`` command."""
    command = next((w for w in words if not w.startswith("-")), None) if words is not None else "cloud"
    p = _Parser(prog="fleetloop", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cloud = sub.add_parser("cloud", help="run the coordinator").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    agent = sub.add_parser("agent", help="run the device agent").add_subparsers(dest="sub", required=True)
    s = agent.add_parser("run", help="run the agent with one config file")
    s.add_argument("--config", required=True)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_agent_run)

    sim = sub.add_parser("sim", help="simulated devices").add_subparsers(dest="sub", required=True)
    s = sim.add_parser("device", help="run one simulated A/B device (bootloader + agent process)")
    s.add_argument("--dir", required=True, help="device directory (slots, boot env)")
    s.add_argument("--config", required=True, help="agent config file")
    s.add_argument("--log", help="append the agent's log here")
    s.set_defaults(func=cmd_sim_device)

    s = sim.add_parser("far-side", help="the simulated far side of a machine's bus (ECU, PLC, robot, hub)")
    s.add_argument("--kind", required=True, choices=["car", "robot", "plc", "hub"])
    s.add_argument("--dir", required=True, help="its working directory (generated stand-ins, logs)")
    s.add_argument("--ready-file", required=True, help="written (JSON: the agent's sources) once it runs")
    s.add_argument("--data", help="recordings to play (default: generated stand-ins)")
    s.add_argument("--speed", type=float, default=1.0, help="play the data this many times as fast")
    s.add_argument("--socket", help="robot: the agent's push-API socket (default DIR/push.sock)")
    s.set_defaults(func=cmd_sim_far_side)

    s = sub.add_parser("demo", help="run the whole loop on this machine and print a summary")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--data", help="recordings directory (default: $FLEETLOOP_DATA or ../shared/data/real)")
    s.add_argument("--simulated", action="store_true", help="use firmware-sim's generated signals")
    s.add_argument("--workdir", help="keep the demo's files here (default: a temporary directory)")
    s.add_argument("--serve", action="store_true",
                   help="after the summary, keep the coordinator and devices running and print the "
                        "console's URL and a viewer token; Ctrl-C stops them")  # fmt: skip
    s.add_argument(
        "--inject",
        choices=["bad-health", "corrupt-artifact"],
        action="append",
        default=[],
        help="fault to inject: a device whose v2 fails its health check, or a corrupted delta",
    )
    s.add_argument("--timeout", type=float, default=None,
                   help="give up after this many seconds (default 170; with --scenario 300)")  # fmt: skip
    s.add_argument(
        "--scenario",
        choices=["bad-release", "good-release"],
        help="instead: a fleet of simulated cars and a rollout its signal gate decides (bad-release: "
        "v2 brakes harshly 4x as often, is stopped and rolled back; good-release: goes through)",
    )
    s.add_argument(
        "--transport", choices=["grpc", "mqtt"], default="grpc", help="device link (mqtt: private mosquitto)"
    )
    s.add_argument(
        "--fldelta1-devices", type=int, default=0, choices=range(5), metavar="{0..4}",
        help="how many devices run an agent that reads only FLDELTA1 deltas (a mixed fleet)",
    )  # fmt: skip
    s.set_defaults(func=cmd_demo)

    rules = sub.add_parser("rules", help="trigger rules (campaigns)").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    s = sub.add_parser("query", help="SQL over the fleet's data (tables: samples, captures)")
    s.add_argument("sql")
    s.add_argument("--max-rows", type=int, default=10000)
    s.add_argument("--timeout", type=float, default=None,
                   help="seconds the query may run (default and most: the coordinator's query.timeout_s)")
    with_cloud(s)
    s.set_defaults(func=cmd_query)

    devices = sub.add_parser("devices", help="the fleet").add_subparsers(dest="sub", required=True)
    cloud_command(devices, "list", cmd_devices_list)
    catalog_help = "a device's signal catalog (-o yaml|json: a file for rules validate --catalog)"
    s = cloud_command(devices, "catalog", cmd_devices_catalog, help=catalog_help)
    s.add_argument("id")

    captures = sub.add_parser("captures", help="ingested captures").add_subparsers(dest="sub", required=True)
    cloud_command(captures, "list", cmd_captures_list)
    s = captures.add_parser("export", help="a capture as MCAP (Foxglove), Parquet or CSV (PlotJuggler)")
    s.add_argument("id", help="capture id (fleetloop captures list)")
    s.add_argument("--format", choices=("mcap", "parquet", "csv"), default="mcap")
    s.add_argument("--device", help="the device, when captures of two devices share the id")
    s.add_argument("-o", "--file", dest="file",
                   help="output file (default: the name the coordinator gives; - for stdout)")  # fmt: skip
    s.add_argument("--cloud", default=None, help="coordinator URL ($FLEETLOOP_CLOUD)")
    s.add_argument("--context", default=None, help="config context to use ($FLEETLOOP_CONTEXT)")
    s.set_defaults(func=cmd_captures_export)

    arts = sub.add_parser("artifacts", help="release artifacts").add_subparsers(dest="sub", required=True)
    cloud_command(arts, "list", cmd_artifacts_list)

    groups = {"top": sub, "rules": rules, "sim": sim, "artifacts": arts, "cloud": cloud, "devices": devices}
    cloud_commands.register(groups, with_cloud, serve_options=command == "cloud")
    for register in (
        access_commands.register,
        catalog_commands.register,
        rules_commands.register,
        store_commands.register,
        ota_commands.register,
        release_commands.register,
        fleet_commands.register,
        rollout_commands.register,
        privacy_commands.register,
    ):
        register(groups, with_cloud)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(words).parse_args(words)
    try:
        code = int(args.func(args))
    except FleetloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
