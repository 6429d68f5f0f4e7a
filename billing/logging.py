"""One JSON line per log record, with secrets scrubbed before anything is written.

Operators search logs by `org_id`, `event_id` and `workflow_id`, so those travel
as fields (pass them in `extra=` or bind them with `log_context`). The redacting
filter sits on the handler, so it covers every logger that reaches it, including
third-party ones that might print a request with its `Authorization` header.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

REDACTED = "[REDACTED]"

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Stripe API keys (secret, restricted) and webhook signing secrets.
    (re.compile(r"\b(?:sk|rk)_(?:test|live)_[A-Za-z0-9_]+"), REDACTED),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_]+"), REDACTED),
    # `Authorization: Bearer ...` values, whatever the token looks like.
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), f"Bearer {REDACTED}"),
    # Any JWT (header.payload.signature, base64url of a JSON object).
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?"), REDACTED),
    # Stripe-Signature header values (`t=...,v1=...,v0=...`) and loose signatures.
    (re.compile(r"\bt=\d+(?:,\s*v\d+=[A-Za-z0-9]+)+"), REDACTED),
    (re.compile(r"\bv[01]=[0-9a-fA-F]{16,}"), REDACTED),
)

# Extra fields whose values are secrets whatever they look like.
_SECRET_KEYS = re.compile(r"(?i)(authorization|signature|secret|password|token|api[_-]?key|cookie)")

# Attributes every LogRecord has; anything else on a record is an extra field.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "billing_log_context", default=None
)


# Where any of the patterns above could start: most text has none, and one search
# is much cheaper than every substitution (the API logs lines per webhook).
_MAYBE_SECRET = re.compile(r"\b(?:(?:sk|rk)_|whsec_|eyJ|t=\d|v[01]=|(?i:bearer))")


def redact(text: str) -> str:
    """`text` with every secret-looking substring replaced."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (org_id, event_id, ...) to every record logged inside the block."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Add fields to the current context (the enclosing `log_context` block undoes it)."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v is not None})
    _context.set(current)


class RedactingFilter(logging.Filter):
    """Scrubs the message, its arguments and extra fields of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS:
                record.__dict__[key] = _redact_value(key, value)
        return True


class JsonFormatter(logging.Formatter):
    """timestamp, level, logger, message, then context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in (_context.get() or {}).items():
            document.setdefault(key, _redact_value(key, value))
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in document:
                document[key] = _redact_value(key, value)
        if record.exc_info:
            document["exc_info"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            document["stack_info"] = redact(self.formatStack(record.stack_info))
        # orjson, with anything it does not know (and datetimes, dataclasses) as str().
        options = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
        return orjson.dumps(document, default=str, option=options).decode()


def logging_config(level: int | str = "INFO", *, stream: TextIO | None = None) -> dict[str, Any]:
    """`configure_logging` as a `logging.config.dictConfig` document.

    uvicorn applies such a document in each worker process it spawns
    (`billing api --workers N`), where nothing configured by the parent exists.
    """
    handler: dict[str, Any] = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "filters": ["redact"],
        "stream": stream if stream is not None else "ext://sys.stderr",
    }
    # uvicorn installs its own plain-text handlers; send its records to ours instead.
    uvicorn_loggers = {
        name: {"handlers": [], "propagate": True}
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"redact": {"()": RedactingFilter}},
        "handlers": {"json": handler},
        "root": {"handlers": ["json"], "level": level.upper() if isinstance(level, str) else level},
        "loggers": uvicorn_loggers,
    }


def configure_logging(level: int | str = "INFO", *, stream: TextIO | None = None) -> None:
    """Route every logger (ours, uvicorn's, temporalio's) through one JSON, redacting handler."""
    logging.config.dictConfig(logging_config(level, stream=stream))
