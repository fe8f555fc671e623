"""Resolve ``--model`` to a model source and load its components with diffusers.

Accepted sources:
  * ``asdm:<preset>``: an embedded model, written once to the cache and then read like any folder;
  * a diffusers pipeline folder (``model_index.json``) or a UNet folder (``config.json``);
  * a single-file checkpoint (``.safetensors``; ``.ckpt`` / ``.bin`` only with ``allow_pickle``),
    loaded through diffusers' single-file loaders (``config`` names the diffusers config to use);
  * a Hugging Face Hub id, downloaded with ``huggingface_hub`` when online.

Pickled weights are refused unless the user asks for them: unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..artifacts import hash_folder, sha256_file
from ..errors import FetchError, InputError
from . import presets

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SUPPORTED_UNET = "UNet2DConditionModel"
STUDENT_FILE = "asdm_student.json"  # marks a student folder written by `asdm-export assemble` / `reparam`


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    safe = [p for p in files if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json")]
    return safe, pickled


@dataclass
class ModelSource:
    """Where a model comes from and how to load its parts."""

    spec: str
    kind: str  # "preset" | "pipeline" | "unet" | "single-file"
    path: Path
    allow_pickle: bool = False
    config: str | None = None  # diffusers config for single-file checkpoints

    # ---- identity -------------------------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path) if self.path.is_file() else hash_folder(self.path)

    def describe(self) -> dict:
        return {"model": self.spec, "kind": self.kind, "path": str(self.path.resolve()), "sha256": self.sha256,
                **({"config": self.config} if self.config else {})}

    @staticmethod
    def reopen_spec(recorded: dict) -> str:
        """What to resolve to re-open a recorded model: presets and hub ids by name, local models by
        their absolute path (so a relative --model still works from another directory)."""
        if recorded["kind"] == "preset" or not Path(recorded["path"]).exists():
            return recorded["model"]
        return recorded["path"]

    @property
    def has_pipeline(self) -> bool:
        return self.kind in ("preset", "pipeline")

    # ---- loading --------------------------------------------------------------------------------
    def load_unet(self):
        """The UNet in float32 on the CPU, in eval mode."""
        from diffusers import UNet2DConditionModel

        try:
            if self.kind == "single-file":
                unet = self._single_file_unet()
            else:
                folder = self.path / "unet" if self.has_pipeline else self.path
                self._check_weights(folder)
                if (folder / STUDENT_FILE).is_file():  # assembled by asdm-export: may hold ME-CondConv layers
                    from .student import load_student

                    unet = load_student(folder)
                else:
                    unet = UNet2DConditionModel.from_pretrained(
                        str(folder), use_safetensors=None if self.allow_pickle else True
                    )
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise InputError(f"could not load the UNet from '{self.spec}': {_first_line(err)}") from err
        check_unet_supported(unet)
        return unet.float().eval()

    def load_pipeline(self):
        """The whole StableDiffusionPipeline (text encoder, VAE, tokenizer, scheduler, UNet)."""
        import torch
        from diffusers import StableDiffusionPipeline

        # float32 whatever the files hold (the toy world ships fp16): export decides precision later, and
        # fp16 matmuls are not supported on every CPU
        fp32 = {"torch_dtype": torch.float32}
        with _quiet_loading_bar():
            try:
                if self.kind == "single-file":
                    pipe = StableDiffusionPipeline.from_single_file(
                        str(self.path), config=self.config, safety_checker=None, requires_safety_checker=False, **fp32
                    )
                elif self.has_pipeline:
                    for part in ("unet", "text_encoder", "vae"):
                        self._check_weights(self.path / part)
                    # A student UNet (asdm_student.json) is loaded by us; diffusers would drop its experts.
                    student = {"unet": self.load_unet()} if (self.path / "unet" / STUDENT_FILE).is_file() else {}
                    pipe = StableDiffusionPipeline.from_pretrained(
                        str(self.path), use_safetensors=None if self.allow_pickle else True,
                        safety_checker=None, requires_safety_checker=False, **student, **fp32,
                    )
                else:
                    raise InputError(
                        f"'{self.spec}' is a UNet only; this step needs a whole pipeline "
                        "(a folder with model_index.json, a hub id, or a full single-file checkpoint)"
                    )
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise InputError(f"could not load the pipeline from '{self.spec}': {_first_line(err)}") from err
        check_unet_supported(pipe.unet)
        return pipe

    def _check_weights(self, folder: Path) -> None:
        if not folder.is_dir():
            raise InputError(f"'{self.spec}' has no '{folder.name}' folder")
        safe, pickled = _weight_files(folder)
        if safe:
            return
        if pickled and not self.allow_pickle:
            raise InputError(
                f"'{folder}' holds only pickled weights ({pickled[0].name}); loading them can run code: "
                "convert them to safetensors, or pass --allow-pickle if you trust the file"
            )
        if not pickled:
            raise InputError(f"'{folder}' has no weight files (.safetensors)")

    def _single_file_unet(self):
        from diffusers import UNet2DConditionModel

        if _is_full_ldm_checkpoint(self.path):
            # Original (LDM) layout: diffusers converts the keys; the config comes from --config or the hub.
            return UNet2DConditionModel.from_single_file(str(self.path), config=self.config,
                                                         subfolder="unet" if self.config else None)
        if not self.config:
            raise InputError(
                f"'{self.path.name}' is a UNet in diffusers layout; pass --config with the diffusers "
                "folder or hub id whose unet/config.json describes it"
            )
        return UNet2DConditionModel.from_single_file(str(self.path), config=self.config, subfolder="unet")


@contextlib.contextmanager
def _quiet_loading_bar():
    """diffusers draws a "Loading pipeline components" bar on stderr for every load; show it only with -v,
    and give the previous setting back (the Python API must not change the caller's diffusers state).
    Here rather than with the CLI's other library switches: diffusers has no environment variable for it,
    and importing it at start-up would cost every command seconds."""
    from diffusers.utils import logging as diffusers_logging

    was_on = diffusers_logging.is_progress_bar_enabled()
    if not logging.getLogger("asdm_export").isEnabledFor(logging.INFO):
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            diffusers_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _is_full_ldm_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return True  # pickled checkpoints of SD are LDM-layout in practice
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("model.diffusion_model.") for k in f.keys())


def check_unet_supported(unet) -> None:
    name = type(unet).__name__
    if name != SUPPORTED_UNET and not name.startswith("Asdm"):
        raise InputError(f"unsupported UNet class {name}; asdm-export handles {SUPPORTED_UNET} (SD1.x / SD2.x)")
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) or getattr(cfg, "class_embed_type", None):
        raise InputError(
            "UNets with extra conditioning (addition_embed_type / class_embed_type, e.g. SDXL) are not supported; "
            "use an SD1.x / SD2.x model"
        )


def resolve_model(spec: str | Path, allow_pickle: bool = False, config: str | None = None) -> ModelSource:
    """Turn what the user typed after ``--model`` into a ``ModelSource`` (validated, not loaded)."""
    spec = str(spec)
    if presets.is_preset_id(spec):
        return ModelSource(spec, "preset", presets.materialize(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return ModelSource(spec, "pipeline", path, allow_pickle)
        if (path / "config.json").is_file():
            return ModelSource(spec, "unet", path, allow_pickle)
        raise InputError(
            f"'{spec}' is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)"
        )
    if path.is_file():
        if path.suffix == ".safetensors":
            _check_safetensors_header(path)
            return ModelSource(spec, "single-file", path, allow_pickle, config)
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise InputError(
                    f"'{path.name}' is a pickled checkpoint; loading it can run code: convert it to "
                    "safetensors, or pass --allow-pickle if you trust the file"
                )
            return ModelSource(spec, "single-file", path, allow_pickle, config)
        raise InputError(f"'{spec}' is not a model: expected a folder, .safetensors file or hub id")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "pipeline", _download(spec, allow_pickle), allow_pickle)
    raise InputError(f"model '{spec}' not found: no such file or folder (and not an asdm: preset or hub id)")


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error type for every kind of corruption
        raise InputError(f"'{path}' is not a readable safetensors file: {_first_line(err)}") from err


def _download(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"] + (["*.bin", "*.ckpt"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found)
        raise FetchError(
            f"could not fetch '{repo_id}' from the Hugging Face Hub ({type(err).__name__}); "
            "check the id and the network, or pass a local folder"
        ) from err


def load_pipeline_part(source: ModelSource, part: str):
    """One pipeline component (``text_encoder`` or ``vae``) in float32, eval mode."""
    if not source.has_pipeline and source.kind != "single-file":
        raise InputError(f"'{source.spec}' has no {part}; pass a whole pipeline")
    try:
        if source.kind == "single-file":
            module = getattr(source.load_pipeline(), part)
        else:
            source._check_weights(source.path / part)
            if part == "text_encoder":
                from transformers import CLIPTextModel

                module = CLIPTextModel.from_pretrained(str(source.path / part),
                                                       use_safetensors=None if source.allow_pickle else True)
            else:
                from diffusers import AutoencoderKL

                module = AutoencoderKL.from_pretrained(str(source.path / part),
                                                       use_safetensors=None if source.allow_pickle else True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"could not load the {part} from '{source.spec}': {_first_line(err)}") from err
    return module.float().eval()
