"""llama.cpp's log, routed into Python logging.

llama.cpp writes its log to stderr by default, which would interleave with a CLI's output
and cannot be silenced per call. :func:`install_llama_logging` sends every line to the
``spiritlm_edge.llama_cpp`` logger instead; :func:`log_listener` lets a caller watch the
lines while a blocking C call runs (the quantizer counts its per-tensor lines for progress).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator

import llama_cpp

llama_log = logging.getLogger("spiritlm_edge.llama_cpp")

# ggml log levels (NONE, DEBUG, INFO, WARN, ERROR; 5 = continue the previous line). llama.cpp
# is chatty: its INFO goes to DEBUG and its warnings (mostly advice) to INFO.
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_log_callback = None
_listeners: list[Callable[[str], None]] = []


def install_llama_logging() -> None:
    """Route llama.cpp's log into the ``spiritlm_edge.llama_cpp`` logger (once per process)."""
    global _log_callback
    if _log_callback is not None:
        return

    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        lvl = last[0] if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
        last[0] = lvl
        message = text.decode("utf-8", errors="replace")
        for listener in list(_listeners):
            listener(message)
        if llama_log.isEnabledFor(lvl) and message.strip():
            llama_log.log(lvl, "%s", message.rstrip())

    _log_callback = callback  # keep a reference: llama.cpp holds the C pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def log_listener(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener(line)`` for every llama.cpp log line while the block runs."""
    install_llama_logging()
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
