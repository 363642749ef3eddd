"""The simulated bootloader, the selftest health check, and the device supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleetloop_agent.ota.platform import EXIT_REBOOT, read_boot_env, write_boot_env
from fleetloop_fwsim import selftest
from fleetloop_fwsim.bootloader import BootResult, boot, paths, provision, slot_paths
from fleetloop_fwsim.device import DeviceSupervisor
from fleetloop_fwsim.device import paths as device_paths
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.errors import IntegrityError, NotFoundError, StateError

REPO = Path(__file__).resolve().parents[2]
SIZE = 256 * 1024


@pytest.fixture(scope="module")
def images() -> tuple[bytes, bytes]:
    return build_image("1.0.0", "gen2", size_hint=SIZE), build_image("2.0.0", "gen2", size_hint=SIZE)


@pytest.fixture
def device(tmp_path: Path, images: tuple[bytes, bytes]) -> Path:
    d = tmp_path / "dev"
    provision(d, images[0], bootlimit=2)
    return d


def _env(d: Path) -> dict[str, str]:
    return read_boot_env(paths(d)["env"])


def _start_trial(d: Path, image: bytes) -> None:
    """What the agent does before rebooting into an update."""
    slot_paths(d)["b"].write_bytes(image)
    env = _env(d)
    env.update(boot_slot="b", upgrade_available="1", bootcount="0")
    write_boot_env(paths(d)["env"], env)


def test_provision_makes_a_factory_fresh_device(device: Path, images: tuple[bytes, bytes]) -> None:
    p = paths(device)
    assert p == device_paths(device)
    assert p["slot_a"].read_bytes() == images[0] and p["slot_b"].read_bytes() == b""
    assert _env(device) == {"boot_slot": "a", "upgrade_available": "0", "bootcount": "0", "bootlimit": "2"}
    assert p["booted_slot"].read_text() == "a\n"  # as after the factory's first boot
    assert boot(device) == BootResult("a", False)
    assert p["booted_slot"].read_text() == "a\n"
    assert boot(device) == BootResult("a", False) and _env(device)["bootcount"] == "0"


def test_provision_refuses_a_non_image(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError):
        provision(tmp_path / "d", b"not an image")


def test_trial_slot_boots_until_the_limit_then_falls_back(device: Path, images: tuple[bytes, bytes]) -> None:
    _start_trial(device, images[1])
    assert boot(device) == BootResult("b", False) and _env(device)["bootcount"] == "1"
    assert boot(device) == BootResult("b", False) and _env(device)["bootcount"] == "2"
    assert boot(device) == BootResult("a", True)
    env = _env(device)
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("a", "0", "3")
    assert boot(device) == BootResult("a", False)  # the trial is over: no more counting
    assert _env(device)["bootcount"] == "3"


def test_committed_trial_stays(device: Path, images: tuple[bytes, bytes]) -> None:
    _start_trial(device, images[1])
    assert boot(device).slot == "b"
    env = _env(device)
    env.update(upgrade_available="0", bootcount="0")
    write_boot_env(paths(device)["env"], env)
    for _ in range(4):
        assert boot(device) == BootResult("b", False)


def test_bootlimit_zero_falls_back_on_the_first_boot(tmp_path: Path, images: tuple[bytes, bytes]) -> None:
    d = tmp_path / "d"
    provision(d, images[0], bootlimit=0)
    _start_trial(d, images[1])
    assert boot(d) == BootResult("a", True)


def test_an_unbootable_trial_slot_falls_back_at_once(device: Path, images: tuple[bytes, bytes]) -> None:
    _start_trial(device, images[1][: len(images[1]) // 2])  # torn image
    assert boot(device) == BootResult("a", True)
    assert _env(device)["upgrade_available"] == "0"


def test_a_corrupt_env_boots_with_the_default_env(device: Path) -> None:
    paths(device)["env"].write_bytes(b"\xff\xfe garbage without equals\n")
    assert boot(device) == BootResult("a", False)
    assert _env(device)["boot_slot"] == "a"


def test_boot_errors(tmp_path: Path, device: Path) -> None:
    with pytest.raises(NotFoundError, match="not a provisioned device"):
        boot(tmp_path / "empty")
    paths(device)["slot_a"].write_bytes(b"")
    with pytest.raises(StateError, match="neither slot holds a bootable image"):
        boot(device)


def test_env_writes_leave_no_temp_files(device: Path) -> None:
    boot(device)
    assert sorted(p.name for p in device.iterdir()) == ["booted_slot", "env", "slot_a.img", "slot_b.img"]


def test_selftest_passes_and_fails_by_faults_json(device: Path, images: tuple[bytes, bytes]) -> None:
    boot(device)
    assert selftest.check(device) is None
    assert selftest.main(["--device-dir", str(device)]) == 0
    paths(device)["faults"].write_text('{"health_fail_versions": ["1.0.0"]}')
    reason = selftest.check(device)
    assert reason == "firmware 1.0.0 in slot a does not work on this device (listed in faults.json)"
    assert selftest.main(["--device-dir", str(device)]) == 1
    paths(device)["faults"].write_text("{not json")
    assert selftest.main(["--device-dir", str(device)]) == 2
    paths(device)["faults"].write_text('{"health_fail_versions": "2.0.0"}')
    assert selftest.main(["--device-dir", str(device)]) == 2


def test_selftest_as_an_executable(device: Path) -> None:
    boot(device)
    paths(device)["faults"].write_text('{"health_fail_versions": ["1.0.0"]}')
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("shared", "agent", "firmware-sim"))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fleetloop_fwsim.selftest", "--device-dir", str(device)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["selftest: " + str(selftest.check(device))]


def test_selftest_without_a_booted_slot_is_unhealthy(device: Path) -> None:
    paths(device)["booted_slot"].unlink()
    assert "recorded no booted slot" in str(selftest.check(device))


def _agent(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_supervisor_reboots_on_request_and_returns_the_final_exit_code(tmp_path: Path, device: Path) -> None:
    counter = tmp_path / "runs"
    script = (
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\n"
        "print('run', n, open(sys.argv[1]).read().strip())\n"
        f"sys.exit({EXIT_REBOOT} if n < 2 else 7)\n"
    )
    log = tmp_path / "agent.log"
    sup = DeviceSupervisor(device, [*_agent(script), str(paths(device)["booted_slot"])], log_path=log)
    assert sup.run() == 7
    assert sup.reboots == 2 and counter.read_text() == "3"
    assert log.read_text().splitlines() == ["run 0 a", "run 1 a", "run 2 a"]
    assert sup.last_boot == BootResult("a", False)


def test_supervisor_passes_env_and_bounds_reboot_loops(tmp_path: Path, device: Path) -> None:
    script = f"import os, sys; sys.exit({EXIT_REBOOT} if os.environ['FLEET_TEST'] == 'loop' else 0)"
    sup = DeviceSupervisor(device, _agent(script), env={"FLEET_TEST": "loop"}, max_reboots=3)
    assert sup.run() == 1 and sup.reboots == 4
    assert DeviceSupervisor(device, _agent(script), env={"FLEET_TEST": "stop"}).run() == 0


def test_sigterm_stops_the_agent_and_returns_zero(tmp_path: Path, device: Path) -> None:
    started = tmp_path / "started"
    script = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)"
    sup = DeviceSupervisor(device, _agent(script))

    def send_sigterm() -> None:
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=send_sigterm, daemon=True).start()
    t0 = time.monotonic()
    assert sup.run() == 0
    assert time.monotonic() - t0 < 15
    assert signal.getsignal(signal.SIGTERM) is before


def test_power_cut_kills_the_agent_and_boots_again(tmp_path: Path, device: Path) -> None:
    marker = tmp_path / "first-run"
    script = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "if not p.exists():\n"
        "    p.touch(); time.sleep(60)\n"
        "sys.exit(0)\n"
    )
    sup = DeviceSupervisor(device, _agent(script))

    def cut() -> None:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        sup.power_cut()

    threading.Thread(target=cut, daemon=True).start()
    assert sup.run() == 0
    assert sup.power_cuts == 1 and sup.reboots == 0
