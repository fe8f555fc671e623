"""``distill``: teacher pipeline + assembled student -> a trained student pipeline folder.

The output is a diffusers pipeline folder: the teacher's text encoder, VAE, tokenizer and scheduler, and in
``unet/`` the student folder (``asdm_student.json`` kept, its ``distill`` entry added) holding the EMA weights.
So ``quality --model OUT``, ``export --model OUT``, ``reparam OUT`` and ``check`` take it as they take any model.
Beside it ``distill.json`` (recipe, data, phases, losses per logged step, timings, versions) and ``distill.log``.

While training, ``OUT.checkpoint/`` holds the same layout plus the training state, replaced atomically every
``checkpoint_every`` steps and on Ctrl-C / SIGTERM; ``--resume`` continues it to the same weights an
uninterrupted run gives. On success the checkpoint becomes ``OUT`` (its training state removed).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import signals
from ..artifacts import (check_output, link_or_copy, readable_tree, replace_dir, sha256_file, shape_error,
                         temp_dir, write_manifest)
from ..errors import EXIT_INTERRUPTED, AsdmError, InputError, Terminated, first_line
from ..models.condconv import MECondConv
from ..models.loading import ModelSource, resolve_model
from ..models.presets import cache_root
from ..toyworld.recipe import versions
from ..models.student import STUDENT_FILE, is_student_folder, read_spec, save_student, unet_config
from . import data as data_mod
from .losses import check_prediction_type
from .recipe import DistillRecipe
from .train import Trainer

log = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
RECORD = "distill.json"
LOG = "distill.log"


class Interrupted(AsdmError):
    """Training stopped by Ctrl-C or SIGTERM after its checkpoint was saved."""

    exit_code = EXIT_INTERRUPTED


def checkpoint_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoint"


# ---- inputs ---------------------------------------------------------------------------------------------------

def _student_spec(student: ModelSource) -> dict:
    folder = student.unet_folder
    if folder is None or not is_student_folder(folder):
        raise InputError(f"--student '{student.spec}' is not an assembled student (no {STUDENT_FILE}); make one with "
                         "`asdm-export assemble --model TEACHER --plan PLAN --out S`")
    spec = read_spec(folder)
    if any(entry.get("module") != "MECondConv" for entry in spec.get("layers", {}).values()) or spec.get("reparam"):
        raise InputError(f"--student '{student.spec}' is re-parameterized for deployment; distill the student that "
                         "`assemble` wrote, then run `reparam` on the result")
    return spec


def check_pair(teacher: ModelSource, student: ModelSource, spec: dict):
    """The student must have been assembled from this teacher: same source hash, and its plan must resolve on
    the teacher's config to the student's own config. Returns the layout (stage mapping)."""
    from ..assembly.assemble import teacher_config
    from ..assembly.plans import parse_plan, resolve_plan

    recorded = (spec.get("teacher") or {}).get("sha256")
    if recorded != teacher.sha256:
        raise InputError(f"--student '{student.spec}' was not assembled from teacher '{teacher.spec}' (it records "
                         f"teacher '{(spec.get('teacher') or {}).get('model', '?')}', sha256 {str(recorded)[:12]}); "
                         "pass the teacher it was assembled from")
    layout = resolve_plan(parse_plan(spec["plan"], f"{student.spec}: plan"), teacher_config(teacher))
    own = json.loads((student.unet_folder / "config.json").read_text())
    if unet_config(layout.config) != {k: v for k, v in unet_config(own).items() if k in layout.config}:
        raise InputError(f"--student '{student.spec}': its config is not what its plan gives on this teacher; "
                         "re-assemble it")
    return layout


# ---- output folders -------------------------------------------------------------------------------------------

def pipeline_parts(folder: Path) -> list[str]:
    """A diffusers pipeline folder's parts other than its UNet: every component its ``model_index.json`` names
    that the folder holds (text encoder, VAE, tokenizer, scheduler, and e.g. SD's feature extractor and safety
    checker, which the index names and diffusers then loads), and the index itself."""
    index = json.loads((folder / "model_index.json").read_text())
    return [k for k in index if not k.startswith("_") and k != "unet" and (folder / k).is_dir()] + ["model_index.json"]


def _copy_parts(src: Path, dst: Path, names, link: bool = False) -> None:
    """``names`` from ``src`` into ``dst``. ``link``: hard links where the file system allows (folders of our own
    whose files are never changed in place: a checkpoint re-saves a GB of teacher parts every few hundred steps)."""
    copy = link_or_copy if link else shutil.copy2
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, copy_function=copy)
        else:
            copy(src / name, dst / name)


def _write_pipeline_parts(teacher: ModelSource, pipe, folder: Path) -> None:
    """The teacher's non-UNet parts, copied file for file from a pipeline folder (dtypes kept)."""
    if teacher.kind in ("pipeline", "preset"):
        _copy_parts(teacher.path, folder, pipeline_parts(teacher.path))
    else:  # a single-file checkpoint: write the parts diffusers loaded
        pipe.save_pretrained(str(folder), safe_serialization=True)
        shutil.rmtree(folder / "unet", ignore_errors=True)


