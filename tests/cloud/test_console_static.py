"""The console's files on a real coordinator: public (no token), each with its media type and a strict
Content-Security-Policy; nothing outside the console's folder; the vendored library's version and
licence beside it."""

from __future__ import annotations

import re
from importlib import resources

from fleetloop_cloud.http_api.console import static_files
from tests.cloud.conftest import RunningCoordinator


def test_the_page_and_every_file_it_loads_are_served_without_a_token(
    running_coordinator: RunningCoordinator,
) -> None:
    rc = running_coordinator
    status, headers, body = rc.call("GET", "/", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-eval" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    referenced = re.findall(r'(?:src|href)="(/console/[^"]+)"', body.decode())
    assert len(referenced) >= 4
    modules = re.findall(r'from "\./([a-z]+\.js)"', resources.files("fleetloop_cloud.console").joinpath(
        "static/app.js").read_text())  # fmt: skip
    for path in referenced + [f"/console/{m}" for m in modules]:
        status, headers, _ = rc.call("GET", path, token=None)
        kind = {"js": "text/javascript", "css": "text/css"}[path.rsplit(".", 1)[1]]
        assert status == 200 and headers["Content-Type"].startswith(kind), path
        assert "Content-Security-Policy" in headers


def test_nothing_but_the_consoles_files_is_served(running_coordinator: RunningCoordinator) -> None:
    rc = running_coordinator
    for path in ("/console/nothing.js", "/console/../server.py", "/console/%2e%2e/server.py",
                 "/console/vendor/../../__init__.py", "/console/__init__.py"):  # fmt: skip
        status, _, body = rc.call("GET", path, token=None)
        assert status == 404, (path, status, body[:200])


def test_the_vendored_library_names_its_version_and_licence() -> None:
    files = static_files()
    version = files["vendor/uplot/VERSION"][0].decode()
    found = re.search(r"uPlot (\d+\.\d+\.\d+)", version)
    assert found and "MIT" in version
    assert f"(v{found.group(1)})" in files["vendor/uplot/uPlot.iife.min.js"][0][:200].decode()
    assert b"MIT License" in files["vendor/uplot/LICENSE"][0]
