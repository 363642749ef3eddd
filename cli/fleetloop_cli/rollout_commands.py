"""``fleetloop rollout ...``: create a rollout from its policy, watch it, and act on it as a release manager.

``create -f rollout.yaml`` checks the policy here first, so a mistake is reported as ``FILE:LINE:COL``
before anything is sent; the common fields are flags too. Every action prints the rollout's status as
it now stands; ``remove ROLLOUT DEVICE`` takes one device out (a device serviced or sold). Exit codes
scripts can rely on (besides the error codes every command shares: 2 bad input, 3 not found, 4 not
allowed, 6 coordinator unreachable, 7 the rollout's state forbids it): ``status --watch`` and ``wait``
return when the rollout settles — 0 succeeded, 10 paused, 11 waiting for approval, 12 aborted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fleetloop_cli.client import CoordinatorClient, client_from_args
from fleetloop_cli.output import emit, render_object, render_records
from fleetloop_shared.errors import NotFoundError, UserError

#: Exit code of ``status --watch`` / ``wait`` per settled state.
EXIT_BY_STATE = {"SUCCEEDED": 0, "PAUSED": 10, "WAITING_APPROVAL": 11, "ABORTED": 12}
#: Seconds between two reads while watching.
WATCH_INTERVAL_S = 1.0
#: Characters of a phase's progress bar.
BAR_WIDTH = 24


def _policy_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if not args.release:
        raise UserError("rollout create: give the policy with -f FILE, or at least --release VERSION")
    try:
        percents = [float(p) for p in args.phases.split(",")]
    except ValueError:
        raise UserError(
            f"--phases {args.phases!r}: expected comma-separated percents like 5,25,100"
        ) from None
    names = ["canary", *(f"phase-{i + 2}" for i in range(len(percents) - 2)), "everyone"][-len(percents) :]
    spec: dict[str, Any] = {
        "release": {"name": args.name, "version": args.release},
        "target": {"selector": args.selector, "selection": args.selection},
        "phases": [
            {"name": n, "percent": p, "soak": args.soak} for n, p in zip(names, percents, strict=True)
        ],
        "success": {
            "percent": args.success_percent,
            "timeout": args.success_timeout,
            "action": "pause" if args.approve else "next",
        },
        "abort": [
            {
                "failure_type": "FAILED",
                "threshold_percent": args.max_failure_percent,
                "min_executed": args.min_executed,
                "action": args.failure_action,
            }
        ],
    }
    if args.max_per_minute is not None:
        spec["rate"] = {"max_per_minute": args.max_per_minute}
    if args.gate_campaign:
        spec["gates"] = [
            {
                "name": args.gate_campaign,
                "capture_rate": {"campaign": args.gate_campaign},
                "min_effect": args.gate_min_effect,
                "confidence": args.gate_confidence,
                "action": "abort-and-roll-back",
            }
        ]
    return spec


def read_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy to send, checked here (``FILE:LINE:COL`` errors) and written out as plain data."""
    from fleetloop_cloud.rollout.policy import policy_to_dict
    from fleetloop_cloud.rollout.policy_reader import parse_policy
    from fleetloop_shared.yaml_marks import load_marked

    if args.file:
        given = [f for f in ("release", "selector") if getattr(args, f)]
        if given:
            raise UserError(f"rollout create: --{given[0]} and -f both give the policy; use one of them")
        path = Path(args.file)
        if not path.is_file():
            raise NotFoundError(f"{path}: no such file")
        import yaml

        try:
            doc = load_marked(path.read_text(encoding="utf-8"), source=str(path))
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML: {exc}") from None
    else:
        doc = _policy_from_flags(args)
    return policy_to_dict(parse_policy(doc))


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return client_from_args(args)