def _save_unet(unet, folder: Path, spec: dict, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        unet = copy.deepcopy(unet).to(dtype)
    save_student(unet, folder / "unet", spec)


def _replace_dir(new: Path, target: Path) -> None:
    """``new`` becomes ``target`` (``artifacts.replace_dir``: a stop between its two renames leaves the old one
    aside, where ``_recover_dir`` finds it)."""
    readable_tree(new)
    replace_dir(new, target)


def _recover_dir(target: Path) -> None:
    """Undo what a stop inside ``_replace_dir`` left: a missing ``target`` comes back from the newest folder
    moved aside; folders left aside beside an existing ``target`` are removed."""
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and aside and (aside[-1] / "x").is_dir():
        (aside[-1] / "x").replace(target)
        log.warning("restored the checkpoint '%s' that an interrupted save had moved aside", target)
    for folder in aside:
        shutil.rmtree(folder, ignore_errors=True)


class Checkpointer:
    """Writes ``OUT.checkpoint`` (pipeline parts once, then EMA student + training state) atomically."""

    def __init__(self, out: Path, teacher: ModelSource, pipe, spec: dict, meta: dict):
        self.out, self.dir = out, checkpoint_dir(out)
        self.teacher, self.pipe, self.spec, self.meta = teacher, pipe, spec, meta

    def save(self, trainer: Trainer, record: dict) -> None:
        from safetensors.torch import save_file

        tmp = temp_dir(self.dir.parent, self.dir.name)
        try:
            if (self.dir / "model_index.json").is_file():
                _copy_parts(self.dir, tmp, pipeline_parts(self.dir), link=True)
            else:
                _write_pipeline_parts(self.teacher, self.pipe, tmp)
            spec = {**self.spec, "distill": {"recipe": trainer.recipe.to_json(), "step": trainer.step,
                                             "steps": trainer.total}}
            save_student(trainer.ema, tmp / "unet", spec)
            save_file(trainer.state_tensors(), str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps({**self.meta, **trainer.state_json(),
                                                      "state_sha256": sha256_file(tmp / STATE_TENSORS)},
                                                     indent=1) + "\n")
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            if (self.dir / LOG).is_file():
                shutil.copy2(self.dir / LOG, tmp / LOG)
            _replace_dir(tmp, self.dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint(folder: Path, meta: dict) -> tuple[dict, dict]:
    """The saved training state, after checking it was made by this run's teacher, student, data and recipe."""
    from safetensors.torch import load_file

    try:
        saved = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as err:
        raise InputError(f"checkpoint '{folder}' is incomplete or corrupt ({first_line(err)}); start over with "
                         "--overwrite") from err
    wrong = shape_error(saved, {"step": int, "history": list, "running?": list, "state_sha256?": str})
    if wrong or saved["step"] < 0:
        raise InputError(f"checkpoint '{folder}' is damaged ({wrong or 'step is negative'}); start over with "
                         "--overwrite")
    # bytes changed in place load as other numbers (NaN weights that training then carries into the result)
    if "state_sha256" in saved and saved["state_sha256"] != sha256_file(folder / STATE_TENSORS):
        raise InputError(f"checkpoint '{folder}' is damaged ({STATE_TENSORS} changed since it was saved); start "
                         "over with --overwrite")
    for key in ("teacher", "student", "data", "recipe"):
        if saved.get(key) != meta[key]:
            raise InputError(f"checkpoint '{folder}' was made with another {key}; resume with the same settings, "
                             "or start over with --overwrite")
    return saved, tensors


# ---- the stage ------------------------------------------------------------------------------------------------

def distill(teacher: str | ModelSource, student: str | ModelSource, out: Path | str, *,
            recipe: DistillRecipe = DistillRecipe(), data: str = data_mod.TOYWORLD, images: int = 20000,
            resume: bool = False, overwrite: bool = False, save_dtype: str = "fp32", progress: bool = True,
            stop_at: int | None = None, echo=None) -> dict:
    """Train ``student`` (assembled from ``teacher``) by distillation; write the student pipeline ``out``.

    ``stop_at`` ends the run after that many steps with the checkpoint saved (as Ctrl-C would): tests and
    staged runs use it. Returns the manifest of ``out`` (or, when stopped early, the checkpoint's record)."""
    out = Path(out)
    run = _open_run(teacher, student, out, recipe, data, images, resume, overwrite, save_dtype)
    teacher, student, spec, source, ckpt, saved = run.teacher, run.student, run.spec, run.source, run.ckpt, run.saved
    t_load = time.perf_counter()
    say = echo or (lambda line: None)
    pipe, unet, trainer = _prepare(run, recipe, say)
    prepare_seconds = time.perf_counter() - t_load

    record_base = {"teacher": teacher.describe(), "student": student.describe(), "data": source,
                   "recipe": recipe.to_json(), "phases": [{"name": p.name, "steps": p.steps, "losses": p.losses}
                                                         for p in trainer.phases],
                   "condconv_layers": sum(isinstance(m, MECondConv) for m in unet.modules()),
                   "versions": versions()}
    checkpointer = Checkpointer(out, teacher, pipe, spec, run.meta)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    log_file = _LogFile(ckpt / LOG)
    started = time.perf_counter()
    first = trainer.step
    stream = _ProgressStream(sys.stderr)
    bar = _bar(trainer, progress, stream)
    shown = {"lost": False}

    def record():
        return {**record_base, "step": trainer.step, "steps": trainer.total, "history": trainer.history,
                "seconds": {"prepare": round(prepare_seconds, 1),
                            "train": round(time.perf_counter() - started + (saved or {}).get("seconds", 0.0), 1)}}

    def on_step(tr: Trainer, values: dict) -> None:
        line = None
        if tr.step % 50 == 0 or tr.step == tr.total:
            phase, _ = tr.phase_at(tr.step - 1)
            entry = {"step": tr.step, "phase": phase.name, **{k: round(v, 6) for k, v in tr.running().items()}}
            tr.history.append(entry)
            line = f"step {tr.step}/{tr.total} [{phase.name}] " + " ".join(
                f"{k} {v:.4f}" for k, v in entry.items() if k not in ("step", "phase"))
            log_file.write(line)
        if tr.step % recipe.checkpoint_every == 0 or tr.step == tr.total:
            checkpoint()
        show(tr, line)

    def show(tr: Trainer, line: str | None) -> None:
        """Progress, after the step's bookkeeping, and best effort: a terminal that went away (EIO) or a closed
        pipe ends the showing, not the training. A signal that came with it (SIGHUP) then stops training at this
        step with its checkpoint, as it would have with its terminal; without one (a disowned job) training goes
        on, and the distill.log in the checkpoint keeps its record."""
        if shown["lost"]:
            return
        error = None
        try:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in tr.running().items()}, refresh=False)
            if line is not None:
                say(line)
        except OSError as err:
            error = err
        error = error or stream.error
        if error is not None:
            shown["lost"] = True
            bar.disable = True  # tqdm's close and refreshes write nothing more
            log_file.write(f"progress no longer shown at step {tr.step} ({first_line(error)})")

    def checkpoint():
        run.meta["seconds"] = round(time.perf_counter() - started + (saved or {}).get("seconds", 0.0), 1)
        checkpointer.save(trainer, record())

    log_file.write(f"{'resumed at step ' + str(first) if first else 'started'}: {trainer.total} steps, phases "
                   + ", ".join(f"{p.name} ({p.steps})" for p in trainer.phases))
    stopper = _StepBoundary()

    def on_step_then_stop(tr: Trainer, values: dict) -> None:
        on_step(tr, values)
        stopper.raise_if_asked()

    try:
        with stopper:
            trainer.run(on_step_then_stop, stop_at=stop_at)
    except KeyboardInterrupt as err:
        bar.close()
        # a second signal can land inside a step: its state is neither step N nor N + 1, so the last save stands
        if not trainer.in_step and trainer.step > first and trainer.step % recipe.checkpoint_every:
            checkpoint()
        log_file.write(f"stopped at step {trainer.step}")
        what = err.what if isinstance(err, Terminated) else "interrupted"
        exc = Interrupted(f"{what} at step {trainer.step}/{trainer.total}; the checkpoint '{ckpt}' holds step "
                          f"{_saved_step(ckpt)}: continue it with --resume")
        exc.exit_code = err.exit_code if isinstance(err, Terminated) else EXIT_INTERRUPTED
        raise exc from None
    except BaseException:
        bar.close()  # an error's line starts a line of its own, not the bar's
        raise
    bar.close()
    if trainer.step < trainer.total:  # stop_at
        if trainer.step % recipe.checkpoint_every:
            checkpoint()
        return record()
    return _finish(out, ckpt, trainer, spec, record(), save_dtype, overwrite)


