"""Errors a user can act on. Each carries one line of text and the exit code the CLI returns.

Exit codes (also in README):
  0  success
  1  accuracy failure (``check`` found a graph out of tolerance; ``lint``: a graph is not TensorRT-ready)
  2  bad usage or bad input (missing / corrupt / unsupported model, bundle or file; output exists)
  3  a required optional backend is missing (e.g. TensorRT)
  4  a model could not be fetched (offline, unknown hub id)
  5  a stage failed: inside a library (e.g. the ONNX exporter), training that diverged, a server that stopped;
     the message names the stage
  70 an internal error (a bug; ``-v`` shows the traceback)
  71 out of memory (the machine's, or a GPU's)
  74 an output could not be written: the disk (or the user's quota) is full
  75 a server is busy (its queue is full, or the request waited past its queue timeout): try again later
  129 hung up (SIGHUP: the terminal or SSH session closed; not under nohup); nothing was written
  130 interrupted (Ctrl-C); nothing was written
  141 the output's reader went away (a closed pipe: ``| head``); what the command wrote to files stands
  143 terminated (SIGTERM, as sent by timeout, job schedulers, container runtimes); nothing was written
"""

from __future__ import annotations

import errno
import re
import signal

EXIT_OK = 0
EXIT_ACCURACY = 1
EXIT_INPUT = 2
EXIT_MISSING_BACKEND = 3
EXIT_FETCH = 4
EXIT_STAGE = 5
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: a bug in asdm-export; the message asks for a report
EXIT_OUT_OF_MEMORY = 71  # sysexits' EX_OSERR ("cannot fork" and the like): an allocation the system refused
EXIT_DISK_FULL = 74  # sysexits' EX_IOERR: no space for an output; the same command may succeed with space freed
EXIT_BUSY = 75  # sysexits' EX_TEMPFAIL: a temporary failure, the caller is invited to retry
EXIT_HANGUP = 129  # 128 + SIGHUP
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed the pipe
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM killed


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so the cleanup that Ctrl-C runs (temporary folders) runs
    too; its exit code is the shell's for the signal (128 + its number)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum

    @property
    def hangup(self) -> bool:
        return self.signum == getattr(signal, "SIGHUP", None)  # POSIX only

    @property
    def exit_code(self) -> int:
        return EXIT_HANGUP if self.hangup else EXIT_TERMINATED

    @property
    def what(self) -> str:
        return "hung up (SIGHUP: the terminal closed)" if self.hangup else "terminated (SIGTERM)"


class AsdmError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = EXIT_INPUT


class InputError(AsdmError):
    """Missing, corrupt or unsupported input (model, bundle, file, option value)."""

    exit_code = EXIT_INPUT


class OutputExistsError(AsdmError, FileExistsError):
    exit_code = EXIT_INPUT


class MissingBackendError(AsdmError):
    exit_code = EXIT_MISSING_BACKEND


class FetchError(AsdmError):
    exit_code = EXIT_FETCH


class StageError(AsdmError):
    exit_code = EXIT_STAGE


class OutOfMemory(AsdmError):
    """An allocation failed (RAM or GPU memory): the input is not at fault; a freer machine or less at once helps."""

    exit_code = EXIT_OUT_OF_MEMORY


class DiskFull(AsdmError):
    """A write found no space (or no quota) left: the input is not at fault; space freed, it may succeed."""

    exit_code = EXIT_DISK_FULL


class Busy(AsdmError):
    """A server refused a request it has no room for now; the same request may succeed later."""

    exit_code = EXIT_BUSY


class Cancelled(AsdmError):
    """Work stopped because the one who asked for it has gone (a server's client that disconnected)."""

    exit_code = EXIT_INTERRUPTED


MEMORY_ADVICE = "free memory (other programs), or ask for less at once (smaller shapes or batches)"


# what the libraries say when an allocation fails: torch's CPU allocator and CUDA caching allocator, safetensors'
# mmap, ONNX Runtime's arena, C++'s std::bad_alloc
_NO_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|failed to allocate memory|"
                        r"bad_alloc|can't start new thread", re.I)


def _chain(err: BaseException | None):
    """``err`` and what it was raised from, outermost first; an error of ours (``AsdmError``) is not among them
    (its text quotes the user's paths and prompts), what it was raised from is. An OSError says by its errno,
    not its text (which quotes a path)."""
    for _ in range(8):
        if err is None:
            return
        yield err, not isinstance(err, (AsdmError, OSError))  # (error, whether its text may be read)
        err = err.__cause__ or err.__context__


def out_of_memory(err: BaseException | None) -> BaseException | None:
    """The error of ``err``'s chain that says memory ran out, or None."""
    for link, readable in _chain(err):
        if isinstance(link, (MemoryError, OutOfMemory)) or type(link).__name__ == "OutOfMemoryError" \
                or (isinstance(link, OSError) and link.errno == errno.ENOMEM) \
                or (readable and _NO_MEMORY.search(str(link))):
            return link
    return None


_NO_SPACE = ("No space left on device", "Disk quota exceeded")  # strerror of ENOSPC, EDQUOT


def disk_full(err: BaseException) -> str | None:
    """The line for an output that did not fit on its disk (ENOSPC, EDQUOT), also where a library said so in its
    own exception (safetensors) or a stage's error came from one; None otherwise. Every stage writes into a
    temporary folder that goes with the error, so the line can say what to do: free space or write elsewhere."""
    for link, readable in _chain(err):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            written = link.filename2 or link.filename  # a copy's error names its source first (shutil, sendfile)
            what = f"{link.strerror}" + (f" writing '{written}'" if written else "")
        elif (copy := _copy_without_space(link)) is not None:
            what = copy
        elif readable and any(s in str(link) for s in _NO_SPACE):
            what = first_line(link, 200, with_type=True)
        else:
            continue
        return f"the disk is full ({what}): free space, or write the output elsewhere"
    return None


def _copy_without_space(err: BaseException) -> str | None:
    """"<strerror> writing '<destination>'" for shutil.copytree's error (a list of (source, destination, error)
    per file that failed) where a file did not fit; None otherwise."""
    import shutil

    entries = err.args[0] if isinstance(err, shutil.Error) and err.args else None
    for entry in entries if isinstance(entries, list) else ():
        said = next((s for s in _NO_SPACE if s in str(entry[2])), None) if len(entry) == 3 else None
        if said is not None:
            return f"{said} writing '{entry[1]}'"
    return None


def first_line(err: BaseException | str, limit: int = 300, with_type: bool = False) -> str:
    """The first non-blank line of ``err``'s message (library errors run to pages: a traceback of their own, a
    graph dump), cut to ``limit`` characters; the exception's type where the message is blank. ``with_type``:
    "TypeName: line"."""
    line = next((s.strip() for s in str(err).splitlines() if s.strip()), "")[:limit]
    name = "" if isinstance(err, str) else type(err).__name__
    if not line:
        return name
    return f"{name}: {line}" if with_type else line


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; InputError for bytes a shell passed that are not UTF-8 (Python keeps them as
    surrogates, which the tokenizer and the wire format cannot take)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"prompt {text!r} is not UTF-8 text; pass it as UTF-8") from None
