"""Check: takes a bundle (and engine folders built from it), produces a report: each graph on each backend
against its PyTorch module, the whole pipeline against the PyTorch pipeline (check.py, e2e.py, record.py),
under the metrics and tolerances of accuracy.py, with a self-contained report.html (report_html.py)."""

from ..runtime.reference import reference_graphs, reference_sources
from .check import (METRIC_KEYS, REPLAY_SCRIPT, EngineFolder, check_bundle, ci_lines, default_report_dir,
                    open_engine_folders, replay_commands, teacher_backend, write_replay_script)

__all__ = [
    "METRIC_KEYS", "REPLAY_SCRIPT", "EngineFolder", "check_bundle", "ci_lines", "default_report_dir",
    "open_engine_folders", "reference_graphs", "reference_sources", "replay_commands", "teacher_backend",
    "write_replay_script",
]
