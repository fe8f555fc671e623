"""The ``asdm-export`` command line: a thin Click shell over the stage functions of the Python API."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from pathlib import Path

import click

from .. import __version__, signals
from ..errors import (EXIT_ACCURACY, EXIT_BROKEN_PIPE, EXIT_DISK_FULL, EXIT_HANGUP, EXIT_INTERNAL, EXIT_INTERRUPTED,
                      EXIT_MISSING_BACKEND, EXIT_OUT_OF_MEMORY, MEMORY_ADVICE, AsdmError, Terminated, disk_full,
                      first_line, out_of_memory)
from .options import (GUIDANCE, SEED, Finite, allow_pickle_option, config_option, model_option, overwrite_option,
                      runtime_options, runtime_threads_option, scheduler_option)


class AsdmGroup(click.Group):
    """Turns our errors into one line on stderr and a distinct exit code (see ``errors``)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's own usage errors as one line too (standalone Click prints usage, a hint and the error on
        four); the exit code stays Click's (2 for usage)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as err:  # a bare group (Click 8.2+): its help
            err.show()
            sys.exit(err.exit_code)
        except click.ClickException as err:
            ctx = getattr(err, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.secho(f"error: {err.format_message()}{hint}", fg="red", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.secho("aborted", fg="yellow", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def make_context(self, info_name, args, parent=None, **extra):
        """The group's own --help and --version into a closed pipe: Click's main makes that exit 1, which is our
        accuracy failure (a command's output is the subject of ``invoke``)."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError:
            from ..console import quiet_stdout

            quiet_stdout()
            sys.exit(EXIT_BROKEN_PIPE)

    def invoke(self, ctx):
        previous, stopping = _stop_on_signals()
        try:
            return super().invoke(ctx)
        except AsdmError as err:  # its own line; a full disk's or memory's exit code also where it came from one
            _say(f"error: {err}", "red")
            ctx.exit(EXIT_DISK_FULL if disk_full(err) else EXIT_OUT_OF_MEMORY if out_of_memory(err) else
                     err.exit_code)
        except Terminated as err:
            _say(f"{err.what}: stopped, and nothing was written", "yellow")
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            _say("interrupted: stopped, and nothing was written", "yellow")
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:  # a bug: say so in one line unless the user asked for details
            lost = _output_lost(err, stopping)
            if lost is not None:
                from ..console import quiet_stdout

                quiet_stdout()
                ctx.exit(lost)
            if (ctx.obj or {}).get("verbosity", 0) >= 1:
                raise
            missing = _missing_dependency(err)
            if missing is not None:
                _say(f"error: {missing}", "red")
                ctx.exit(EXIT_MISSING_BACKEND)
            full = disk_full(err)
            if full is not None:
                _say(f"error: {full}", "red")
                ctx.exit(EXIT_DISK_FULL)
            memory = out_of_memory(err)
            if memory is not None:  # torch's allocators, numpy's MemoryError: the machine, not a bug
                _say(f"error: out of memory ({first_line(memory, 200, with_type=True)}): {MEMORY_ADVICE}", "red")
                ctx.exit(EXIT_OUT_OF_MEMORY)
            _say(f"internal error: {first_line(err, with_type=True)} "
                 "(rerun with -v for the traceback, and please report it)", "red")
            ctx.exit(EXIT_INTERNAL)
        finally:
            if not stopping:  # after a signal the process is on its way out: later ones stay ignored
                signals.give_back(previous)


def _say(line: str, colour: str) -> None:
    """The command's last line on stderr, where stderr still takes it (a closed pipe or a hung-up terminal
    raised again from here, and Click made that exit 1, an accuracy failure)."""
    with contextlib.suppress(OSError):
        click.secho(line, fg=colour, err=True)


def _output_lost(err: Exception, stopping: list[int]) -> int | None:
    """The exit code where ``err`` is not a bug but the end of the output: a write after a signal (rich's EIO on
    the terminal that hung up, as the command unwound) is the signal's; a closed pipe (``| head``) is 141, and
    EIO on a terminal that went away without a signal is a hang-up's."""
    if stopping:
        return EXIT_INTERRUPTED if stopping[0] == signal.SIGINT else Terminated(stopping[0]).exit_code
    if isinstance(err, BrokenPipeError) and _reader_gone():
        return EXIT_BROKEN_PIPE
    if isinstance(err, OSError) and err.errno == errno.EIO:
        return EXIT_HANGUP
    return None


def _reader_gone() -> bool:
    """Whether the reader of our stdout or stderr closed its end (the writer's end of such a pipe polls as an
    error, of a socket whose peer closed, as a hang-up: systemd's journal takes stdout on one): a BrokenPipeError
    of any other pipe or socket is a bug's, not the end of the output."""
    import select

    if not hasattr(select, "poll"):  # not on Windows: take every closed pipe as ours, as before
        return True
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                return True
        except (AttributeError, OSError, ValueError):  # no file descriptor (a test's capture, a closed stream)
            continue
    return False


def _missing_dependency(err: Exception) -> str | None:
    """The line for a core dependency that is not installed (a broken or partial install, not a bug of ours);
    None for a module of asdm_export itself, which is a bug. Modules of the extras (TensorRT, Triton) are checked
    where they are imported, with the extra to install."""
    top = (err.name or "").split(".")[0] if isinstance(err, ModuleNotFoundError) else ""
    if not top or top == __package__.split(".")[0]:
        return None
    return (f"the Python package '{top}' is not installed, and this command needs it: reinstall asdm-export with "
            "its dependencies (pip install -e . in a checkout)")


def _stop_on_signals() -> tuple[dict, list]:
    """SIGTERM and SIGHUP raise ``Terminated`` (a KeyboardInterrupt) so that every writer cleans up as on Ctrl-C
    (a closed terminal left temporary folders behind), and all stop the command once: later signals are ignored
    while it unwinds and exits (a second Ctrl-C printed a traceback from wherever it landed, and could cut a
    temporary folder's removal short). Which signals: ``signals``' rule (one ignored stays ignored). Returns the
    previous handlers (none where handlers cannot be set: not the main thread) and a list that holds the signal
    once one came."""
    stopping: list[int] = []

    def handler(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stopping.append(signum)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    previous: dict = {}  # a signal that comes while take() installs the handler finds it empty
    previous.update(signals.take(handler))
    return previous, stopping


class RangeType(click.ParamType):
    """``MIN:OPT:MAX`` (or one number for a static size)."""

    name = "MIN:OPT:MAX"

    def __init__(self, maximum: int):
        self.maximum = maximum  # a bound that keeps profiles, shapes and memory plans finite

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = [int(v) for v in str(value).split(":")]
        except ValueError:
            self.fail(f"'{value}' is not MIN:OPT:MAX (three integers) or one integer", param, ctx)
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2] <= self.maximum):
            self.fail(f"'{value}' must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX <= {self.maximum}", param, ctx)
        return tuple(parts)


BATCH_RANGE = RangeType(1024)
LATENT_RANGE = RangeType(512)  # latents of 4096x4096 images


@click.group(cls=AsdmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asdm-export")
@click.option("-v", "--verbose", count=True, help="More output: -v shows each step, -vv library logs too.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and final results.")
@click.pass_context
def main(ctx, verbose, quiet):
    """Compile an accelerated Stable Diffusion (A-SDM) into deployable ONNX / TensorRT engines.

    Stages read one artifact folder and write another, each with a manifest.json:

    \b
      assemble teacher -> student (pruned, ME-CondConv experts)  [plans: the presets]
      reparam  student -> deployable student (experts folded / aggregated)
      export   model(s) -> bundle (ONNX graphs, inheritance schedule)   [points]
      check    bundle -> report (every graph vs. its PyTorch module)
      run      bundle or engines -> images
      serve    bundle or engines -> a Triton server (client: one image from it)
      demo     the embedded default model through export and check

    Exit codes: 0 ok, 1 accuracy failure (lint: not TensorRT-ready), 2 bad usage or input, 3 missing backend,
    4 model download failed, 5 a stage failed inside a library, 70 an internal error (a bug: please report it),
    71 out of memory, 74 the disk is full, 75 the server is busy (client: try again later), 129 hung up,
    130 interrupted, 141 the output's reader went away (a closed pipe), 143 terminated.
    """
    from ..console import setup_logging

    verbosity = -1 if quiet else verbose
    ctx.obj = {"verbosity": verbosity}
    setup_logging(verbosity)


@main.command()
@model_option
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Graph precision. fp16 keeps normalisations, softmax and the timestep projection in fp32; "
                   "inputs and outputs stay fp32.")
@click.option("--opset", type=click.IntRange(17, None), default=17, show_default=True, help="ONNX opset.")
@click.option("--batch", type=BATCH_RANGE, default="1:2:4", show_default=True,
              help="Batch range of the dynamic axis (a classifier-free-guidance step uses 2 per image).")
@click.option("--latent", type=LATENT_RANGE, default=None,
              help="Latent height/width range: image size / the VAE's factor (8 for SD, 4 for asdm:toyworld). "
                   "Default: half to twice the model's native size.")
@click.option("--level", type=click.Choice(["none", "block", "layer", "unit"]), default="none", show_default=True,
              help="Feature inheritance: export a full graph (emits cached features) and an inherit graph "
                   "(reads them, skips the rest) per UNet.")
@click.option("--branch", type=int, default=None,
              help="Block level: DeepCache's cache_branch_id (0 = shallowest; see `asdm-export points`).")
@click.option("--points", default=None,
              help="Layer / unit level: comma-separated module names or globs, e.g. 'down_blocks.1.attentions.0' "
                   "or '*.attn2' (see `asdm-export points`).")
@click.option("--reuse", type=click.Choice(["output", "residual"]), default="output", show_default=True,
              help="Reuse a point's output, or its residual (output - input) added to the fresh input.")
@click.option("--schedule", "schedule_text", default=None,
              help="Full steps: uniform:N, quadratic:N[:CENTER[:POW]] (default centre steps//3, power 1.4), "
                   "explicit:0,3,7 or full; step 0 always runs in full (the cache starts empty). "
                   "Default: uniform:3 with --level, else full.")
@click.option("--steps", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Denoising steps the schedule is laid out for (at most the 1000 training timesteps).")
@click.option("--unet", "extra_unets", multiple=True, metavar="NAME=MODEL",
              help="Another UNet for multi-UNet switching (e.g. student=./students/bk-small); repeatable.")
@click.option("--switch", default=None, metavar="NAME:FIRST-LAST,...",
              help="Which UNet serves which steps, e.g. unet:0-9,student:10-49 (the model's own UNet is 'unet').")
@click.option("--unet-only", is_flag=True,
              help="Export the UNet graphs only, not the text encoder and VAE decoder (such a bundle cannot `run`).")
@overwrite_option
@allow_pickle_option
@config_option
@click.pass_obj
def export(obj, model, out, precision, opset, batch, latent, level, branch, points, reuse, schedule_text, steps,
           extra_unets, switch, unet_only, overwrite, allow_pickle, model_config):
    """Export a model's UNet(s) to an ONNX bundle (manifest.json + graphs/*.onnx).

    Graphs have dynamic batch / height / width and take the timestep as an input. They are cleaned up
    with onnx-graphsurgeon, constant-folded and shape-inferred; models over 2 GB keep their weights
    in one external data file. With --level, each UNet gets a `full` and an `inherit` graph and the
    manifest holds the schedule saying which step runs which.

    \b
    Examples:
      asdm-export export --model asdm:tiny --out bundles/tiny
      asdm-export export --model ./stable-diffusion-v1-5 --precision fp16 --out bundles/sd15-fp16
      asdm-export export --level block --branch 0 --schedule uniform:3 --steps 20 --out bundles/dc
      asdm-export export --level unit --points '*.attn2' --schedule explicit:0,1,2,3,4 --steps 20 --out b/tgate
    """
    from ..console import console, stdout
    from ..export.export import export_bundle
    from ..graphs.inheritance import InheritanceSpec
    from ..graphs.schedule import Schedule, default_schedule

    unets = {}
    for item in extra_unets:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"'{item}' is not NAME=MODEL", param_hint="--unet")
        if name in unets:  # the second would silently win
            raise click.BadParameter(f"UNet '{name}' is given twice ({unets[name]}, {path})", param_hint="--unet")
        unets[name] = path
    spec = InheritanceSpec(level=level, branch=branch,
                           points=tuple(p.strip() for p in (points or "").split(",") if p.strip()), reuse=reuse)
    schedule = Schedule.parse(schedule_text or default_schedule(spec.enabled), steps, switch, ("unet", *unets))
    with console.status(f"exporting {model} ..."):
        manifest = export_bundle(model, out, precision=precision, opset=opset, batch=batch, latent=latent,
                                 overwrite=overwrite, allow_pickle=allow_pickle, config=model_config,
                                 inheritance=spec, schedule=schedule, unets=unets, unet_only=unet_only)
    if obj["verbosity"] >= 0:
        for g in manifest["graphs"]:
            stdout.print(f"{g['name']}: {g['file']} ({g['nodes']} nodes, {g['macs_at_opt'] / 1e9:.2f} GMACs at opt, "
                         f"{g['precision']}, {g['export_seconds']:.1f} s)")
        if spec.enabled:
            stdout.print(f"schedule: {manifest['schedule']['steps']} steps, full at {manifest['schedule']['full_steps']}")
    stdout.print(f"bundle written to {out}")


@main.command()
@model_option
@click.option("--level", type=click.Choice(["block", "layer", "unit"]), default="block", show_default=True)
@allow_pickle_option
@config_option
def points(model, level, allow_pickle, model_config):
    """List a UNet's inheritance points at one level (block: DeepCache branch ids)."""
    from ..console import stdout
    from ..graphs.inheritance import block_branches, candidate_points
    from ..models.loading import resolve_model

    unet = resolve_model(model, allow_pickle, model_config).load_unet()
    if level == "block":
        for branch, name in block_branches(unet).items():
            stdout.print(f"branch {branch:2d}: feature entering the up path = output of {name}")
    else:
        for name in candidate_points(unet, level):
            stdout.print(name)


@main.command()
@click.option("--bundle", "-b", type=click.Path(path_type=Path), required=True, help="Bundle folder to check.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Report folder (report.json, report.html, PNGs, saved inputs/outputs). Default: <bundle>-check.")
@click.option("--model", "-m", default=None,
              help="PyTorch reference model. Default: the bundle's source model (verified by sha256).")
@click.option("--provider", "providers", multiple=True, default=["cpu"], show_default=True,
              type=click.Choice(["cpu", "cuda", "trt", "auto"]),
              help="ONNX Runtime execution provider(s) to check; 'auto' = every one usable here.")
@click.option("--engines", "engines", multiple=True, type=click.Path(path_type=Path),
              help="Engine folder built from this bundle (`build`: TensorRT engines, ONNX Runtime graphs or "
                   "PyTorch programs) to check too; repeatable.")
@click.option("--tolerances", "tolerance_preset", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=None,
              help="Tolerance preset. Default: the bundle's precision.")
@click.option("--atol", "max_abs", type=Finite(0), default=None, help="Override: max |backend - torch|.")
@click.option("--rel-l2", type=Finite(0), default=None, help="Override: max ||backend - torch|| / ||torch||.")
@click.option("--min-cosine", type=Finite(-1, 1), default=None, help="Override: min cosine similarity.")
@click.option("--tolerance", "per_output", multiple=True, metavar="OUTPUT:METRIC=VALUE[,METRIC=VALUE]",
              help="Override one output's bound, e.g. noise_pred:rel_l2=1e-3 (metrics: max_abs, rel_l2, "
                   "min_cosine); repeatable.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs and of the images.")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt of a recorded trajectory / end-to-end image; repeatable. Default: two built-in prompts.")
@click.option("--steps", type=click.IntRange(1, None), default=None,
              help="Denoising steps of the trajectories. Default: the bundle's schedule.")
@click.option("--guidance", type=GUIDANCE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--min-image-psnr", type=Finite(), default=None,
              help="End-to-end bound: minimum PSNR (dB) of each backend's image vs PyTorch's. Default: per precision.")
@click.option("--no-e2e", is_flag=True,
              help="Per-graph check on random inputs only: no trajectories, no end-to-end comparison.")
@click.option("--ci", is_flag=True,
              help="CI mode: exactly one verdict line per graph and one for end to end on stdout; exit 0 pass, "
                   "1 accuracy failure, 2 bad input, 3 a requested backend is not usable here.")
@runtime_threads_option
@overwrite_option
@allow_pickle_option
@config_option
@click.pass_obj
def check(obj, bundle, out, model, providers, engines, tolerance_preset, max_abs, rel_l2, min_cosine, per_output,
          seed, prompts, steps, guidance, min_image_psnr, no_e2e, ci, threads, overwrite, allow_pickle, model_config):
    """Compare every graph of a bundle, and the whole pipeline, against PyTorch.

    Per graph: seeded random inputs at the min, opt, a mixed shape and the largest batch (and the shapes
    --engines folders were built for), plus inputs recorded from the PyTorch pipeline's denoising
    trajectories (prompts, several steps, cached features, final latents),
    through the PyTorch reference, ONNX Runtime (polygraphy's Comparator) and any --engines folders: max
    abs error, relative L2, cosine, PSNR, NaN/Inf per output. End to end: each backend's images and per-step
    latents against the PyTorch pipeline's (PSNR, SSIM, plot, image grid), and the quality cost of the
    bundle's accelerations.
    Writes report.json, report.html and replayable polygraphy inputs/outputs. Exit 0 if everything is
    within tolerance, 1 if not, 2 for bad input.

    \b
    Examples:
      asdm-export check --bundle bundles/tiny
      asdm-export check --bundle bundles/dc --ci --tolerance noise_pred:rel_l2=1e-3 --overwrite
      asdm-export check --bundle bundles/dc --engines engines/dc-trt --provider cuda --ci
    """
    from ..check.accuracy import parse_overrides
    from ..check.check import check_bundle
    from ..check.report_table import check_table, e2e_lines
    from ..console import console, stdout

    overrides = parse_overrides(per_output)
    with console.status(f"checking {bundle} ..."):
        report = check_bundle(bundle, out=out, model=model, providers=list(providers),
                              tolerance_preset=tolerance_preset,
                              bounds=dict(max_abs=max_abs, rel_l2=rel_l2, min_cosine=min_cosine),
                              overrides=overrides, seed=seed,
                              allow_pickle=allow_pickle, config=model_config, overwrite=overwrite, e2e=not no_e2e,
                              prompts=list(prompts) or None, steps=steps, guidance=guidance,
                              min_image_psnr=min_image_psnr, engines=list(engines), threads=threads)
    if ci:
        from ..check.check import ci_lines

        for line in ci_lines(report):
            click.echo(line)
        click.echo(f"report: {report['report_dir']}/report.html", err=True)
    else:
        if obj["verbosity"] >= 0:
            stdout.print(check_table(report))
        for line in e2e_lines(report):  # a failure here was a bare FAIL: the table has the graphs only
            stdout.print(line)
        stdout.print(f"{'PASS' if report['passed'] else 'FAIL'}: report in {report['report_dir']}/report.json "
                     f"and report.html")
    if not report["passed"]:
        sys.exit(EXIT_ACCURACY)


@main.command()
@model_option
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("asdm-demo"), show_default=True,
              help="Folder for the bundle and the check report.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@overwrite_option
@allow_pickle_option
@config_option
@click.pass_obj
def demo(obj, model, out, precision, overwrite, allow_pickle, model_config):
    """Run the main job on the embedded default model: export, check, and a summary table."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..check.report_table import check_table, e2e_lines
    from ..console import console, stdout
    from ..demo import run_demo

    stages = {"model": "preparing the model", "export": "exporting to ONNX", "check": "checking accuracy"}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=obj["verbosity"] < 0 or not console.is_terminal) as progress:  # no stray frame in logs
        task = progress.add_task("starting", total=len(stages))

        def on_stage(name):
            progress.update(task, description=stages[name], completed=list(stages).index(name))

        result = run_demo(model=model, out=out, precision=precision, overwrite=overwrite, on_stage=on_stage,
                          allow_pickle=allow_pickle, config=model_config)
        progress.update(task, description="done", completed=len(stages))
    report = result["report"]
    stdout.print(check_table(report, title=f"asdm-export demo: {model} ({precision})"))
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    for line in e2e_lines(report):
        stdout.print(line)
    stdout.print(f"{'PASS' if report['passed'] else 'FAIL'} | {secs} | bundle: {result['bundle']} | "
                 f"report: {result['report_html']} (and report.json)")
    if not report["passed"]:
        sys.exit(EXIT_ACCURACY)


@main.command()
@click.option("--engines", "-e", "folder", type=click.Path(path_type=Path), required=True,
              help="An engine folder (`build`) or a bundle (`export`; runs its ONNX graphs on ONNX Runtime).")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="Prompt; repeat for several images.")
@click.option("--negative-prompt", default="", help="Negative prompt (the unconditional half of guidance).")
@click.option("--steps", type=click.IntRange(1, None), default=None, help="Denoising steps. Default: the schedule's.")
@scheduler_option
@click.option("--guidance", type=GUIDANCE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the first image (next: seed+1, ...).")
@click.option("--height", type=int, default=None,
              help="Image height in pixels. Default: the model's native size, or the graphs' opt size when "
                   "they do not take it.")
@click.option("--width", type=int, default=None,
              help="Image width in pixels. Default: the model's native size, or the graphs' opt size when "
                   "they do not take it.")
@runtime_options
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="PNG path; with several prompts, NAME-0.png, NAME-1.png, ...")
@click.pass_obj
def run(obj, folder, prompts, negative_prompt, steps, scheduler, guidance, seed, height, width, backend, provider,
        device, dtype, threads, out):
    """Generate images: text encoder, denoising loop (following the bundle's inheritance schedule and
    UNet switching, with classifier-free guidance) and VAE decoder, all on the exported graphs.

    \b
    Example:
      asdm-export run --engines bundles/dc --prompt "a red circle" --prompt "a blue square" --out img.png
      asdm-export run --engines bundles/dc --scheduler dpm++2m --steps 20 --prompt "a red circle" --out img.png
    """
    from rich.table import Table

    from ..console import console, stdout
    from ..runtime.pipeline import SETUP_ROW, AsdmPipeline, Timings, check_png_output, save_png
    from ..runtime.schedulers import scheduler_name

    check_png_output(out)  # before minutes of generation
    pipe = AsdmPipeline.from_bundle(folder, backend=backend, provider=provider, device=device, dtype=dtype,
                                    threads=threads, scheduler=scheduler)
    timings = Timings()
    with console.status(f"generating {len(prompts)} image(s) on {pipe.backend.name} ..."):
        images = pipe(list(prompts), negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance,
                      seed=seed, height=height, width=width, timings=timings)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
                                            for i in range(len(images))]
    for image, path in zip(images, paths):
        save_png(image, path)
    if obj["verbosity"] >= 0:
        steps = steps or pipe.schedule.steps
        calls = len(timings.plan)  # PNDM calls the UNet steps + 1 times, Heun about twice per step
        counted = f"{steps} steps" + (f" ({calls} UNet calls)" if calls != steps else "")
        table = Table(title=f"{timings.images} image(s), {counted} of {scheduler_name(pipe.scheduler)} on "
                            f"{pipe.backend.name}")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("per image", justify="right")
        for stage, secs in timings.rows():
            once = stage == SETUP_ROW  # not a cost per image: the next images do not pay it
            table.add_row(stage, f"{secs:.3f}", "" if once else f"{secs / timings.images:.3f}")
        stdout.print(table)
        inherit = sum(1 for _, r in timings.plan if r == "inherit")
        stdout.print(f"schedule: {calls - inherit} full + {inherit} inherit UNet calls; "
                     f"loop overhead {timings.loop_overhead:.1%} of the loop")
    for path in paths:
        stdout.print(f"wrote {path}")


@main.command("models")
def models_cmd():
    """List the embedded models (usable as --model asdm:<name>)."""
    from ..console import stdout
    from ..models.presets import PREFIX, PRESETS, SHIPPED

    rows = [*SHIPPED.items(), *((n, p.description) for n, p in PRESETS.items())]
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        stdout.print(f"{PREFIX}{name:{width}} {description}")


@main.command("make-model")
@click.argument("preset")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder to write the diffusers pipeline into.")
@overwrite_option
def make_model(preset, out, overwrite):
    """Write an embedded model (e.g. asdm:tiny) as a diffusers pipeline folder."""
    from ..console import stdout
    from ..models.presets import write_model

    write_model(preset, out, overwrite=overwrite)
    stdout.print(f"wrote {preset} to {out}")


# Stage commands that live in their own modules (they import the shared options from options.py).
from .assembly import assemble, plans, reparam  # noqa: E402
from .distill import distill  # noqa: E402
from .engines import build, lint  # noqa: E402
from .int8 import calibrate, quantize  # noqa: E402
from .serve import client, serve, triton_repo  # noqa: E402
from .toyworld import quality, toyworld  # noqa: E402

for _command in (plans, assemble, reparam, distill, lint, build, calibrate, quantize, quality, toyworld, serve,
                 triton_repo, client):
    main.add_command(_command)

if __name__ == "__main__":
    main()
