"""Terminal output: log levels for us and the libraries we drive, consoles, sizes."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from rich.console import Console

from .errors import EXIT_BROKEN_PIPE


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of our output went away (``| head``): rich exits 1, which is our accuracy failure."""
        self.quiet = True
        quiet_stdout()
        raise SystemExit(EXIT_BROKEN_PIPE)


def quiet_stdout() -> None:
    """Standard output to /dev/null: after a closed pipe, Python's flush at exit would fail once more."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: no file descriptor (io.UnsupportedOperation)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


console = _Console(stderr=True)
# Tables are wider than 80 columns; keep them readable when piped into CI logs.
stdout = _Console(width=None if Console().is_terminal else 130)


def setup_logging(verbosity: int) -> None:
    """verbosity: -1 quiet, 0 default (warnings), 1 info (-v), 2 debug and library chatter (-vv)."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True,
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    logging.getLogger("asdm_export").setLevel(level)
    if verbosity < 2:
        _quiet_libraries()


# ONNX Runtime has no getter for its default log severity: we restore the value we set last, or its own default 2
# (warning); one a caller set through onnxruntime itself cannot be read, so it comes back as 2.
_ort_severity = 2
_held = 0  # depth of nested quiet_libraries()


def _quiet_libraries() -> None:
    """The CLI's setting, for the whole process: library chatter off unless -vv."""
    global _ort_severity
    # diffusers / transformers read these at import, so setting them here costs no import time.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # ... but a library imported before this call (a test driving the CLI in-process) has read them already
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with contextlib.suppress(ImportError):
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        _ort_severity = 3
    with contextlib.suppress(ImportError):
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR


@contextlib.contextmanager
def quiet_libraries():
    """Errors only from polygraphy and ONNX Runtime for the calls inside; polygraphy's setting back after, and
    ONNX Runtime's default severity back to its default (warning) or the CLI's (it has no getter: a severity
    set through onnxruntime itself is not restored).

    For the Python API, where the CLI's process-wide setting does not apply: the passes we run through them
    (export's constant folding, check's Comparator, TensorRT builds) would otherwise print their progress
    (polygraphy prints to stdout, where a caller may be writing its own output) and optimizer notes that
    concern us, not the user: about 250 lines for one export and check of the tiny model. Everything comes
    through when asdm_export's logger is at DEBUG (the CLI's -vv).
    """
    global _held
    if logging.getLogger("asdm_export").isEnabledFor(logging.DEBUG):
        yield
        return
    from polygraphy.logger import G_LOGGER

    ort = None
    with contextlib.suppress(ImportError):
        import onnxruntime as ort
    # a caller who asked polygraphy for less than errors keeps that
    with G_LOGGER.verbosity(max(G_LOGGER.ERROR, G_LOGGER.module_severity.get(""))):
        if ort is not None:
            ort.set_default_logger_severity(max(3, _ort_severity))
        _held += 1
        try:
            yield
        finally:
            _held -= 1
            if ort is not None and _held == 0:
                ort.set_default_logger_severity(_ort_severity)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
