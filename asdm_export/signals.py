"""The signals that stop a command, and the one rule for taking them (the CLI's group, ``serve``, ``distill``).

SIGTERM is always taken. SIGINT and SIGHUP are taken where their handler is Python's default, or one that
asdm-export installed here: one the process was started to ignore stays ignored (``nohup``, a script's
background job), and a host program's own handler stays in charge of it.
"""

from __future__ import annotations

import signal

_ours: list = []  # the handlers take() installed and give_back() has not removed: a later take() replaces them


def stop_signals() -> list[int]:
    """The signals a command may take now, by the module's rule."""
    taken = [signal.SIGTERM]
    for name, default in (("SIGINT", signal.default_int_handler), ("SIGHUP", signal.SIG_DFL)):
        sig = getattr(signal, name, None)  # SIGHUP: POSIX only
        if sig is None:
            continue
        handler = signal.getsignal(sig)
        if handler == default or any(handler == ours for ours in _ours):
            taken.append(sig)
    return taken


def take(handler) -> dict:
    """Install ``handler`` for ``stop_signals()``; return the handlers it replaced, for ``give_back``. None is
    installed outside the main thread (Python lets only it set handlers): a signal then stops where it lands."""
    previous = {}
    try:
        for sig in stop_signals():
            previous[sig] = signal.signal(sig, handler)
    except ValueError:
        give_back(previous)
        return {}
    _ours.append(handler)
    return previous


def give_back(previous: dict) -> None:
    """Put back the handlers ``take`` replaced."""
    for sig, handler in previous.items():
        current = signal.signal(sig, handler)
        if current in _ours:
            _ours.remove(current)
