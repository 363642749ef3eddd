"""The CLI's HTTP client for the coordinator's REST API (urllib; errors mapped to the error tree).

Every request carries the API token as ``Authorization: Bearer`` when there is one; an ``https``
coordinator's certificate is checked against the context's CA when one is set (else the system's).
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetloop_cli.contexts import DEFAULT_CLOUD, resolve
from fleetloop_cli.output import FORMATS, emit, render_object
from fleetloop_shared import errors

__all__ = ["DEFAULT_CLOUD", "CoordinatorClient", "client_from_args", "post_file"]


def with_cloud(sp: argparse.ArgumentParser) -> None:
    """The options :func:`client_from_args` reads (which coordinator, which context) and the output format."""
    sp.add_argument("--cloud", default=None, help="coordinator URL ($FLEETLOOP_CLOUD)")
    sp.add_argument("--context", default=None, help="config context to use ($FLEETLOOP_CONTEXT)")
    sp.add_argument("-o", "--output", choices=FORMATS, default="table")


def cloud_command(group: Any, name: str, func: Callable[[argparse.Namespace], int], **kw: Any) -> Any:
    """A subcommand that asks the coordinator: its parser, with the cloud options, and its handler."""
    sp = group.add_parser(name, **kw)
    with_cloud(sp)
    sp.set_defaults(func=func)
    return sp


class CoordinatorClient:
    def __init__(
        self, base_url: str, *, token: str | None = None, ca: Path | None = None, timeout_s: float = 30.0
    ) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self.ca = ca
        self.timeout = timeout_s
        self._ssl: ssl.SSLContext | None = None
        if self.base.startswith("https://"):
            try:
                self._ssl = ssl.create_default_context(cafile=str(ca) if ca else None)
            except (OSError, ssl.SSLError) as exc:
                raise errors.ConfigError(f"CA certificate {ca}: {exc}") from None

    def with_token(self, token: str) -> CoordinatorClient:
        """The same coordinator, acting with another token."""
        return CoordinatorClient(self.base, token=token, ca=self.ca, timeout_s=self.timeout)

    def request(
        self, method: str, path: str, *, body: bytes | None = None, content_type: str = "application/json"
    ) -> Any:
        raw, _ = self._send(method, path, body, content_type)
        return json.loads(raw or b"null")

    def download(self, path: str) -> tuple[bytes, str]:
        """A file the coordinator makes (an export): its bytes and the file name it suggests."""
        return self._send("GET", path, None, "")

    def _send(self, method: str, path: str, body: bytes | None, content_type: str) -> tuple[bytes, str]:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                disposition = resp.headers.get("Content-Disposition", "")
                match = re.search(r'filename="([A-Za-z0-9._-]+)"', disposition)
                return resp.read(), match.group(1) if match else ""
        except urllib.error.HTTPError as exc:
            raise _from_http(exc) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise errors.UnavailableError(f"cannot reach the coordinator at {self.base}: {reason}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, obj: Any) -> Any:
        return self.request("POST", path, body=json.dumps(obj).encode())


def _from_http(exc: urllib.error.HTTPError) -> errors.FleetloopError:
    try:
        doc = json.loads(exc.read() or b"{}")
        message = str(doc.get("error") or exc.reason)
        kind = str(doc.get("type") or "")
        if doc.get("request_id"):
            message += f" (request {doc['request_id']})" if exc.code >= 500 else ""
    except ValueError:
        message, kind = str(exc.reason), ""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.FleetloopError):
        if cls is errors.RuleError:
            return errors.UserError(message)  # the message already carries FILE:LINE:COL
        return cls(message)
    if exc.code == 401:
        return errors.UnauthenticatedError(message)
    if exc.code == 403:
        return errors.PermissionDeniedError(message)
    if 400 <= exc.code < 500:
        return errors.UserError(message)
    return errors.UnavailableError(f"coordinator error {exc.code}: {message}")


def client_from_args(args: Any) -> CoordinatorClient:
    """The client for a command parsed with ``--cloud`` / ``--context`` (see :mod:`.contexts`)."""
    target = resolve(getattr(args, "cloud", None), getattr(args, "context", None))
    return CoordinatorClient(target.cloud, token=target.token, ca=target.ca)


def post_file(args: Any, path: Path, url: str, content_type: str) -> int:
    """What a command that sends a local file does (``artifacts upload``, ``rules apply``): POST the
    bytes of ``path`` to ``url`` and print the coordinator's answer, YAML with ``-o yaml`` and JSON
    otherwise. NotFoundError when there is no such file."""
    if not path.is_file():
        raise errors.NotFoundError(f"{path}: no such file")
    result = client_from_args(args).request("POST", url, body=path.read_bytes(), content_type=content_type)
    emit(render_object(result, "yaml" if args.output == "yaml" else "json"))
    return 0
