"""The CLI's HTTP client for the coordinator's REST API (urllib; errors mapped to the error tree)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from fleetloop_shared import errors

DEFAULT_CLOUD = "http://127.0.0.1:8080"


def default_cloud() -> str:
    return os.environ.get("FLEETLOOP_CLOUD", DEFAULT_CLOUD)


class CoordinatorClient:
    def __init__(self, base_url: str, *, timeout_s: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout_s

    def request(
        self, method: str, path: str, *, body: bytes | None = None, content_type: str = "application/json"
    ) -> Any:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
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
    except ValueError:
        message, kind = str(exc.reason), ""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.FleetloopError):
        if cls is errors.RuleError:
            return errors.UserError(message)  # the message already carries FILE:LINE:COL
        return cls(message)
    if 400 <= exc.code < 500:
        return errors.UserError(message)
    return errors.UnavailableError(f"coordinator error {exc.code}: {message}")


def client_from_args(args: Any) -> CoordinatorClient:
    """The client for a command parsed with ``--cloud``."""
    return CoordinatorClient(str(args.cloud))
