"""A PLC gateway and robot agent, run as on a real machine: the runtime reads a Modbus server and the
push API, exports each source's counters, keeps running through a refused publish, and closes both."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from fleetloop_agent.config import load_agent_config
from fleetloop_agent.push_client import PushClient
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_agent.sources.push_api import PushApiSource
from fleetloop_fwsim import bootloader, firmware
from fleetloop_fwsim.child_process import free_port
from fleetloop_shared.errors import UserError
from tests.fixtures.plc_servers import modbus_pump


def test_the_agent_runs_live_plc_and_robot_sources(tmp_path: Path) -> None:
    with modbus_pump(rows_per_s=10.0) as pump:
        sock = tmp_path / "run" / "push.sock"
        bootloader.provision(tmp_path, firmware.build_image("1.0.0", "gateway"))  # the machine's A/B slots
        p = bootloader.paths(tmp_path)
        config = {
            "device_id": "gateway-1",
            "cloud": {"grpc": f"127.0.0.1:{free_port()}"},  # no cloud: the agent captures offline
            "platform": {
                "slots": {"a": str(p["slot_a"]), "b": str(p["slot_b"])},
                "env": str(p["env"]),
                "booted_slot": str(p["booted_slot"]),
                "hardware_id": "gateway",
            },
            "sources": [
                {
                    "kind": "modbus_tcp",
                    "name": "pump",
                    "host": pump.host,
                    "port": pump.port,
                    "poll_ms": 50,
                    "tags": {
                        "Plant.Pump.Pressure": {
                            "register": "holding",
                            "address": 6,
                            "type": "float32",
                            "unit": "bar",
                        },
                        "Plant.Pump.Running": {"register": "coil", "address": 0},
                    },
                },
                {
                    "kind": "push_api",
                    "name": "robot",
                    "socket": str(sock),
                    "signals": {"Robot.Mode": {"type": "string"}},
                },
            ],
        }
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        runtime = AgentRuntime(load_agent_config(path))
        assert runtime.data_origin == "live"
        thread = threading.Thread(target=runtime.run, daemon=True)
        thread.start()
        try:
            push = next(s for s in runtime.sources if isinstance(s, PushApiSource))
            deadline = time.monotonic() + 15
            while not push.serving:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with PushClient(sock) as client:
                assert client.publish({"Robot.Mode": "walk"}) == 1
                with pytest.raises(UserError, match="not in this agent's catalog"):
                    client.publish({"Robot.Arm": 1.0})

            def value(name: str, source: str) -> float:
                got = runtime.metrics.registry.get_sample_value(
                    f"fleetloop_agent_source_{name}_total", {"source": source}
                )
                return got or 0.0

            def read_total() -> float:
                return runtime.metrics.registry.get_sample_value("fleetloop_agent_samples_read_total") or 0.0

            # the sources count a sample when they queue it, the main loop when it reads it: wait for both
            deadline = time.monotonic() + 30
            while (
                value("samples", "pump") < 20
                or value("samples", "robot") < 1
                or value("errors", "robot") < 1
                or read_total() < 20
            ):
                assert time.monotonic() < deadline, "the source counters never reached Prometheus"
                time.sleep(0.05)
            assert thread.is_alive()  # a refused publish is the publisher's problem, not the agent's
        finally:
            runtime.stop()
            thread.join(20)
        assert not thread.is_alive() and not sock.exists()  # the sources were closed with the agent
