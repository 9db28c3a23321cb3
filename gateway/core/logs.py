"""structlog JSON logs: one line per event, request id bound per request, never any content.

Events carry ids, counts, durations and error types only.  Exception messages from libraries can quote
input, so error events log the exception's type, not its text.  Everything else that logs in the process
(uvicorn, transformers, Python warnings) goes through the same JSON renderer, with its traceback reduced to
the exception type, so stderr holds nothing but JSON lines.  Progress bars are off (contracts/offline.py).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging"]

# Library warnings that are not ours to fix and say nothing an operator can act on.
_QUIET_LOGGERS = {
    "uvicorn.access": logging.WARNING,
    "httpx": logging.WARNING,
    "transformers": logging.ERROR,
    "torch": logging.WARNING,
    # bitsandbytes tries to fetch a CPU kernel from a hub at import and warns when it cannot: we never fetch
    "bitsandbytes": logging.ERROR,
}
_IGNORED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"transformers|peft|torch|accelerate"),
    (DeprecationWarning, r"torch|transformers|peft"),
    (UserWarning, r"torch\.utils\.checkpoint|peft"),
)


def _exception_type_only(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A library's traceback can quote request content: keep the exception type, drop its text."""
    info = event.pop("exc_info", None)
    if info:
        exc = info[1] if isinstance(info, tuple) else sys.exc_info()[1] if info is True else info
        if isinstance(exc, BaseException):
            event["error_type"] = type(exc).__name__
    return event


def configure_logging(level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _exception_type_only],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name, floor in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, numeric))
    for logger_name in ("uvicorn", "uvicorn.error"):  # uvicorn adds no handlers with log_config=None
        logging.getLogger(logger_name).propagate = True
    for category, module in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
    logging.captureWarnings(True)  # any other warning becomes a JSON line of logger py.warnings
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
