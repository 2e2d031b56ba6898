"""Structured logs: key-value events rendered for a console or as JSON lines."""

from __future__ import annotations

import logging
import sys

import structlog


def _drop_foreign_extras(logger, method: str, event: dict) -> dict:
    # uvicorn attaches an ANSI-coloured copy of each message and litellm tags records of other
    # libraries with a redaction marker; neither belongs in a structured event.
    event.pop("color_message", None)
    event.pop("litellm_redacted", None)
    return event


class _QuietWebSockets(logging.Filter):
    """uvicorn logs every overlay connection's accept, open and close at info: one line per peer
    per reconnect. The overlay logs peer connections itself, with the peer's id."""

    NOISE = ('"WebSocket ', "connection open", "connection closed")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.error" or record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        return not any(part in message for part in self.NOISE)


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_QuietWebSockets())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_foreign_extras],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
