"""What the benchmarks measure with: a start's peak memory is the started process's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from peak_memory import peak_rss_bytes
print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and exec's ru_maxrss are Linux's")
def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    held = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident in this (the parent) process
    out = subprocess.run([sys.executable, "-c", CHILD, str(BENCHMARKS)], capture_output=True, text=True, check=True)
    own, inherited = map(int, out.stdout.split())
    assert held.sum() == held.size
    assert inherited > 400 * 2**20  # getrusage's peak survived exec: what the benchmarks reported before
    assert own < 200 * 2**20, f"a bare Python child reported a peak of {own / 2**20:.0f} MiB"
