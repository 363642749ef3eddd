"""The console in a real browser (Debian's Chromium driven by Playwright) against a real coordinator:
a capture of the real comma2k19 drive and a capture of a million samples ingested through its ingest
service, a rollout of a signed release, and a real agent replaying the drive that connects while the
fleet page is open.

Every wait is on a condition the page shows, never a fixed sleep. With ``FLEETLOOP_SCREENSHOTS=DIR`` the
tests also save a screenshot of each page there (how ``docs/console.md``'s pictures are made).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from mcap.reader import make_reader
from playwright.sync_api import Page, expect

from fleetloop_agent.config import load_agent_config
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_cli.main import main as cli_main
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.repositories.records import Inventory
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim.firmware import build_image
from fleetloop_fwsim.provisioning import provision_sim_device
from tests.fixtures.browser import browser_context
from tests.fixtures.recorded_capture import (
    DRIVE_START_NS,
    Signal,
    campaign_document,
    connect,
    drive_signals,
    ingest_capture,
)

LOCAL = Caller.local()
HW = "sim-rec"
#: Samples of the large capture: the drive's four wheel speeds, laid end to end until a million.
LARGE_SAMPLES = 1_000_000


@dataclass
class Console:
    coordinator: Coordinator
    base: str
    grpc: str
    tokens: dict[str, str]
    drive: str
    large: str
    rollout: str
    recordings: Path
    work: Path


def _large_signals(signals: list[Signal]) -> list[Signal]:
    wheels = [s for s in signals if ".Wheel." in s.path]
    span = int(wheels[0].t_ns.max() - wheels[0].t_ns.min()) + 10_000_000
    tiles = LARGE_SAMPLES // sum(len(s.t_ns) for s in wheels) + 1
    out = []
    for s in wheels:
        t = np.concatenate([s.t_ns + k * span for k in range(tiles)])
        v = np.tile(s.values, tiles)
        out.append(Signal(s.path, s.data_type, s.unit, t, v))
    extra = sum(len(s.t_ns) for s in out) - LARGE_SAMPLES
    last = out[-1]
    out[-1] = Signal(last.path, last.data_type, last.unit, last.t_ns[: len(last.t_ns) - extra],
                     last.values[: len(last.values) - extra])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, recordings: Path) -> Iterator[Console]:
    work = Path(tmp_path_factory.mktemp("console"))
    c = Coordinator(work / "cloud")
    tokens = {"admin": c.tokens.bootstrap(c.clock()).secret}
    for role in ("viewer", "operator", "release-manager"):
        tokens[role] = c.tokens.create(LOCAL, f"the-{role}", role, c.clock()).secret
    c.campaigns.apply(LOCAL, campaign_document(), now=c.clock())
    signals = drive_signals(recordings)
    rec = connect(c, "car-rec", signals, labels={"kind": "car", "role": "recorded"})
    c.repositories.devices.update_inventory("car-rec", Inventory(HW, "1.0.0", "", "a", 0), c.clock())
    drive = ingest_capture(c, rec, signals)
    large_signals = _large_signals(signals)
    big = connect(c, "car-big", large_signals, labels={"kind": "bench"})
    large = ingest_capture(c, big, large_signals, campaign="load-test", fire_ns=DRIVE_START_NS + 10**9)
    connect(c, "plc-idle", signals[:1], labels={"kind": "plc"})  # a device that never captured
    c.releases.upload(LOCAL, ReleaseInput(
        build_image("2.0.0", HW, size_hint=4096), name="firmware", version="2.0.0",
                      hardware_id=HW, now=c.clock()))  # fmt: skip
    policy = {"release_version": "2.0.0", "selector": "role=recorded",
              "phases": [{"name": "canary", "count": 1}, {"name": "all", "percent": 100}]}  # fmt: skip
    rollout = c.rollouts.create(LOCAL, policy, c.clock()).id
    gserver, gport = start_grpc_server(c, "127.0.0.1", 0)
    hserver, hport = start_http_server(c, "127.0.0.1", 0)
    c.jobs.artifact_base_url = f"http://127.0.0.1:{hport}"
    c.start()
    try:
        yield Console(c, f"http://127.0.0.1:{hport}", f"127.0.0.1:{gport}", tokens, drive, large, rollout,
                      recordings, work)  # fmt: skip
    finally:
        c.stop()
        gserver.stop(grace=0).wait(2)
        hserver.shutdown()
        c.close()


@pytest.fixture(scope="module")
def page(console: Console) -> Iterator[Page]:
    with browser_context(console.work / "downloads") as context:
        p = context.new_page()
        errors: list[str] = []
        p.on("pageerror", lambda exc: errors.append(str(exc)))
        p.set_default_timeout(20_000)
        yield p
        assert not errors, f"the page raised: {errors}"


def until(page: Page, script: str, timeout_s: float = 20.0) -> Any:
    """Evaluate ``script`` in the page until it is truthy (the console's CSP allows no eval, which
    ``wait_for_function`` needs); its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(script)
        if value:
            return value
        assert time.monotonic() < deadline, f"never true: {script}"
        page.wait_for_timeout(50)


