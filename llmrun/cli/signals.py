"""Ctrl-C during a generation: stop the answer, not the program."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_cancels(llm):
    """While active, Ctrl-C cancels the running generation instead of raising KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield   # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: llm.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
