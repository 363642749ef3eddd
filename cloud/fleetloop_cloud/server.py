"""``fleetloop cloud serve``: the embedded coordinator (SQLite + Parquet + gRPC + HTTP on loopback)."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import threading
from pathlib import Path
from types import FrameType

from fleetloop_cloud.coordinator import Coordinator
from fleetloop_cloud.grpc_api import GrpcTls, start_grpc_server
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.mqtt_bridge import BridgeSettings, MqttBridge

log = logging.getLogger("fleetloop.cloud")


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one and return it. Every device on gRPC holds a
    connection (a descriptor) for as long as it is online; the usual soft limit of 1,024 would turn the
    1,025th device away long before memory or CPU run short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def serve(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 50051,
    http_port: int = 8080,
    ready_file: Path | None = None,
    stop: threading.Event | None = None,
    mqtt: BridgeSettings | None = None,
    db: str | None = None,
    grpc_tls: GrpcTls | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). Writes ``ready_file`` once both ports listen."""
    stop = stop or threading.Event()
    raise_open_files_limit()
    coordinator = Coordinator(data_dir, db=db)
    grpc_server, gport = start_grpc_server(coordinator, host, grpc_port, tls=grpc_tls)
    http_server, hport = start_http_server(coordinator, host, http_port)
    coordinator.artifact_base_url = f"http://{host}:{hport}"
    coordinator.start()
    # MQTT 5 beside gRPC (issue 6): consumers on a shared subscription calling the same Coordinator.
    bridge = MqttBridge(coordinator, mqtt) if mqtt is not None else None
    if bridge is not None:
        bridge.start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    info = {
        "grpc": f"{host}:{gport}",
        "http": f"http://{host}:{hport}",
        "pid": os.getpid(),
        "data_dir": str(data_dir),
    }
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    log.info("coordinator serving: gRPC %s, HTTP %s, data %s", info["grpc"], info["http"], data_dir)
    stop.wait()
    log.info("coordinator stopping")
    if bridge is not None:
        bridge.stop()
    coordinator.stop()
    grpc_server.stop(grace=2).wait(3)
    http_server.shutdown()
    return 0
