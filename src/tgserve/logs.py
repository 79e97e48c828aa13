"""Logging set-up shared by every process: readable lines by default, JSON lines on request."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "component": self.component,
            "target": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "fields"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ReadableFormatter(logging.Formatter):
    """One line per record; the request id, when a filter set one, follows the logger's name."""

    def __init__(self, component: str) -> None:
        super().__init__(
            f"%(asctime)s %(levelname)-5s {component} %(name)s%(request_tag)s: %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


def setup_logging(
    json_output: bool = False,
    component: str = "tgserve",
    level: str = "INFO",
    filters: Sequence[logging.Filter] = (),
) -> None:
    """Filters (e.g. the router's request id) sit on the handler, so every logger's records pass."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component) if json_output else ReadableFormatter(component))
    for f in filters:
        handler.addFilter(f)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
