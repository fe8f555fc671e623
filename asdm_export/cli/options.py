"""The options several command families share (each command file imports them from here)."""

from __future__ import annotations

import click

model_option = click.option(
    "--model", "-m", default="asdm:toyworld", show_default=True,
    help="Model: an embedded model (asdm:toyworld, asdm:tiny, asdm:sd15), a diffusers pipeline or UNet folder, "
         "a single-file .safetensors checkpoint, or a Hugging Face Hub id.",
)
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
    "--backend", type=click.Choice(["ort", "trt", "torch"]), default="ort", show_default=True,
    help="ort: ONNX Runtime; trt: TensorRT engines; torch: the PyTorch reference modules.")
runtime_provider_option = click.option(
    "--provider", type=click.Choice(["cpu", "cuda", "trt"]), default="cpu", show_default=True,
    help="ONNX Runtime execution provider (for --backend ort).")