@dataclass
class _Run:
    """A run as its checks left it, before anything heavy loads (``_open_run``)."""
    teacher: ModelSource
    student: ModelSource
    spec: dict  # the student's asdm_student.json
    layout: object  # the teacher -> student stage mapping (check_pair)
    source: dict  # the training data (data.describe_source)
    ckpt: Path
    meta: dict  # what a checkpoint must match to be resumed
    saved: dict | None  # the checkpoint's state, when resuming
    tensors: dict | None


def _open_run(teacher, student, out: Path, recipe: DistillRecipe, data: str, images: int, resume: bool,
              overwrite: bool, save_dtype: str) -> _Run:
    """Every check that needs no model loaded, and the checkpoint folder put in order: left from an interrupted
    save, resumed, refused or removed."""
    if save_dtype not in ("fp32", "fp16"):
        raise InputError(f"--save-precision must be fp32 or fp16, got '{save_dtype}'")
    # distill reads safetensors only: a pickled teacher's parts would be copied into every checkpoint and the output
    teacher = teacher if isinstance(teacher, ModelSource) else resolve_model(teacher, allow_pickle=None)
    student = student if isinstance(student, ModelSource) else resolve_model(student, allow_pickle=None)
    if not teacher.has_pipeline:
        raise InputError(f"--teacher '{teacher.spec}' is a UNet only; distillation needs the teacher's whole "
                         "pipeline (text encoder and VAE encode the training data)")
    spec = _student_spec(student)
    layout = check_pair(teacher, student, spec)
    source = data_mod.describe_source(data, images)
    ckpt = checkpoint_dir(out)
    _recover_dir(ckpt)
    if ckpt.is_dir() and not (ckpt / STATE_JSON).is_file():
        shutil.rmtree(ckpt)  # stopped before its first checkpoint: only a log, nothing to resume
    check_output(out, overwrite, reads=(teacher.path, student.path, data))
    if not resume:
        if ckpt.exists() and not overwrite:
            raise InputError(f"'{ckpt}' holds an earlier run's checkpoint; pass --resume to continue it or "
                             "--overwrite to start over")
    elif not (ckpt / STATE_JSON).is_file():
        raise InputError(f"nothing to resume: '{ckpt}' holds no checkpoint; run without --resume")
    meta = {"teacher": teacher.describe()["sha256"], "student": student.sha256, "data": source,
            "recipe": recipe.to_json()}
    saved, tensors = read_checkpoint(ckpt, meta) if resume else (None, None)
    if overwrite and not resume and ckpt.exists():
        shutil.rmtree(ckpt)
    return _Run(teacher, student, spec, layout, source, ckpt, meta, saved, tensors)


