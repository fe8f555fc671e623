"""Linux processes as /proc shows them (nothing elsewhere): a process group's members, a process's command line,
and whether and how a process ended, a zombie's wait status included. The server watches its backend stubs
with these."""

from __future__ import annotations

import signal
from pathlib import Path


def stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after "pid (comm)": state, ppid, pgrp, ..., the wait status last; None where the
    process is gone (or this is not Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (Linux /proc; none where it cannot be read)."""
    members = []
    for proc in Path("/proc").glob("[0-9]*"):
        fields = stat(proc.name)
        if fields and len(fields) > 2 and fields[2] == str(pgid):
            members.append(int(proc.name))
    return members


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def ended(pid: int) -> tuple[bool, int | None]:
    """Whether process ``pid`` has ended, and its wait status where the kernel still keeps it (a zombie that
    its parent has not reaped: Triton does not reap a stub that died; /proc/PID/stat's last field)."""
    fields = stat(pid)
    if fields is None:
        return True, None
    if fields[0] not in ("Z", "X"):
        return False, None
    return True, int(fields[-1]) if len(fields) >= 50 else None


def death(status: int | None) -> str:
    """How a process ended, from its wait status."""
    if status is None:
        return "ended"
    if status & 0x7F:
        sig = status & 0x7F
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = ", e.g. from the kernel's out-of-memory killer" if sig == signal.SIGKILL else ""
        return f"was killed by signal {sig} ({name}{why})"
    return f"exited with code {status >> 8}"
