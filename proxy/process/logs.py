"""The gateway's process logs (what the supervisor and workers say about themselves, not
the access log): one line per record on stderr, as text for a terminal or as JSON for a
log pipeline (`--log-format json`, `logging: {format: json}` in routes.yaml).

A JSON line is one object: `time` (UTC, RFC 3339 with milliseconds), `level`, `logger`,
`pid`, `message`, and `exception` (the traceback) when the record carries one. Loki,
Elasticsearch, CloudWatch and `jq` read it without a parsing rule.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from proxy.config.model import LOG_FORMATS

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a message's own newlines are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Send the process's log records to stderr at `level`, in `log_format` ("text" or
    "json"), replacing whatever handler an earlier call installed (the format a config
    file asks for is applied once it is read)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
