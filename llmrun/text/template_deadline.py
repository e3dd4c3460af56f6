"""The time budget of a chat-template render: a watchdog thread that interrupts the rendering thread with an
asynchronous exception, so that even a loop that calls nothing is stopped (template_sandbox.py)."""
from __future__ import annotations

import ctypes
import threading


class RenderTimeout(BaseException):
    """Raised asynchronously in the rendering thread by the watchdog (a BaseException, so that no
    `except Exception` in Jinja or a filter swallows it)."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


def call_with_deadline(fn, seconds: float):
    """fn() in this thread, interrupted with RenderTimeout if it runs longer than `seconds`."""
    tid = threading.get_ident()
    done = threading.Event()
    fired = []

    def watch():
        if not done.wait(seconds) and not done.is_set():
            fired.append(True)
            _set_async_exc(tid, RenderTimeout)

    watchdog = threading.Thread(target=watch, name="llmrun-template-watchdog", daemon=True)
    watchdog.start()
    try:
        return fn()
    finally:
        done.set()
        watchdog.join()
        if fired:
            # still pending if it fired just as fn() returned: drop it, it must not escape this call
            # (if it is delivered inside this block instead, it propagates to the caller like a timeout)
            _set_async_exc(tid, ctypes.py_object())
