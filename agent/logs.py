"""structlog set-up: one key-value event per line, JSON for journald and log shippers, or console."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import structlog

from agent.config import Config, load_or_exit, shown


def _not_a_client_hangup(record: logging.LogRecord) -> bool:
    """aioftp reports a client's hang-up (reset, cancelled dispatcher) as an exception; that is a normal
    end of session, not an error worth an admin's attention."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.CancelledError))


def _escape_values(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """ConsoleRenderer prints strings raw (JSON escapes them): escape a client's text; tracebacks keep their lines."""
    return {k: shown(v) if isinstance(v, str) and k != "exception" else v for k, v in event.items()}


class _EscapingFormatter(logging.Formatter):
    """Libraries' messages (which may quote a client's bytes) on one line, escaped; a traceback stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shown(super().formatMessage(record))


def configure(level: str = "info", fmt: str = "json") -> None:
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.dict_tracebacks] if fmt == "json"
              else [structlog.processors.format_exc_info, _escape_values]),
            structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # one write per line (the event and its newline together): the owner and its workers share the log
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (asyncssh, aioftp, botocore) log through stdlib logging: keep their noise at warning.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=max(threshold, logging.WARNING), handlers=[handler])
    for name in ("asyncio", "aioftp.server"):
        logging.getLogger(name).addFilter(_not_a_client_hangup)


def load_config(path: str, console_on_tty: bool = False) -> Config:
    """A command's config (a bad one exits 2 naming the key), logging set up by it; console_on_tty: a command
    whose answer is stdout logs to stderr as readable text on a terminal."""
    cfg = load_or_exit(path)
    configure(cfg.log.level, "console" if console_on_tty and sys.stderr.isatty() else cfg.log.format)
    return cfg
