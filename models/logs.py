"""Log configuration shared by the CLI's long-running commands (`api`, `worker`).

`text` is one human-readable line per record; `json` is one JSON object per line with `time`,
`level`, `logger` and `message`, plus `batch_id`, `worker` and `model` on every record that
carries them (passed as `extra=`), and `error` with the traceback when there is one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
CONTEXT_FIELDS = ("batch_id", "worker", "model", "queue", "delivery_id")  # copied from `extra=` when present


class JsonLines(logging.Formatter):
    """One JSON object per record and line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str | int, fmt: str = "text") -> None:
    """Set the root logger's level and format (replacing handlers set before), so the project's
    own INFO lines appear at `--log-level info`; libraries' loggers follow the root."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def uvicorn_config(fmt: str) -> dict[str, Any] | None:
    """uvicorn's `log_config`: None keeps its own handlers for text; for json, its loggers hand
    their records to the root logger, so every line has one format."""
    if fmt != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {name: {"handlers": [], "propagate": True} for name in UVICORN_LOGGERS},
    }
