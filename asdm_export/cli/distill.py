"""Click command of the tuning stage: ``distill`` (registered in cli/group.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..models.presets import DEFAULT_MODEL
from .options import SEED, Finite, overwrite_option


@click.command("distill")
@click.option("--teacher", "-t", default=DEFAULT_MODEL, show_default=True,
              help="The teacher pipeline the student was assembled from (embedded model or diffusers folder).")
@click.option("--student", "-s", required=True, help="Student from `asdm-export assemble` (a UNet folder).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Student pipeline folder to write (checkpoints go to OUT.checkpoint while training).")
@click.option("--losses", default="task,kd,feat", show_default=True, metavar="TERM[=W],...",
              help="Loss terms and weights: task (denoising), kd (output KD), feat (stage-output KD), sas "
                   "(cross-attention maps follow the teacher's). Default: BK-SDM's three terms.")
@click.option("--steps", type=int, default=3000, show_default=True, help="End-to-end training steps.")
@click.option("--incubate-steps", type=int, default=0, show_default=True,
              help="Progressive incubation first: steps per changed level (down stage + mirror up stage) trained "
                   "inside the teacher, innermost first. 0: off.")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--lr", type=Finite(0, min_open=True), default=2e-4, show_default=True,
              help="Peak learning rate (AdamW, cosine).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--data", default="toyworld", show_default=True, metavar="toyworld|FOLDER",
              help="Training images: the toy world's generator, or a folder with metadata.jsonl "
                   '({"file_name": ..., "text": ...} per line).')
@click.option("--images", type=int, default=20000, show_default=True, help="Toy-world images to train on.")
@click.option("--checkpoint-every", type=int, default=200, show_default=True)
@click.option("--save-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the written student's weights.")
@click.option("--resume", is_flag=True, help="Continue the run saved in OUT.checkpoint (same settings).")
@overwrite_option
def distill(teacher, student, out, losses, steps, incubate_steps, batch, lr, seed, data, images, checkpoint_every,
            save_precision, resume, overwrite):
    """Train an assembled student by distillation from its teacher.

    \b
    The result is a pipeline folder (the teacher's text encoder, VAE and tokenizer, the trained student
    in unet/) that quality, export, reparam and check take as --model. Ctrl-C saves a checkpoint;
    --resume continues it to the weights an uninterrupted run gives (same seed and thread count).
    Example:
      asdm-export assemble --model asdm:toyworld --plan bk-small --experts 1 --out s/bk-small
      asdm-export distill --student s/bk-small --losses task,kd,feat,sas --out s/bk-small-kd
      asdm-export quality --model s/bk-small-kd
    """
    from tqdm import tqdm

    from ..console import stdout
    from ..distill import DistillRecipe, distill as run, parse_losses

    recipe = DistillRecipe(losses=parse_losses(losses), steps=steps, incubate_steps=incubate_steps, batch=batch,
                           lr=lr, seed=seed, checkpoint_every=checkpoint_every)
    # tqdm.write: lines above the progress bar (data preparation, the losses every 50 steps), so that a log of
    # the run, or its output piped, shows what it is doing
    manifest = run(teacher, student, out, recipe=recipe, data=data, images=images, resume=resume,
                   overwrite=overwrite, save_dtype=save_precision, progress=True, echo=tqdm.write)
    final = ", ".join(f"{k} {v:.4f}" for k, v in manifest.get("final", {}).items() if k not in ("step", "phase"))
    stdout.print(f"distilled student written to {out} ({manifest['steps']} steps, "
                 f"{manifest['seconds']['train'] / 60:.1f} min; last losses: {final})")
