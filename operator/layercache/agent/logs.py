"""JSON log lines for the agent: one object per line, as log collectors parse them.

Each line has ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, plus the
fields a call passes in ``extra`` (e.g. ``digest``, ``source``, ``bytes``) and ``error``
with the traceback when one is logged. Nothing here redacts: callers never log secrets.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Final

__all__ = ["JsonFormatter", "configure"]

# Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as a single-line JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON; values that JSON cannot hold are written with ``str``."""
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The kubernetes client and httpx log every request at INFO/DEBUG: keep their noise out.
    for noisy in ("kubernetes", "urllib3", "httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
