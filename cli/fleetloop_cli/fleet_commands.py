"""``fleetloop sim fleet`` and ``fleetloop sim chaos``: many simulated agents in one process.

``sim fleet`` measures what a fleet pushes through a coordinator; ``sim chaos`` does the same while
killing and restarting the coordinator and cutting, stalling and delaying the link through a TCP proxy,
then checks that what devices were told is acknowledged is exactly what the fleet store holds.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetloop_cli.output import render_object
from fleetloop_shared.errors import UserError


def _recordings(args: argparse.Namespace) -> Path | None:
    from fleetloop_shared.datapaths import find_recordings

    return find_recordings(args.data) if not args.simulated else None


def _workdir(args: argparse.Namespace) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    if args.workdir:
        path = Path(args.workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path, None
    tmp = tempfile.TemporaryDirectory(prefix="fleetloop-sim-")
    return Path(tmp.name), tmp


def _emit(result: dict[str, Any], output: str) -> None:
    print(render_object(result, "json" if output == "json" else "yaml"), flush=True)


def _check(args: argparse.Namespace) -> None:
    # Hundreds of simulated uplinks retrying through injected faults would drown the report: the
    # counters in the result say what happened; only errors are logged.
    logging.getLogger("fleetloop.agent").setLevel(logging.ERROR)
    if args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    if args.duration <= 0:
        raise UserError(f"--duration must be positive, got {args.duration}")


def _simulate(args: argparse.Namespace, run: Callable[..., dict[str, Any]], **options: Any) -> dict[str, Any]:
    """Run one simulation with the options every ``sim`` command shares, in ``--workdir`` or a temporary
    directory removed afterwards, and print its result."""
    _check(args)
    workdir, tmp = _workdir(args)
    try:
        result = run(
            devices=args.devices,
            duration_s=args.duration,
            workdir=workdir,
            recordings=_recordings(args),
            kind=args.kind,
            transport=args.transport,
            **options,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    _emit(result, args.output)
    return result


def cmd_sim_fleet(args: argparse.Namespace) -> int:
    from fleetloop_fwsim.fleet import run_fleet

    _simulate(
        args,
        run_fleet,
        target=args.grpc,
        capture_period_s=args.capture_period,
        grants=args.grants,
        hold_only=args.hold_only,
    )
    return 0


def cmd_sim_chaos(args: argparse.Namespace) -> int:
    from fleetloop_fwsim.chaos import run_chaos

    result = _simulate(args, run_chaos, seed=args.seed)
    ok = result["acknowledged_samples"] == result["ingested_samples"] and result["duplicates"] == 0
    return 0 if ok else 5


def cmd_sim_rollout_kill(args: argparse.Namespace) -> int:
    from fleetloop_fwsim.rollout_kill import run_kill_loop

    if args.kills < 1 or args.devices < 8:
        raise UserError("sim rollout-kill: --kills must be at least 1 and --devices at least 8")
    workdir, tmp = _workdir(args)
    try:
        report = run_kill_loop(workdir, devices=args.devices, kills=args.kills, seed=args.seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    _emit(report.as_dict(), args.output)
    return 0 if report.ok else 5


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--devices", type=int, default=10, help="simulated agents in this process")
    s.add_argument("--duration", type=float, default=20.0, help="seconds of data production")
    s.add_argument("--transport", choices=("grpc", "mqtt"), default="grpc")
    s.add_argument("--kind", choices=("car", "robot", "plc"), default="car")
    s.add_argument("--data", help="recordings directory (default ../shared/data/real or $FLEETLOOP_DATA)")
    s.add_argument("--simulated", action="store_true", help="generated signals instead of the recordings")
    s.add_argument("--workdir", help="keep device stores and the coordinator's data here")
    s.add_argument("-o", "--output", choices=("json", "yaml"), default="yaml")


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``sim fleet`` and ``sim chaos`` to ``groups["sim"]``."""
    sim = groups["sim"]
    s = sim.add_parser("fleet", help="many simulated agents in one process against a coordinator")
    _common(s)
    s.add_argument("--grpc", help="coordinator gRPC host:port (default: start a private coordinator)")
    s.add_argument("--capture-period", type=float, default=1.0, help="seconds between captures per device")
    s.add_argument(
        "--grants", action="store_true", help="devices report backlog and upload only what the cloud grants"
    )
    s.add_argument(
        "--hold-only",
        action="store_true",
        help="gRPC devices that only hold their control stream (up to 10,000): what one coordinator holds",
    )
    s.set_defaults(func=cmd_sim_fleet)
    s = sim.add_parser(
        "chaos", help="fleet + coordinator kills + link cuts/stalls/delays; checks acknowledged == ingested"
    )
    _common(s)
    s.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    s.set_defaults(func=cmd_sim_chaos)
    s = sim.add_parser(
        "rollout-kill",
        help="rollouts while the coordinator is SIGKILLed and restarted; checks no device beyond its phase "
        "and no decision lost or doubled",
    )
    s.add_argument("--kills", type=int, default=50, help="coordinator kills (SIGKILL) during the rollouts")
    s.add_argument("--devices", type=int, default=24, help="simulated devices answering the OTA jobs")
    s.add_argument("--seed", type=int, default=1, help="seed of the kill schedule and install times")
    s.add_argument("--workdir", help="keep the coordinator's data and log here")
    s.add_argument("-o", "--output", choices=("json", "yaml"), default="yaml")
    s.set_defaults(func=cmd_sim_rollout_kill)