def _bar(done: int, failed: int, working: int, total: int) -> str:
    if total <= 0:
        return "[" + " " * BAR_WIDTH + "]"
    cells = [round(BAR_WIDTH * n / total) for n in (done, failed, working)]
    while sum(cells) > BAR_WIDTH:
        cells[cells.index(max(cells))] -= 1
    bar = "#" * cells[0] + "x" * cells[1] + "~" * cells[2]
    return "[" + bar.ljust(BAR_WIDTH, ".") + "]"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def status_text(status: dict[str, Any]) -> str:
    """A rollout for a terminal: state, a progress bar per phase, the latest gate decisions."""
    name = f"{status.get('release_name', '')} {status.get('release_version', '')}".strip()
    lines = [
        f"rollout {status['id']} ({name}, revision {status.get('revision', 0)}): {status['state']}, "
        f"phase {status.get('phase', 0) + 1} {status.get('phase_name', '')!r}"
    ]
    if status.get("reason"):
        lines.append(f"  {status['reason']}")
    for i, p in enumerate(status.get("phases", [])):
        mark = ">" if i == status.get("phase") else " "
        bar = _bar(p.get("committed", 0), p.get("failed", 0), p.get("in_progress", 0), p["devices"])
        lines.append(
            f"{mark} {i + 1}. {p['name']:<12} {bar} {p.get('committed', 0)}/{p['devices']} committed"
            + (f", {p['failed']} failed" if p.get("failed") else "")
            + (f", {p['in_progress']} in progress" if p.get("in_progress") else "")
            + (f", {p['removed']} removed" if p.get("removed") else "")
        )
    for g in status.get("gates", []):
        lines.append(
            f"  gate {g['gate']} (phase {g['phase'] + 1}): {g['decision']}, p={_number(g.get('p_value'))}, "
            f"effect {_number(g.get('effect'))} — {g.get('reason', '')}"
        )
    for d in status.get("devices", []):
        if d.get("removed_at"):
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(d["removed_at"]))
            why = f": {d['removed_reason']}" if d.get("removed_reason") else ""
            lines.append(
                f"  removed {d['device_id']} ({d['state']}) by {d.get('removed_by', '')} at {when}{why}"
            )
    if status.get("parent_id"):
        lines.append(f"  rolls back {status['parent_id']}")
    if status.get("rollbacks"):
        lines.append(f"  rolled back by {', '.join(status['rollbacks'])}")
    return "\n".join(lines)


def _show(status: dict[str, Any], output: str) -> None:
    emit(status_text(status) if output == "table" else render_object(status, output))


def cmd_create(args: argparse.Namespace) -> int:
    policy = read_policy(args)
    _show(_client(args).post_json("/v1/rollouts", policy), args.output)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = _client(args).get("/v1/rollouts")
    cols = ["id", "release_name", "release_version", "revision", "state", "phase", "devices", "reason"]
    emit(render_records(rows, args.output, cols if args.output in ("table", "csv") else None))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    c = _client(args)
    while True:
        status = c.get(f"/v1/rollouts/{args.id}")
        _show(status, args.output)
        code = EXIT_BY_STATE.get(status["state"])
        if not args.watch:
            return 0
        if code is not None:
            return code
        time.sleep(WATCH_INTERVAL_S)


def cmd_history(args: argparse.Namespace) -> int:
    h = _client(args).get(f"/v1/rollouts/{args.id}/history")
    if args.output != "table":
        emit(render_object(h, args.output))
        return 0
    emit(render_records(h["events"], "table", ["seq", "at", "event", "detail"]))
    if h["gate_evaluations"]:
        emit("")
        rows = [
            {
                **g,
                "phase": g["phase"] + 1,
                "p_value": _number(g.get("p_value")),
                "effect": _number(g.get("effect")),
            }
            for g in h["gate_evaluations"]
        ]
        emit(
            render_records(rows, "table", ["at", "phase", "gate", "decision", "p_value", "effect", "reason"])
        )
    return 0


def cmd_executions(args: argparse.Namespace) -> int:
    rows = _client(args).get(f"/v1/rollouts/{args.id}/executions")
    cols = ["device_id", "phase", "state", "attempt", "from_version", "running_version", "reason"]
    emit(render_records(rows, args.output, cols if args.output in ("table", "csv") else None))
    return 0


def cmd_revisions(args: argparse.Namespace) -> int:
    path = "/v1/rollout-revisions" + (f"?name={args.name}" if args.name else "")
    rows = _client(args).get(path)
    emit(render_records(rows, args.output))
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    _show(_client(args).request("POST", f"/v1/rollouts/{args.id}/{args.action}"), args.output)
    return 0


