"""What devices fetch over HTTP: artifact payloads (with Range, so a cut download resumes where it
stopped) and TUF metadata.

Both are public — no operator token, no device certificate: every byte is signed (TUF metadata) or
named by its hash in signed metadata (payloads), and the device verifies before it uses anything
(docs/decisions: devices and HTTP downloads). Operator routes need a token a device never holds.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Executor

from aiohttp import web

from fleetloop_cloud.services.api import OperatorApi
from fleetloop_cloud.services.releases import ArtifactFile
from fleetloop_shared.errors import UserError

#: Bytes read from the object store (one ranged GET from a bucket) and written to the socket at a time.
FILE_CHUNK = 4 * 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
SHA256 = "{sha256:[0-9a-f]{64}}"
DEVICE_ID = "{device_id:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}}"
METADATA = r"{name:[a-z0-9.]{1,32}\.json}"


class Unsatisfiable(Exception):
    """A Range that starts at or past the end of the file (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int, bool]:
    """(first byte, last byte, partial) for a ``Range`` header against a file of ``size`` bytes: one
    range ``bytes=N-``, ``bytes=N-M`` or the suffix ``bytes=-N``. UserError for anything else,
    :class:`Unsatisfiable` for a range starting at or past the end."""
    if not header:
        return 0, size - 1, False
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise UserError(f"unsupported Range header {header!r}")
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or start > end:
        raise Unsatisfiable
    return start, end, True


async def send_file(request: web.Request, file: ArtifactFile, executor: Executor) -> web.StreamResponse:
    """``file`` with Range, read in pieces of FILE_CHUNK from wherever it is stored (a folder, a
    bucket): a large image never sits whole in the coordinator's memory."""
    loop = asyncio.get_running_loop()
    size = file.size
    try:
        start, end, partial = byte_range(request.headers.get("Range"), size)
    except Unsatisfiable:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
    response = web.StreamResponse(status=206 if partial else 200)
    response.content_type = "application/octet-stream"
    response.headers["Accept-Ranges"] = "bytes"
    response.content_length = end - start + 1
    if partial:
        response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    position, remaining = start, end - start + 1
    while remaining > 0:
        chunk = await loop.run_in_executor(executor, file.read, position, min(FILE_CHUNK, remaining))
        if not chunk:
            break
        await response.write(chunk)
        position += len(chunk)
        remaining -= len(chunk)
    await response.write_eof()
    return response


def add_file_routes(app: web.Application, api: OperatorApi, executor: Executor) -> None:
    """``/files/<sha256>`` (Range), ``/tuf/image/targets/<target path>`` (Range) and
    ``/tuf/image/<file>``, ``/tuf/director/<device_id>/<file>``."""
    loop_run = asyncio.get_running_loop

    async def artifact(request: web.Request) -> web.StreamResponse:
        relpath = f"files/{request.match_info['sha256']}"
        file = await loop_run().run_in_executor(executor, api.releases.artifact_file, relpath)
        return await send_file(request, file, executor)

    async def target(request: web.Request) -> web.StreamResponse:
        """A payload at its TUF target path (or hash-prefixed), for TUF clients other than the agent."""
        target_path = request.match_info["target_path"]
        file = await loop_run().run_in_executor(executor, api.releases.target_file, target_path)
        return await send_file(request, file, executor)

    async def metadata(request: web.Request) -> web.Response:
        """404 for an absent root version ends a device's rotation walk."""
        repository = "image"
        if "device_id" in request.match_info:
            repository = f"director/{request.match_info['device_id']}"
        name = request.match_info["name"]
        data = await loop_run().run_in_executor(executor, api.releases.metadata_file, repository, name)
        return web.Response(body=data, content_type="application/json", headers={"Cache-Control": "no-store"})

    app.router.add_get(f"/files/{SHA256}", artifact, name="getArtifactFile")
    app.router.add_get(f"/tuf/image/{METADATA}", metadata, name="getImageMetadata")
    app.router.add_get("/tuf/image/targets/{target_path:.+}", target, name="getImageTarget")
    app.router.add_get(f"/tuf/director/{DEVICE_ID}/{METADATA}", metadata, name="getDirectorMetadata")
