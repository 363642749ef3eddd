"""The whole loop, as a user runs it: `fleetloop demo --json` (with injected faults: test_demo_faults.py).

Each run starts a real coordinator and four simulated A/B machines as separate processes on loopback —
a car, a robot, a PLC gateway and a home hub, each agent on live sources (CAN + OBD-II, the push API,
Modbus TCP, zigbee2mqtt over MQTT) whose far side plays the real recordings (or generated signals) —
ingests captures into Parquet, queries them with DuckDB and rolls out firmware v2 as a signed delta.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from fleetloop_fwsim.obd_ecu import DEFAULT_VIN as DEMO_VIN

pytestmark = pytest.mark.e2e


def run_demo(tmp_path: Path, recordings: Path | None, *extra: str) -> tuple[int, dict[str, Any], str]:
    args = [sys.executable, "-m", "fleetloop_cli.main", "demo", "--json", "--workdir", str(tmp_path / "w")]
    if recordings is not None:
        args += ["--data", str(recordings)]
    proc = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=400, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary; stderr:\n{proc.stderr}\n{_logs(tmp_path)}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr + _logs(tmp_path)


def _logs(tmp_path: Path) -> str:
    out = []
    for f in sorted((tmp_path / "w" / "logs").glob("*.log")):
        out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


#: What each kind's agent reads, by source name and kind (the summary names them).
LIVE_SOURCES = {
    "car": {"can0": "can", "gnss": "can", "obd": "obd"},
    "robot": {"robot": "push_api"},
    "plc": {"pump": "modbus_tcp"},
    "hub": {"zigbee": "mqtt_json"},
}


def assert_four_live_machines(summary: dict[str, Any], data: str) -> None:
    """Each of the four kinds ran on live sources (the origin its agent reported to the cloud) and
    captured data through them; the far side played ``data`` (the hub's house is always generated)."""
    machines = summary["machines"]
    assert sorted(m["kind"] for m in machines.values()) == ["car", "hub", "plc", "robot"], machines
    for device_id, m in machines.items():
        assert m["origin"] == "live", (device_id, m)
        assert m["sources"] == LIVE_SOURCES[m["kind"]], (device_id, m)
        assert m["captures"] >= 1 and m["samples"] > 0, (device_id, m)
        assert m["data"] == (data if m["kind"] != "hub" else "simulated"), (device_id, m)
        assert m["far_side"], device_id
    car = next(m for m in machines.values() if m["kind"] == "car")
    assert "ISO-TP" in car["far_side"] and "ws://127.0.0.1:" in car["far_side"]


def assert_car_privacy(summary: dict[str, Any], tmp_path: Path) -> None:
    """The car campaign's policy shaped what the cloud stores: its VIN only hashed, its positions on
    their cells' centres, its captures stamped; no file of the cloud's store holds the VIN in clear."""
    car = summary["privacy"]["car"]
    assert car["policy"] == "demo-car@1" and car["stamps"] == ["demo-car@1"], car
    assert car["vin_hashed"] >= 1 and car["vin_clear"] == 0, car
    assert car["positions"] > 0 and car["positions_off_grid"] == 0, car
    files = [p for p in (tmp_path / "w" / "cloud").rglob("*") if p.is_file()]
    assert not [p for p in files if DEMO_VIN.encode() in p.read_bytes()]
    stores = [p for p in files if p.suffix == ".parquet"]
    assert stores
    for path in stores:  # pages are compressed: read every text cell too
        table = pq.read_table(path)
        for name in ("value_str", "device_id", "capture_id"):
            if name in table.column_names:
                assert DEMO_VIN not in set(table[name].to_pylist()), path


def test_demo_runs_on_simulated_signals_without_recordings(tmp_path: Path) -> None:
    code, summary, logs = run_demo(tmp_path, None, "--simulated")
    assert code == 0, logs
    assert_car_privacy(summary, tmp_path)
    assert summary["data"] == "simulated"
    assert_four_live_machines(summary, "simulated")
    assert summary["captures_ingested"] >= 4 and summary["query_rows"] > 0
    assert summary["rollout"]["state"] == "succeeded"
    assert summary["rollout"]["devices_updated"] == 4


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _describe(pid: int) -> str:
    """State, parent, process group and command line of ``pid`` (what a leftover process is)."""
    try:
        proc = Path("/proc") / str(pid)
        stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    return f"state {stat[0]} ppid {stat[1]} pgid {stat[2]}: {cmd[:200]}"


def _as_from_a_terminal() -> None:
    """The demo started as from a shell's prompt, where Ctrl-C is not ignored: a process inherits an
    ignored SIGINT (a runner that ignores it, a script's background job), and Python then leaves it
    ignored, so the SIGINT below would do nothing and the demo would run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_every_process_it_started(tmp_path: Path, recordings: Path) -> None:
    work = tmp_path / "w"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetloop_cli.main",
            "demo",
            "--workdir",
            str(work),
            "--data",
            str(recordings),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )
    deadline = time.monotonic() + 120  # generous: a loaded machine starts processes slowly
    # the coordinator, four far sides and four device supervisors, whenever they are all up (never a
    # fixed wait)
    while len(_processes_mentioning(str(work))) < 9 or not (work / "logs" / "hub-001.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the demo did not start its devices"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: _describe(pid) for pid in _processes_mentioning(str(work))}
    assert left == {}, err


def test_the_whole_loop_on_recordings_then_served_until_ctrl_c(tmp_path: Path, recordings: Path) -> None:
    """``demo --serve --json`` on the recordings: the summary shows the whole loop (four live machines,
    captures, the car's privacy policy, a two-phase rollout by delta); then the coordinator and the
    devices keep running: the console's URL and a viewer token are printed, the console (in Chromium)
    shows the demo's fleet, campaigns, rollout and a capture in the timeline, and Ctrl-C stops every
    process."""
    import re
    import urllib.request

    work = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetloop_cli.main", "demo", "--serve", "--json", "--workdir", str(work),
         "--data", str(recordings)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # ends when the demo exits: then the assertion below says why
            seen.append(line)
            if line.startswith("console: "):
                break
        found = re.match(r"console: (http://\S+)/ .*viewer token: (\S+)\)", seen[-1] if seen else "")
        err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        assert found, "".join(seen) + err + _logs(tmp_path)
        url, token = found.groups()
        summary = json.loads(next(line for line in seen if line.startswith("{")))
        assert summary["ok"] is True, (summary.get("error"), _logs(tmp_path))
        with urllib.request.urlopen(f"{url}/", timeout=10) as page:
            assert b"fleetloop console" in page.read()
        request = urllib.request.Request(f"{url}/v1/devices", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            devices = json.loads(answer.read())
        from fleetloop_fwsim.broker import mosquitto_binary  # the hub joins when its broker can run

        machines = {"car-001", "robot-001", "plc-001"} | ({"hub-001"} if mosquitto_binary() else set())
        assert {d["device_id"] for d in devices if d["online"]} == machines
        _console_shows_the_demo(url, token, tmp_path / "downloads", machines)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:  # a failed assertion leaves no fleet running into the next tests
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {pid: _describe(pid) for pid in _processes_mentioning(str(work))} == {}
    # what the summary says, and the store's files read once nothing writes them any more
    assert_the_whole_loop(summary, tmp_path, _logs(tmp_path))


def assert_the_whole_loop(summary: dict[str, Any], tmp_path: Path, logs: str) -> None:
    """What a demo on the recordings shows when every stage did what it says."""
    assert summary["ok"] is True, (summary.get("error"), logs)
    assert_car_privacy(summary, tmp_path)
    assert summary["data"] == "recordings"
    assert summary["devices"] == 4
    assert summary["campaigns"] == 4
    assert_four_live_machines(summary, "recordings")
    assert summary["captures_ingested"] >= 4
    assert summary["samples_ingested"] > 0
    assert summary["query_rows"] > 0
    ro = summary["rollout"]
    assert ro["state"] == "succeeded"
    assert ro["phases"] == 2
    assert ro["devices_updated"] == 4
    assert 0 < ro["delta_bytes"] < ro["full_bytes"]


def _console_shows_the_demo(url: str, token: str, downloads: Path, machines: set[str]) -> None:
    """Sign in with the printed viewer token; each page shows what the demo made (a campaign per
    machine: each is of its own kind)."""
    import re

    from playwright.sync_api import expect

    from tests.fixtures.browser import browser_context

    with browser_context(downloads) as context:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{url}/")
        page.fill("#token", token)
        page.click("#login button[type=submit]")
        for device in sorted(machines):
            expect(page.locator(f"tr[data-device={device}]")).to_contain_text("online")
        page.click("nav a[href='#/campaigns']")
        expect(page.locator("#campaign-list tbody tr")).to_have_count(len(machines))
        page.click("nav a[href='#/rollouts']")
        expect(page.locator("main table")).to_contain_text("2.0.0")
        assert page.locator("button.write").count() == 0  # a viewer
        page.click("nav a[href='#/captures']")
        page.locator(".capture-link").first.click()
        expect(page.locator("main")).to_have_attribute("data-drawn-ms", re.compile(r"^\d+$"))
        assert page.evaluate("window.fleetloopTimeline.plots.length") > 0