def cmd_undo(args: argparse.Namespace) -> int:
    body = {"to_revision": args.to_revision}
    _show(_client(args).post_json(f"/v1/rollouts/{args.id}/undo", body), args.output)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    body = {"devices": list(args.device or [])}
    _show(_client(args).post_json(f"/v1/rollouts/{args.id}/retry", body), args.output)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    path = f"/v1/rollouts/{quote(args.id, safe='')}/devices/{quote(args.device, safe='')}/remove"
    _show(_client(args).post_json(path, body), args.output)
    return 0


def _create_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("-f", "--file", help="the rollout policy (YAML; docs/rollouts.md)")
    s.add_argument("--release", help="release version to roll out")
    s.add_argument(
        "--name", default="", help="release name as uploaded; needed when releases share the version"
    )
    s.add_argument("--selector", default="", help="device label selector, e.g. hw=gen1")
    s.add_argument("--selection", choices=("snapshot", "continuous"), default="snapshot")
    s.add_argument("--phases", default="33,100", help="cumulative percents per phase, e.g. 5,25,100")
    s.add_argument("--soak", default="0s", help="minimum soak per phase, e.g. 30m")
    s.add_argument("--success-percent", type=float, default=100.0)
    s.add_argument("--success-timeout", default="10m", help="time a phase has to reach its success percent")
    s.add_argument("--approve", action="store_true", help="pause after each phase for `rollout approve`")
    s.add_argument("--max-failure-percent", type=float, default=20.0)
    s.add_argument("--min-executed", type=int, default=1, help="devices finished before the brake can act")
    s.add_argument("--failure-action", choices=("pause", "abort", "abort-and-roll-back"), default="pause")
    s.add_argument("--max-per-minute", type=float, default=None, help="offers per minute (default: no limit)")
    s.add_argument("--gate-campaign", help="a capture-rate gate on this campaign (aborts and rolls back)")
    s.add_argument("--gate-min-effect", type=float, default=0.2, help="allowed relative rise of the rate")
    s.add_argument("--gate-confidence", type=float, default=0.99)


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``rollout`` and its subcommands to ``groups["top"]``."""
    ro = groups["top"].add_parser("rollout", help="staged rollouts").add_subparsers(dest="sub", required=True)

    def add(name: str, run: Callable[[argparse.Namespace], int], help_text: str, *ids: str) -> Any:
        s = ro.add_parser(name, help=help_text)
        for arg in ids:
            s.add_argument(arg)
        with_cloud(s)
        s.set_defaults(func=run)
        return s

    _create_flags(add("create", cmd_create, "create a rollout from its policy (-f) or flags"))
    add("list", cmd_list, "every rollout, oldest first")
    s = add("status", cmd_status, "a rollout: progress per phase, gate decisions", "id")
    s.add_argument("--watch", action="store_true", help="refresh until it settles (exit code by state)")
    add("history", cmd_history, "the audit trail and every gate evaluation", "id")
    add("executions", cmd_executions, "one row per device: state, attempts, versions", "id")
    s = add("revisions", cmd_revisions, "rollouts as revisions of their release")
    s.add_argument("--name", default="", help="only this release name")
    actions: Sequence[tuple[str, str]] = (
        ("approve", "open the next phase of a rollout waiting for approval"),
        ("pause", "stop offering the update"),
        ("resume", "continue a paused rollout (accepts the failures so far)"),
        ("abort", "end the rollout for good"),
        ("rollback", "abort and return the devices that took it to their previous release"),
    )
    for action, help_text in actions:
        add(action, cmd_action, help_text, "id").set_defaults(action=action)
    s = add("undo", cmd_undo, "roll the rollout's devices to the release of another revision", "id")
    s.add_argument("--to-revision", type=int, required=True, help="a revision number (rollout revisions)")
    s = add("retry", cmd_retry, "offer the update again to failed devices", "id")
    s.add_argument("--device", action="append", help="only this device (repeatable; default: all failed)")
    s = add("remove", cmd_remove, "take one device out of the rollout (not offered it again)", "id", "device")
    s.add_argument("--reason", default="", help="why (shown in the status and the audit log)")
