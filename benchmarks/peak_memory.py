"""A process's peak resident memory, as the start and load benchmarks report it for their child processes."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux it is read from /proc (VmHWM, the peak of this process's
    own memory): getrusage's ru_maxrss survives exec, so a child started by a process that once held more (a
    benchmark that built the model it then starts) would report its parent's peak instead of its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere
