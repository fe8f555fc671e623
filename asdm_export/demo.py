"""The main job end to end on the embedded default model (the CLI's ``demo``): model -> export -> check
(report.json and a self-contained report.html with the end-to-end images and plots)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .artifacts import check_output
from .check.check import check_bundle
from .errors import InputError, OutputExistsError
from .export.export import export_bundle
from .models.loading import resolve_model
from .models.presets import DEFAULT_MODEL


def run_demo(model: str = DEFAULT_MODEL, out: Path | str = "asdm-demo", precision: str = "fp32",
             overwrite: bool = False, on_stage=lambda name: None, allow_pickle: bool = False,
             config: str | None = None) -> dict:
    """Export ``model`` into ``out/bundle`` and check it into ``out/check``; return what happened.

    ``on_stage(name)`` is called as each stage starts (the CLI shows it as progress). ``allow_pickle``,
    ``config``: as ``export_bundle`` takes them, for a model that needs them (a .ckpt, a single file).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; the demo writes a folder (bundle/ and check/ in it)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder '{out}' already exists; pass --overwrite to replace its bundle/ "
                                "and check/")
    bundle, report_dir = out / "bundle", out / "check"
    made_out = not out.exists()
    for path in (bundle, report_dir):
        check_output(path, overwrite, reads=(model,))
    timings = {}
    # a previous demo's bundle and report go aside until the new pair is written, and come back if it is not:
    # the folder never holds a new bundle beside an old report
    previous = [p for p in (bundle, report_dir) if p.exists()]
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out)) if previous else None
    for path in previous:
        path.replace(aside / path.name)

    def stage(name, fn):
        on_stage(name)
        t0 = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - t0
        return result

    try:
        source = stage("model", lambda: resolve_model(model, allow_pickle, config))
        manifest = stage("export", lambda: export_bundle(source, bundle, precision=precision))
        report = stage("check", lambda: check_bundle(bundle, out=report_dir, allow_pickle=allow_pickle,
                                                     config=config))
    except BaseException:  # a failed or interrupted demo leaves what was there, as every stage does
        shutil.rmtree(bundle, ignore_errors=True)
        for path in previous:
            (aside / path.name).replace(path)
        if aside is not None:
            aside.rmdir()
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return {"bundle": str(bundle), "report_dir": str(report_dir), "report_html": str(report_dir / "report.html"),
            "manifest": manifest, "report": report,
            "seconds": timings}
