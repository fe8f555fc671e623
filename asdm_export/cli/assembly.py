"""Click commands of the model-assembly stage: ``plans``, ``assemble``, ``reparam`` (registered in cli/group.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import allow_pickle_option, config_option, model_option, overwrite_option


def _verbosity(ctx: click.Context) -> int:
    return (ctx.obj or {}).get("verbosity", 0)


def _num(n: int) -> str:
    """3 significant digits with an SI suffix: 859.5M params, 401.6G MACs, 187.5M MACs (tiny model)."""
    if not n:
        return "-"
    for unit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.1f}{suffix}"
    return str(n)


def _ratio(student: int | None, teacher: int) -> str:
    return f"{student / teacher:.2f}" if teacher and student is not None else "-"


latent_option = click.option("--latent", type=click.IntRange(1, 512), default=None,
                             help="Latent size for the MAC counts: image size / the VAE's factor (8 for SD, 4 for "
                                  "asdm:toyworld). Default: the model's native size.")


@click.command("plans")
@model_option
@click.option("--show", "show", metavar="PRESET", default=None,
              help="Print one preset as a plan file (YAML) to start your own from.")
@latent_option
@allow_pickle_option
@config_option
@click.pass_context
def plans(ctx, model, show, latent, allow_pickle, model_config):
    """List the pruning-plan presets with the parameters and MACs of their students for --model.

    \b
    Counts are for the plain pruned student (no ME-CondConv), batch 1, at the model's native latent
    size, computed on the meta device (no weights are loaded). MACs include attention.
    Example:
      asdm-export plans --model asdm:sd15
      asdm-export plans --show bk-small > my-plan.yaml
    """
    from rich.table import Table

    from ..assembly.assemble import plan_table
    from ..assembly.plans import load_plan
    from ..console import stdout

    if show:
        click.echo(load_plan(show).to_yaml(), nl=False)
        return
    table = plan_table(model, latent=latent, allow_pickle=allow_pickle, config=model_config)
    teacher = table["rows"][0]
    out = Table(title=f"pruning plans for {model} (batch 1, latent {table['latent']}x{table['latent']})")
    for col in ("plan", "UNet params", "x teacher", "MACs", "x teacher", "what it removes"):
        out.add_column(col, justify="left" if col in ("plan", "what it removes") else "right")
    for row in table["rows"]:
        out.add_row(row["plan"], _num(row["params"]), _ratio(row["params"], teacher["params"]),
                    _num(row["macs"]), _ratio(row["macs"], teacher["macs"]), row["description"])
    stdout.print(out)


def _comparison_table(manifest: dict, title: str):
    from rich.table import Table

    cmp = manifest["comparison"]
    table = Table(title=f"{title} (MACs at batch 1, latent {cmp['latent']}x{cmp['latent']})")
    for col in ("stage", "student", "teacher params", "student params", "teacher MACs", "student MACs", "MACs x"):
        table.add_column(col, justify="left" if col in ("stage", "student") else "right")
    for r in cmp["rows"]:
        table.add_row(r["stage"], r["student_stage"] or "removed", _num(r["teacher_params"]),
                      _num(r["student_params"]), _num(r["teacher_macs"]), _num(r["student_macs"]),
                      _ratio(r["student_macs"], r["teacher_macs"]),
                      end_section=r["stage"] == "other")
    return table


def _csv(_ctx, _param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value


@click.command("assemble")
@model_option
@click.option("--plan", "plan", required=True, metavar="PRESET|FILE",
              help="A preset (see `asdm-export plans`) or a plan file (.yaml / .yml / .json).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Student folder to write.")
@click.option("--experts", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Experts K per ME-CondConv layer (own kernel + removed layers' kernels + copies). "
                   "1 = plain pruned student, no ME-CondConv.")
@click.option("--router", type=click.Choice(["input", "timestep"]), default="input", show_default=True,
              help="input: sigmoid(Linear(GlobalAvgPool(x))); timestep: sigmoid(Linear(temb)), the UNet's time "
                   "embedding (foldable per timestep band).")
@click.option("--convs", default="conv1,conv2", show_default=True, callback=_csv,
              help="Which convolutions of retained resnets become ME-CondConv (conv1, conv2, conv_shortcut).")
@click.option("--gri", default=None, callback=_csv, metavar="STAGE,...",
              help="Replace the self-attention of these stages (e.g. down_blocks.0,up_blocks.3; globs allowed) by "
                   "GRI attention: each token attends to its window plus pooled global tokens (docs/method.md).")
@click.option("--gri-window", type=click.IntRange(1, None), default=8, show_default=True,
              help="GRI region side in tokens.")
@click.option("--gri-pool", type=click.IntRange(1, None), default=8, show_default=True,
              help="GRI global tokens per side (pool x pool cell means).")
@latent_option
@overwrite_option
@allow_pickle_option
@config_option
@click.pass_context
def assemble(ctx, model, plan, out, experts, router, convs, gri, gri_window, gri_pool, latent, overwrite,
             allow_pickle, model_config):
    """Assemble a pruned student UNet from a teacher (--model) following a pruning plan.

    Retained layers inherit the teacher's weights by position; in every stage that lost resnets, the
    chosen convolutions of the retained resnets become ME-CondConv layers whose experts are their own
    kernel and the same-role kernels of the removed resnets (CLME). The fresh student computes
    exactly what the plain pruned student computes. Writes a UNet folder (config.json, safetensors,
    asdm_student.json, manifest.json) usable as --model by every command.

    \b
    Example:
      asdm-export assemble --model asdm:tiny --plan bk-small --out students/tiny-bk-small
      asdm-export assemble --model ./sd15 --plan my-plan.yaml --experts 4 --router timestep --out students/s
    """
    from ..assembly.assemble import assemble as run
    from ..console import console, stdout

    with console.status(f"assembling {model} with plan {plan} ..."):
        gri_settings = {"stages": list(gri), "window": gri_window, "pool": gri_pool} if gri else None
        manifest = run(model, plan, out, experts=experts, router=router, convs=convs, gri=gri_settings,
                       overwrite=overwrite, allow_pickle=allow_pickle, config=model_config, latent=latent)
    if _verbosity(ctx) >= 0:
        stdout.print(_comparison_table(manifest, f"teacher {model} vs student (plan {manifest['plan']['name']})"))
    cc = manifest["condconv"]
    what = (f"{manifest['condconv_layers']} ME-CondConv layers (K={cc['experts']}, router {cc['router']}; the "
            "student counts include the experts, which `asdm-export reparam` folds away where the mix is fixed)"
            if cc else "no ME-CondConv (plain pruned)")
    if manifest.get("gri"):
        g = manifest["gri"]
        what += f"; GRI attention in {len(g['layers'])} layers (window {g['window']}, pool {g['pool']})"
    stdout.print(f"student written to {out}: {what}")


@click.command("reparam")
@click.option("--model", "-m", required=True, help="Student folder written by `asdm-export assemble`.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Folder to write.")
@click.option("--bands", default=None, metavar="T0:T1:...:TN",
              help="Fold timestep routers once per timestep band (edges, e.g. 0:500:1000): writes one student "
                   "folder per band plus bands.json. Each band folds at its middle timestep.")
@click.option("--dynamic", type=click.Choice(["aggregate", "naive"]), default="aggregate", show_default=True,
              help="Form of layers whose mix varies: aggregate = per-sample kernel + one batched convolution; "
                   "naive = K convolutions (for comparison only).")
@overwrite_option
@allow_pickle_option
@click.pass_context
def reparam(ctx, model, out, bands, dynamic, overwrite, allow_pickle):
    """Re-parameterize a student's ME-CondConv layers for deployment.

    A layer whose mix is fixed (gate or router weights zero, or a timestep router inside one band)
    folds into one plain Conv2d: exact and free at inference. Other layers compute their kernel per
    sample and run one batched convolution. The output loads with --model like any student.

    \b
    Example:
      asdm-export reparam --model students/tiny-bk-small --out students/tiny-bk-small-deploy
      asdm-export reparam --model students/ts --bands 0:250:500:750:1000 --out students/ts-bands
    """
    from ..assembly.reparam import reparam as run
    from ..console import console, stdout

    with console.status(f"re-parameterizing {model} ..."):
        manifest = run(model, out, bands=bands, dynamic=dynamic, overwrite=overwrite, allow_pickle=allow_pickle)
    if manifest["kind"] == "student-bands":
        for b in manifest["bands"]:
            stdout.print(f"{b['model']}: timesteps [{b['timesteps'][0]}, {b['timesteps'][1]}) folded at "
                         f"t={b['t_fold']:g}: {b['folded']} layers folded, {b['dynamic']} dynamic, largest mix "
                         f"change inside the band {b['max_mix_deviation']:.3g}")
    else:
        r = manifest["reparam"]
        stdout.print(f"{r['folded']} layers folded to Conv2d, {r['dynamic']} dynamic ({r['dynamic_form']})")
    stdout.print(f"written to {out}")


COMMANDS = (plans, assemble, reparam)