def _prepare(run: _Run, recipe: DistillRecipe, say):
    """The teacher pipeline, the student UNet and a ``Trainer`` on the encoded data (at the saved state when
    resuming)."""
    pipe = run.teacher.load_pipeline()
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if "task" in recipe.losses:
        check_prediction_type(prediction_type)  # before the data is encoded
    unet = run.student.load_unet()
    latent_data = data_mod.cached_latents(pipe.vae, run.source, int(pipe.vae.config.sample_size), run.meta["teacher"],
                                          cache_root(), say=say)
    with torch.no_grad():
        ids = pipe.tokenizer(latent_data.prompts + [""], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        embeddings = pipe.text_encoder(ids).last_hidden_state
    torch.manual_seed(recipe.seed)
    trainer = Trainer(recipe, pipe.unet, unet, run.layout, latent_data, embeddings,
                      pipe.scheduler.alphas_cumprod.float(), prediction_type)
    if run.saved is not None:
        trainer.load_state(run.tensors, run.saved)
    return pipe, unet, trainer


def _finish(out: Path, ckpt: Path, trainer: Trainer, spec: dict, record: dict, save_dtype: str,
            overwrite: bool) -> dict:
    """The checkpoint, its training state removed and the student saved in ``save_dtype``, becomes ``out``."""
    check_output(out, overwrite)
    tmp = temp_dir(out.parent, out.name)
    try:
        parts = pipeline_parts(ckpt)
        _copy_parts(ckpt, tmp, parts, link=True)
        _copy_parts(ckpt, tmp, [p.name for p in ckpt.iterdir() if p.name not in (*parts, STATE_TENSORS, STATE_JSON,
                                                                                   "unet")])  # the log and record
        dtype = torch.float16 if save_dtype == "fp16" else torch.float32
        _save_unet(trainer.ema, tmp, {**spec, "distill": {"recipe": trainer.recipe.to_json(), "steps": trainer.total,
                                                          "record": RECORD}}, dtype)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        manifest = write_manifest(tmp, {"kind": "student-pipeline", "teacher": record["teacher"],
                                        "student": record["student"], "plan": spec.get("plan"),
                                        "condconv": spec.get("condconv"), "data": record["data"],
                                        "recipe": record["recipe"], "steps": trainer.total,
                                        "final": trainer.history[-1] if trainer.history else {},
                                        "seconds": record["seconds"], "save_precision": save_dtype})
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("wrote distilled student %s", out)
    return manifest


def _saved_step(ckpt: Path) -> int:
    try:
        return json.loads((ckpt / STATE_JSON).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


class _StepBoundary:
    """Ctrl-C / SIGTERM / SIGHUP stop training after the step under way, so the saved state is a whole step's (a
    second signal stops at once). Outside the main thread (no handlers can be set) a signal stops where it
    lands. Which signals: ``signals``' rule (SIGINT in a script's background job, SIGHUP under nohup stay
    ignored)."""

    def __init__(self):
        self.asked: int | None = None  # the signal
        self._previous = {}

    def _handler(self, signum, frame):
        if self.asked is not None:
            self._raise()
        self.asked = signum

    def _raise(self):
        raise KeyboardInterrupt() if self.asked == signal.SIGINT else Terminated(self.asked)

    def __enter__(self):
        self._previous = signals.take(self._handler)
        return self

    def __exit__(self, *exc):
        signals.give_back(self._previous)

    def raise_if_asked(self) -> None:
        if self.asked is not None:
            self._raise()


class _LogFile:
    """``distill.log``, appended in the checkpoint folder (each checkpoint replacement carries it over)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {line}\n")


class _ProgressStream:
    """Where the progress bar writes (stderr), taking its write errors so that tqdm never sees one: tqdm up to
    4.67 keeps its write lock when a refresh raises (a closed pipe's EPIPE), and its monitor thread then waits
    for that lock at exit, so a run that had finished never ended. ``show`` reads ``error``."""

    def __init__(self, stream):
        self.stream, self.error = stream, None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self.stream.write(text)
            except (OSError, ValueError) as err:  # ValueError: the stream was closed
                self.error = err
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except (OSError, ValueError) as err:
                self.error = err

    def __eq__(self, other) -> bool:  # tqdm.write clears the bars whose stream is sys.stderr: this one's is
        return other is self or other is self.stream

    __hash__ = object.__hash__

    def __getattr__(self, name):  # fileno, isatty, encoding: the stream's (tqdm sizes the bar by them)
        if name.startswith("__") or name == "stream":  # copy / pickle ask before __init__ ran: not a recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


def _bar(trainer: Trainer, progress: bool, stream: _ProgressStream, **options):
    """The progress bar on ``stream``; ``options``: more of tqdm's (tests refresh it at every step)."""
    from tqdm.auto import tqdm

    return tqdm(total=trainer.total, initial=trainer.step, desc="distill", unit="step",
                disable=not progress or stream.stream is None,  # no stderr at all (pythonw)
                dynamic_ncols=True, file=stream, **options)
