"""The options several command families share (each command file imports them from here)."""

from __future__ import annotations

import click

from ..limits import GUIDANCE_MAX, SEED_MAX, THREADS_MAX
from ..models.presets import DEFAULT_MODEL
from ..runtime.schedulers import SCHEDULERS

SEED = click.IntRange(0, SEED_MAX)


class Finite(click.FloatRange):
    """A float in range that is a number: ``FloatRange`` lets nan through (every comparison with it is false)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def _describe_range(self) -> str:  # click's own reads "x<=None" where neither bound is set
        return super()._describe_range() if self.min is not None or self.max is not None else "finite"


GUIDANCE = Finite(0, GUIDANCE_MAX)  # a scale; 1 or less turns guidance off

model_option = click.option(
    "--model", "-m", default=DEFAULT_MODEL, show_default=True,
    help="Model: an embedded model (asdm:toyworld, asdm:tiny, asdm:sd15, ...: `asdm-export models`), a diffusers "
         "pipeline or UNet folder, "
         "a single-file .safetensors checkpoint, or a Hugging Face Hub id.",
)
scheduler_option = click.option(
    "--scheduler", type=click.Choice(list(SCHEDULERS)), default=None, metavar="NAME",
    help=f"The sampler, in place of the model's own scheduler: {', '.join(SCHEDULERS)} (diffusers' classes, built "
         "from the model's scheduler config: its noise table and prediction type stay). Default: the model's own.")
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Allow pickled weights (.bin/.ckpt). Unpickling runs code from the file: only for files you trust.",
)
config_option = click.option(
    "--config", "model_config", metavar="FOLDER_OR_ID",
    help="For single-file checkpoints: the diffusers folder or hub id whose configs describe it.",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
# the runtime's backend, for commands that generate images from a bundle or engine folder
runtime_backend_option = click.option(
    "--backend", type=click.Choice(["ort", "trt", "torch"]), default=None,
    help="ort: ONNX Runtime; trt: TensorRT engines; torch: the PyTorch runtime (each graph's module exported and "
         "pruned to what the graph computes; CUDA graphs on GPUs). Default: an engine folder's own backend, "
         "ort for a bundle.")
runtime_provider_option = click.option(
    "--provider", type=click.Choice(["cpu", "cuda", "trt"]), default=None,
    help="For --backend ort: the execution provider (default: an engine folder's own, cpu for a bundle).")
runtime_device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default=None,
    help="For --backend torch: where the programs run (default: an engine folder's device, cpu for a bundle).")
runtime_dtype_option = click.option(
    "--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
    help="For --backend torch: the programs' precision (default fp16 on cuda, fp32 on cpu; the VAE keeps the "
         "bundle's).")


runtime_threads_option = click.option(
    "--threads", type=click.IntRange(0, THREADS_MAX), default=0,
    help="CPU threads: ONNX Runtime's intra-op threads and PyTorch's (0: an ORT engine folder's setting, else "
         "the libraries' default, one per core). On a CPU shared with other work, fewer threads than cores keep "
         "PyTorch's OpenMP threads from waiting for each other.")


def runtime_options(command):
    """--backend, --provider, --device, --dtype, --threads: how a command runs a bundle or an engine folder."""
    for option in (runtime_threads_option, runtime_dtype_option, runtime_device_option, runtime_provider_option,
                   runtime_backend_option):
        command = option(command)
    return command
