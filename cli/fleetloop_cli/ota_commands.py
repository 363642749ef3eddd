"""``fleetloop artifacts delta|patch`` and ``fleetloop sim ota-chaos``.

``artifacts delta`` makes the delta the cloud would ship (FLDELTA2 by default, ``--format fldelta1`` for
devices that read only that) and prints ``{algorithm, bytes, new_bytes}``; ``artifacts patch`` applies one
with the same streaming code the device runs. Both work on local files, no coordinator needed.

``sim ota-chaos`` runs a private coordinator (its real TUF image repository, director and HTTP artifact
server on a free port) and cuts the power of simulated devices at random points across N updates, with
deltas in the format ``--delta-format`` names (the devices read only that one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetloop_shared.errors import UserError
from fleetloop_shared.update.delta_format import FLDELTA2, FORMATS


def cmd_artifacts_delta(args: argparse.Namespace) -> int:
    from fleetloop_shared.update.delta import make_delta_file

    out = Path(args.output_file)
    stats = make_delta_file(Path(args.old), Path(args.new), out, format=args.format)
    print(
        json.dumps(
            {
                "algorithm": stats.algorithm,
                "bytes": stats.bytes,
                "new_bytes": stats.new_bytes,
                "chunks": stats.chunks,
                "methods": stats.methods,
            }
        )
    )
    return 0


def cmd_artifacts_patch(args: argparse.Namespace) -> int:
    from fleetloop_shared.update.delta import apply_delta_file

    size = apply_delta_file(Path(args.old), Path(args.patch), Path(args.output_file))
    print(json.dumps({"bytes": size, "output": args.output_file}))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from fleetloop_cli.client import client_from_args
    from fleetloop_cli.output import render_object

    if args.key:  # the image root's keys are offline: the new root is signed here
        from fleetloop_cli.release_commands import rotate_offline

        return rotate_offline(args)
    body: dict[str, Any] = {"online": args.online_keys}
    if args.root_keys is not None:
        body["root_keys"] = args.root_keys
    if args.threshold is not None:
        body["threshold"] = args.threshold
    result = client_from_args(args).post_json(f"/v1/tuf/{args.repository}/rotate", body)
    print(render_object(result, "json" if args.output == "json" else "yaml"), flush=True)
    return 0


class _LocalCloud:
    """A coordinator in this process, serving HTTP, with one release: old → new (ChaosCloud)."""

    def __init__(self, workdir: Path, image_size: int, delta_format: str = FLDELTA2) -> None:
        from fleetloop_cloud.http_api import start_http_server
        from fleetloop_cloud.ota.artifact_store import ReleaseInput
        from fleetloop_cloud.server import Coordinator
        from fleetloop_fwsim.firmware import build_image
        from fleetloop_shared.update.artifact import manifest_from_bytes, sha256_hex

        self.hardware_id = "chaos-hw"
        self.delta_formats: tuple[str, ...] = (delta_format,)
        self.old_image = build_image("1.0.0", self.hardware_id, size_hint=image_size)
        self.new_image = build_image("2.0.0", self.hardware_id, size_hint=image_size)
        self.coordinator = Coordinator(workdir / "cloud")
        self.server, port = start_http_server(self.coordinator, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{port}/"
        self.coordinator.artifacts.add_image(self.old_image)
        manifest, _ = self.coordinator.artifacts.add_release(
            ReleaseInput(self.new_image,
            name="firmware",
            version="2.0.0",
            hardware_id=self.hardware_id,
            bases=[self.old_image],
            now=self.coordinator.clock(),
            base_formats={sha256_hex(self.old_image): self.delta_formats}),
    )
        self.release = manifest_from_bytes(manifest)
        self._keys = workdir / "cloud" / "keys"

    def anchors(self) -> list[bytes]:
        return [
            (self._keys / "image-root.json").read_bytes(),
            (self._keys / "director-root.json").read_bytes(),
        ]

    def offer(self, device_id: str, job_id: str, installed_sha256: str) -> None:
        self.coordinator.director.assign(
            device_id,
            job_id=job_id,
            rollout_id="chaos",
            release=self.release,
            installed_sha256=installed_sha256,
            delta_formats=self.delta_formats,
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cmd_sim_ota_chaos(args: argparse.Namespace) -> int:
    from fleetloop_fwsim.ota_chaos import run_ota_chaos

    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    logging.getLogger().setLevel(logging.ERROR)  # hundreds of cuts: the counters tell the story
    tmp = tempfile.TemporaryDirectory(prefix="fleetloop-ota-chaos-") if not args.workdir else None
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)  # type: ignore[union-attr]
    cloud = _LocalCloud(workdir, args.image_kb * 1024, args.delta_format)
    try:

        def progress(done: int, _: Any) -> None:
            if args.output != "json" and sys.stderr.isatty():
                print(f"\rota-chaos: {done}/{args.runs} runs", end="", file=sys.stderr, flush=True)

        result = run_ota_chaos(cloud, workdir / "devices", runs=args.runs, seed=args.seed, progress=progress)
    finally:
        cloud.close()
        if tmp is not None:
            tmp.cleanup()
    out = result.as_dict()
    if args.output == "json":
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0 if result.bricked == 0 else 1


def register(groups: dict[str, Any], with_cloud: Callable[[argparse.ArgumentParser], None]) -> None:
    """``artifacts delta|patch`` into ``groups["artifacts"]``, ``sim ota-chaos`` into ``groups["sim"]``."""
    arts = groups["artifacts"]
    s = arts.add_parser(
        "delta", help="make the delta the cloud would ship; prints {algorithm, bytes, new_bytes}"
    )
    s.add_argument("--from", dest="old", required=True, help="the installed (old) image")
    s.add_argument("--to", dest="new", required=True, help="the new image")
    s.add_argument("-o", "--output-file", required=True, help="where to write the delta")
    s.add_argument("--format", choices=FORMATS, default=FLDELTA2, help="delta container format")
    s.set_defaults(func=cmd_artifacts_delta)
    s = arts.add_parser("patch", help="apply a delta with the device's streaming code")
    s.add_argument("--from", dest="old", required=True, help="the installed (old) image")
    s.add_argument("--patch", required=True, help="the delta")
    s.add_argument("-o", "--output-file", required=True, help="where to write the new image")
    s.set_defaults(func=cmd_artifacts_patch)

    keys = groups["top"].add_parser("keys", help="TUF signing keys").add_subparsers(dest="sub", required=True)
    groups["keys"] = keys
    s = keys.add_parser(
        "rotate",
        help="new root version (new expiry; new root keys and threshold; optionally new online keys)",
    )
    s.add_argument("--repository", choices=["image", "director"], required=True)
    s.add_argument("--root-keys", type=int, default=None, help="replace the root keys with N new ones")
    s.add_argument("--threshold", type=int, default=None, help="root signatures a new root version needs")
    s.add_argument(
        "--online-keys", action="store_true",
        help="also replace the targets/snapshot/timestamp keys (after a suspected compromise)",
    )
    offline = s.add_argument_group("an image root whose keys are offline (signed here)")
    offline.add_argument("--key", action="append", default=[], help="a root private key (repeat)")
    offline.add_argument("--new-root-key", action="append", default=[],
                         help="public key replacing the root keys (repeat; sign with their --key too)")
    offline.add_argument("--targets-key", action="append", default=[],
                         help="public key replacing the targets keys (repeat)")
    offline.add_argument("--targets-threshold", type=int, default=None)
    offline.add_argument("--trusted-root", help="a root you trust (image-root.json)")
    offline.add_argument("--passphrase-file", help="file holding the keys' passphrase")
    with_cloud(s)
    s.set_defaults(func=cmd_keys_rotate)

    sim = groups["sim"]
    s = sim.add_parser("ota-chaos", help="cut the power at random points across N OTA updates; count bricks")
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-kb", type=int, default=256, help="size of the simulated firmware images")
    s.add_argument(
        "--delta-format", choices=FORMATS, default=FLDELTA2, help="delta format the devices read"
    )
    s.add_argument("--workdir", default="", help="keep the devices here (default: a temporary directory)")
    s.add_argument("-o", "--output", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_sim_ota_chaos)
