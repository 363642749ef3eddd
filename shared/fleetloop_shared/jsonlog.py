"""Logs as JSON, one object per line, so a fleet's logs can be shipped and queried without parsing."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            obj["request_id"] = request_id
        if record.exc_info and record.levelno >= logging.ERROR:
            obj["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(obj, ensure_ascii=False)


def configure(component: str, *, level: str = "info", stream: TextIO | None = None) -> None:
    """Route the root logger to ``stream`` (stderr) as JSON lines tagged with ``component``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)