def drawn(page: Page) -> None:
    """Wait until the timeline has drawn its first window."""
    expect(page.locator("main")).to_have_attribute("data-drawn-ms", re.compile(r"^\d+$"))


def screenshot(page: Page, name: str) -> None:
    target = os.environ.get("FLEETLOOP_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def sign_in(page: Page, console: Console, role: str) -> None:
    page.goto(f"{console.base}/#/fleet")
    if page.locator("#logout").count():
        page.click("#logout")
    page.fill("#token", console.tokens[role])
    page.click("#login button[type=submit]")
    expect(page.locator("#who")).to_contain_text(f"the-{role}" if role != "admin" else "admin")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")


def test_a_token_signs_in_and_a_bad_one_is_told_why(page: Page, console: Console) -> None:
    page.goto(f"{console.base}/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "flt_not-a-token")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("unknown")
    screenshot(page, "login")
    # a token revoked while its holder is signed in: the next request sends them back, saying why
    c = console.coordinator
    secret = c.tokens.create(LOCAL, "brief-visit", "viewer", c.clock()).secret
    page.fill("#token", secret)
    page.click("#login button[type=submit]")
    expect(page.locator("#fleet-table")).to_contain_text("car-rec")
    c.tokens.revoke(LOCAL, "brief-visit", c.clock())
    page.click("nav a[href='#/captures']")
    expect(page.locator("#login-error")).to_contain_text("revoked")


def test_each_page_shows_the_fleets_data(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    expect(page.locator("tr[data-device=car-rec]")).to_contain_text("online")
    expect(page.locator("#online-count")).to_be_visible()
    page.fill("#label-filter", "kind=bench")
    expect(page.locator("#fleet-table tbody tr")).to_have_count(1)
    expect(page.locator("tr[data-device=car-big]")).to_be_visible()
    page.fill("#label-filter", "")
    screenshot(page, "fleet")
    page.click("tr[data-device=car-rec] a")
    expect(page.locator("main h1")).to_contain_text("car-rec")
    expect(page.locator("main")).to_contain_text(console.rollout)  # its OTA history
    expect(page.locator("main .capture-link")).to_have_text(console.drive)
    screenshot(page, "device")
    page.click("nav a[href='#/campaigns']")
    expect(page.locator("#campaign-list")).to_contain_text("harsh-braking")
    page.click("#campaign-list a")
    expect(page.locator("#campaign-text")).to_have_value(re.compile("harsh-braking"))
    screenshot(page, "campaigns")
    page.click("nav a[href='#/captures']")
    expect(page.locator("#captures-table")).to_contain_text(console.large)
    page.select_option("#capture-device", "car-rec")
    expect(page.locator("#captures-table tbody tr")).to_have_count(1)
    screenshot(page, "captures")
    page.click("nav a[href='#/query']")
    page.fill("#sql", "SELECT device_id, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1")
    page.click("#run-query")
    expect(page.locator("#query-result")).to_contain_text("1000000")
    with page.expect_download() as download:
        page.click("#csv")
    assert Path(download.value.path()).read_text().splitlines()[0] == "device_id,n"
    screenshot(page, "query")
    page.fill("#sql", "SELECT nothing FROM samples")
    page.click("#run-query")
    expect(page.locator("#query-result .error")).to_contain_text("nothing")
    page.fill("#timeout", "1")  # a query past its time limit says so
    page.fill("#sql", "SELECT count(*) FROM samples a, samples b WHERE a.value < b.value")
    page.click("#run-query")
    expect(page.locator("#query-result .error")).to_contain_text("time limit of 1 s")


def test_a_viewer_sees_no_write_buttons(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    for where in ("#/campaigns/harsh-braking", f"#/rollouts/{console.rollout}", "#/fleet", "#/captures"):
        page.goto(f"{console.base}/{where}")
        expect(page.locator("main h1")).to_be_visible()
        expect(page.locator("main table, main .empty, main .editor").first).to_be_visible()
        assert page.locator("button.write").count() == 0, where
    expect(page.locator("#validate")).to_have_count(0)  # (the rollouts page is on screen now)
    page.goto(f"{console.base}/#/campaigns/harsh-braking")
    expect(page.locator("#campaign-text")).to_have_attribute("readonly", "")
    # the same pages offer the writes to the roles that may make them
    sign_in(page, console, "release-manager")
    page.goto(f"{console.base}/#/rollouts/{console.rollout}")
    expect(page.locator("#rollout-pause")).to_be_visible()
    page.goto(f"{console.base}/#/campaigns/harsh-braking")
    expect(page.locator("#campaign-text")).to_be_visible()
    assert page.locator("button.write").count() == 0  # a release manager does not change campaigns


def test_an_operators_campaign_error_shows_at_its_line(page: Page, console: Console) -> None:
    sign_in(page, console, "operator")
    page.goto(f"{console.base}/#/campaigns/harsh-braking")
    area = page.locator("#campaign-text")
    text = area.input_value()
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if "when:" in row)
    area.fill(text.replace("delta(", "deltta("))
    page.click("#apply")
    marker = page.locator("#error-marker")
    expect(marker).to_be_visible()
    expect(marker).to_contain_text(f"harsh-braking.yaml:{line}:")
    expect(marker).to_contain_text("deltta")
    assert marker.get_attribute("data-line") == str(line)
    expect(page.locator(f".gutter .ln[data-line='{line}']")).to_have_class(re.compile("error-line"))
    screenshot(page, "campaign-error")
    before = console.coordinator.campaigns.desired(LOCAL).version
    area.fill(text.replace("pre: 5s", "pre: 4s"))  # a valid edit is applied, and the marker goes
    expect(marker).to_be_hidden()
    page.click("#apply")
    expect(page.locator("#campaign-result")).to_contain_text("applied harsh-braking")
    assert console.coordinator.campaigns.desired(LOCAL).version == before + 1


def test_a_device_connecting_shows_up_without_a_reload(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    expect(page.locator("tr[data-device=car-rec]")).to_be_visible()
    assert page.locator("tr[data-device=car-live]").count() == 0
    page.evaluate("window.__sameDocument = true")
    device = provision_sim_device(
        console.work / "car-live", device_id="car-live", kind="car", hardware_id="sim-live",
        cloud={"grpc": console.grpc}, recordings=console.recordings, fleet="demo", replay_speed=8.0,
        heartbeat_s=0.5, health_check=False,
        trust_files=[console.work / "cloud" / "keys" / n for n in ("image-root.json", "director-root.json")],
    )  # fmt: skip
    runtime = AgentRuntime(load_agent_config(device.config_path))
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        row = page.locator("tr[data-device=car-live]")
        expect(row).to_contain_text("online", timeout=30_000)
        expect(row).to_contain_text("%", timeout=30_000)  # its store's fill, from its heartbeats
        assert page.evaluate("window.__sameDocument") is True  # the same page, not a reload
        screenshot(page, "fleet-live")
    finally:
        runtime.stop()
        thread.join(timeout=20)
    expect(page.locator("tr[data-device=car-live]")).to_contain_text("offline", timeout=30_000)


def test_a_release_manager_pauses_a_rollout_and_the_cli_sees_it(
    page: Page, console: Console, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sign_in(page, console, "release-manager")
    page.goto(f"{console.base}/#/rollouts/{console.rollout}")
    expect(page.locator("#rollout-state")).to_contain_text("RUNNING")
    expect(page.locator("main .phase").first).to_contain_text("car-rec")
    screenshot(page, "rollout")
    page.click("#rollout-pause")
    expect(page.locator("#rollout-state")).to_contain_text("PAUSED")
    expect(page.locator("main")).to_contain_text("rollouts.pause")  # the audit trail names the action
    monkeypatch.setenv("FLEETLOOP_TOKEN", console.tokens["viewer"])
    capsys.readouterr()
    assert cli_main(["rollout", "status", console.rollout, "--cloud", console.base, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "PAUSED"
    page.click("#rollout-resume")
    expect(page.locator("#rollout-state")).to_contain_text("RUNNING")


def _plots(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate(
        """() => window.fleetloopTimeline.plots.map((u) => ({
            signal: u.fleetloop.signal, left: u.cursor.left, min: u.scales.x.min, max: u.scales.x.max,
            at: u.cursor.left >= 0 ? u.posToVal(u.cursor.left, "x") : null,
            points: u.data[0].length, samples: u.fleetloop.samples, bands: u.fleetloop.bands}))"""
    )
    return result


def test_the_timeline_stacks_signals_on_one_cursor_with_the_trigger_marked(
    page: Page, console: Console
) -> None:
    sign_in(page, console, "viewer")
    page.goto(f"{console.base}/#/captures/{console.drive}?device=car-rec")
    drawn(page)
    plots = _plots(page)
    assert len(plots) >= 8 and len({p["signal"] for p in plots}) == len(plots)
    assert any(p["bands"] for p in plots), "enumerations drawn as state bands"
    expect(page.locator("#trajectory")).to_be_visible()
    # the trigger instant (0 s: the axis counts from it) is a red line on every plot
    reds = page.evaluate(
        """() => window.fleetloopTimeline.plots.map((u) => {
            const x = Math.round(u.valToPos(0, "x", true));
            const [r, g, b] = u.ctx.getImageData(x, Math.round(u.bbox.top + 2), 1, 1).data;
            return [u.fleetloop.signal, r > 180 && g < 90 && b < 90, r, g, b]; })"""
    )
    assert all(red[1] for red in reds), [red for red in reds if not red[1]]
    # one cursor: hovering one plot moves every plot's cursor to the same place
    box = page.locator(".plot .u-over").nth(2).bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    until(page, "window.fleetloopTimeline.plots.every((u) => u.cursor.left > 0)")
    at = {round(p["at"], 2) for p in _plots(page)}
    assert len(at) == 1, at  # every plot's cursor at the same time (to 10 ms: one pixel is ~70 ms)
    screenshot(page, "timeline")
    # zoom on one plot: every plot shows the same narrower window, read again from the coordinator
    before = _plots(page)[0]
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    shown = f"{before['min']},{before['max']}"
    until(page, f"document.querySelector('main').dataset.window !== '{shown}'")
    until(page, "window.fleetloopTimeline.plots.length > 0")
    after = _plots(page)
    assert len({(p["min"], p["max"]) for p in after}) == 1
    span = after[0]["max"] - after[0]["min"]
    assert 0 < span < (before["max"] - before["min"]) / 5


def test_a_million_samples_draw_from_a_bounded_number_of_points(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    page.goto(f"{console.base}/#/captures/{console.large}?device=car-big")
    drawn(page)
    plots = _plots(page)
    width = page.evaluate("document.getElementById('plots').clientWidth")
    assert sum(p["samples"] for p in plots) == LARGE_SAMPLES
    assert all(p["points"] <= 2 * width for p in plots), (width, [p["points"] for p in plots])
    timing = page.evaluate("window.fleetloopTimeline.timing")
    print(f"a capture of {LARGE_SAMPLES:,} samples drew in {timing['ms']:.0f} ms ({timing['points']} "
          f"points): details {timing['detailMs']:.0f} ms, series {timing['seriesMs']:.0f} ms, "
          f"drawing {timing['drawMs']:.0f} ms")  # fmt: skip
    screenshot(page, "timeline-large")


def test_an_export_downloads_and_reads_back(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    page.goto(f"{console.base}/#/captures/{console.drive}?device=car-rec")
    drawn(page)
    with page.expect_download() as mcap_download:
        page.click("#export-mcap")
    assert mcap_download.value.suggested_filename == f"car-rec_{console.drive}.mcap"
    reader = make_reader(io.BytesIO(Path(mcap_download.value.path()).read_bytes()))
    speeds = {}
    for _, _, message in reader.iter_messages(topics=["/Vehicle"]):
        fields = json.loads(message.data)
        if "Speed" in fields:
            speeds[message.log_time] = fields["Speed"]
    rows = console.coordinator.queries.sql(
        LOCAL, f"SELECT t_ns, value FROM samples WHERE capture_id = '{console.drive}' "
        "AND signal = 'Vehicle.Speed' ORDER BY t_ns", max_rows=100_000).rows  # fmt: skip
    assert speeds == dict(rows) and len(rows) > 4000
    with page.expect_download() as parquet_download:
        page.click("#export-parquet")
    table = pq.read_table(parquet_download.value.path())
    count = console.coordinator.queries.sql(
        LOCAL, f"SELECT count(*) FROM samples WHERE capture_id = '{console.drive}'").rows[0][0]  # fmt: skip
    assert table.num_rows == count and set(table.column("device_id").to_pylist()) == {"car-rec"}


def test_what_is_not_there_yet_is_said_so(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    c = console.coordinator
    signals = drive_signals(console.recordings)[:2]
    caller = Caller.device("car-rec", transport="test", proven=True)
    fresh = ingest_capture(c, caller, signals, campaign="harsh-braking", fire_ns=DRIVE_START_NS + 30 * 10**9,
                           window=(DRIVE_START_NS + 25 * 10**9, DRIVE_START_NS + 32 * 10**9))  # fmt: skip
    page.goto(f"{console.base}/#/captures/{fresh}?device=car-rec")
    expect(page.locator("#arriving")).to_contain_text("still arriving")
    page.goto(f"{console.base}/#/captures/no-such-capture-1")
    expect(page.locator("main .error")).to_contain_text("no capture 'no-such-capture-1'")
    page.goto(f"{console.base}/#/devices/plc-idle")
    expect(page.locator("main")).to_contain_text("this device has sent no captures yet")
    expect(page.locator("main")).to_contain_text("this device has been in no rollout")
