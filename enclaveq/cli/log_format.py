"""How `enclaveq worker` writes its log: ``--log-format text`` (the default, one human-readable
line per record) or ``--log-format json`` (one JSON object per line, for log pipelines).

This module owns the JSON shape and the logging setup of the command; the libraries only log.
A JSON line holds:

  ts        the record's creation time, ISO 8601 UTC with milliseconds ("2024-05-01T12:00:00.123Z")
  level     INFO, WARNING, ...
  logger    the logger's name (enclaveq.worker, enclaveq.broker, aio_pika, ...)
  msg       the formatted message (a message that fails to format says so instead)
  exc_type  with an exception: its class, e.g. "ConnectionError"
  exc       with an exception: the traceback text
  stack     with ``stack_info=True``: the stack text
  ...       the structured fields a record carries through ``extra=``, only those in EXTRA_FIELDS

Only the formatted message and allow-listed extras are written, never ``record.args`` or any
other attribute: the message is what the text format shows too (its URLs redacted by the code
that logs them, broker_adapters.redact_url), so the JSON format shows nothing the text format
does not. Formatting never raises: a logging call must not end the worker.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "ENCLAVEQ_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The ``extra=`` fields a JSON line carries (identifiers of the pool and worker, never payloads).
# Anything else a record carries is left out: a new field is shown only once it is listed here.
EXTRA_FIELDS = ("pool", "epoch", "worker_id", "kind", "outcome", "reason")


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _scalar(value: Any) -> Any:
    """``value`` as a JSON value: numbers, booleans, None and strings as they are, anything else
    as its str() (a non-finite float as a string: JSON has no NaN)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        return str(value)
    except Exception as exc:  # a broken __str__ must not cost the line
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:
        # The template alone (never the arguments: those are what failed, and may hold anything).
        template = record.msg if isinstance(record.msg, str) else f"<{type(record.msg).__name__}>"
        return f"unformattable log message ({type(exc).__name__}): {template}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped),
    in ASCII (so no stream encoding can fail on it)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return json.dumps(self.fields(record), ensure_ascii=True)
        except Exception as exc:  # last resort: the fields are always there
            return json.dumps({"ts": _timestamp(record.created), "level": str(record.levelname),
                               "logger": str(record.name),
                               "msg": f"log record could not be formatted ({type(exc).__name__})"})

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        line: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname,
                                "logger": record.name, "msg": _message(record)}
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            try:
                line["exc"] = self.formatException(record.exc_info)
            except Exception as exc:
                line["exc"] = f"traceback could not be formatted ({type(exc).__name__})"
        elif record.exc_text:  # a record formatted elsewhere first keeps only the text
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        for name in EXTRA_FIELDS:
            if name in record.__dict__:
                line[name] = _scalar(record.__dict__[name])
        return line


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing ``log_format`` ("text" or "json") to ``stream`` (default: stderr)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """The worker's logging: every record at ``level`` or above to stderr in ``log_format``. With
    json, Python warnings become records too, so that every line of stderr is JSON."""
    logging.basicConfig(level=level, handlers=[log_handler(log_format)])
    if log_format == "json":
        logging.captureWarnings(True)
