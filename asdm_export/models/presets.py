"""Embedded models: Stable-Diffusion-shaped pipelines made in code, so nothing needs a download.

A preset is a set of diffusers / transformers configs plus a seed. ``write_preset`` builds the modules
with that seed and writes a normal diffusers pipeline folder with ``save_pretrained``; everything else
reads it back through the same loader as a real checkpoint. The same preset and seed give byte-identical
weight files.

Presets are named ``asdm:<name>`` wherever a model is expected (``--model asdm:tiny``).

Shipped models are the other kind of ``asdm:`` name: pipelines trained by the project's own recipe and
installed with the package (``asdm:toyworld``, see ``asdm_export/toyworld``); they are read in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import CHOOSE_ANOTHER, atomic_output_dir, sha256_file
from ..errors import DiskFull, InputError, disk_full
from .tokenizer import write_tokenizer

PREFIX = "asdm:"

# SD1.x topology: three cross-attention down stages then a plain one, a cross-attention mid block,
# mirrored up stages, two layers per block.
SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# The scheduler config of runwayml/stable-diffusion-v1-5, with DDIM (deterministic) as the sampler.
SD1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    unet: dict
    text_encoder: dict
    vae: dict
    scheduler: dict = field(default_factory=lambda: dict(SD1_SCHEDULER))
    seed: int = 0

    def fingerprint(self) -> str:
        """Short hash of everything that decides the weights (configs, seed, library versions)."""
        import diffusers
        import torch
        import transformers

        blob = json.dumps(
            [self.unet, self.text_encoder, self.vae, self.scheduler, self.seed,
             torch.__version__, diffusers.__version__, transformers.__version__],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="tiny SD1.x-shaped pipeline (random weights), for tests (seconds per export)",
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=SD1_DOWN,
            up_block_types=SD1_UP,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
        ),
        text_encoder=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
        ),
        vae=dict(
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=128,
        ),
    ),
    "sd15": Preset(
        name="sd15",
        description="the exact SD1.5 UNet / CLIP ViT-L / VAE configs with random weights, for benchmarks",
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=SD1_DOWN,
            up_block_types=SD1_UP,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        text_encoder=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        ),
    ),
}


SHIPPED_ROOT = Path(__file__).resolve().parent.parent / "toyworld" / "assets"
# name -> description of the shipped (trained) models; their judge is SHIPPED_ROOT / "judge"
SHIPPED: dict[str, str] = {
    "toyworld": "SD1.x-shaped pipeline trained on the toy world of coloured shapes (fp16, 64x64 images); "
                "the demo's default",
    "toyworld-bk-small": "bk-small student of asdm:toyworld, distilled by `asdm-export distill` (fp16 UNet; "
                         "text encoder and VAE are the teacher's)",
}
# the default --model: trained, so its images follow their prompts (docs/toyworld.md)
DEFAULT_MODEL = PREFIX + "toyworld"
SHIPPED_FOLDERS = {"toyworld": "pipeline", "toyworld-bk-small": "student-bk-small"}
# A shipped student holds only its UNet (unet/) and its training record: the other parts are its teacher's,
# joined into one pipeline folder in the cache on first use rather than stored twice in the package.
SHIPPED_TEACHERS = {"toyworld-bk-small": "toyworld"}
STUDENT_ONLY = ("unet", "distill.json", "distill.log", "manifest.json")


def shipped_path(name: str) -> Path:
    """Folder of a shipped model (a shipped student's joined pipeline); a clear error when the install lacks it."""
    folder = SHIPPED_ROOT / SHIPPED_FOLDERS[name]
    marker = folder / ("unet/config.json" if name in SHIPPED_TEACHERS else "model_index.json")
    if not marker.is_file():
        raise InputError(f"the shipped model '{PREFIX}{name}' is missing from this install ({folder}); reinstall "
                         "asdm-export, or train it (docs/toyworld.md)")
    if name in SHIPPED_TEACHERS:
        return _joined_student(name, folder, shipped_path(SHIPPED_TEACHERS[name]))
    return folder


def _joined_student(name: str, student: Path, teacher: Path) -> Path:
    """The teacher's pipeline parts plus the student's files, written once into the cache (keyed by content)."""
    key = sha256_file(student / "unet" / "diffusion_pytorch_model.safetensors")[:16]
    out = cache_root() / "models" / f"{name}-{key}"

    def join(out: Path) -> None:
        with atomic_output_dir(out) as tmp:
            for item in teacher.iterdir():
                if item.name not in STUDENT_ONLY and item.name not in ("recipe.json", "train.log"):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            for item in student.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

    if not (out / "model_index.json").is_file():
        _write_into_cache(PREFIX + name, out, join)
    return out


def is_preset_id(source: str) -> bool:
    return str(source).startswith(PREFIX)


def is_shipped(source: str) -> bool:
    """An ``asdm:`` name of a shipped (trained, installed) model rather than a made-in-code preset."""
    return is_preset_id(source) and str(source)[len(PREFIX):] in SHIPPED


def get_preset(source: str) -> Preset:
    name = str(source)[len(PREFIX):] if is_preset_id(source) else str(source)
    if name not in PRESETS:
        raise InputError(f"unknown embedded model '{source}'; choose one of: "
                         + ", ".join(PREFIX + n for n in [*SHIPPED, *PRESETS]))
    return PRESETS[name]


def build_pipeline(preset: Preset, tokenizer_dir: Path):
    """Build the preset's StableDiffusionPipeline in memory (weights from ``preset.seed``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **preset.text_encoder,
    )
    # One seed per component, so changing one component's config leaves the others' weights alone.
    torch.manual_seed(preset.seed)
    unet = UNet2DConditionModel(**preset.unet)
    torch.manual_seed(preset.seed + 1)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(preset.seed + 2)
    vae_cfg = dict(preset.vae)
    n = len(vae_cfg["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **vae_cfg
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**preset.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_model(source: str, out: Path | str, overwrite: bool = False) -> Path:
    """Write the embedded model ``source`` (``asdm:<name>``) as a diffusers pipeline folder at ``out``: a shipped
    one copied, a preset made (atomically)."""
    name = str(source).removeprefix(PREFIX)
    if name not in SHIPPED:
        return write_preset(get_preset(source), Path(out), overwrite=overwrite)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        shutil.copytree(shipped_path(name), tmp, dirs_exist_ok=True)
    return Path(out)


def write_preset(preset: Preset, out: Path, overwrite: bool = False) -> Path:
    """Write the preset as a diffusers pipeline folder at ``out`` (atomically)."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        tok_dir = tmp / "tokenizer"
        write_tokenizer(tok_dir, max_length=preset.text_encoder["max_position_embeddings"])
        pipe = build_pipeline(preset, tok_dir)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "asdm_preset.json").write_text(
            json.dumps({"preset": preset.name, "seed": preset.seed, "fingerprint": preset.fingerprint()}, indent=2)
        )
    return out


def cache_root() -> Path:
    return Path(os.environ.get("ASDM_EXPORT_CACHE", Path.home() / ".cache" / "asdm-export"))


def materialize(source: str) -> Path:
    """Return the folder of an embedded model: a shipped one in place, a made-in-code one written into the
    cache on first use."""
    if is_shipped(source):
        return shipped_path(str(source)[len(PREFIX):])
    preset = get_preset(source)
    folder = cache_root() / "models" / f"{preset.name}-{preset.fingerprint()}"
    if not (folder / "model_index.json").is_file():
        _write_into_cache(source, folder, lambda out: write_preset(preset, out))
    return folder


def _write_into_cache(source: str, out: Path, write) -> None:
    """``write(out)``, an atomic write of the embedded model ``source`` into the cache, unless another process
    wrote it first. An unwritable cache is no output path of the user's to choose another of: its line names
    the setting that moves the cache."""
    try:
        write(out)
    except FileExistsError:
        pass  # another process wrote it first; its rename was atomic
    except InputError as err:
        line, moved = str(err), f"set ASDM_EXPORT_CACHE to a writable folder for the embedded model {source}"
        raise InputError(line.replace(CHOOSE_ANOTHER, moved) if CHOOSE_ANOTHER in line else f"{line}; {moved}") \
            from None
    except Exception as err:
        if not disk_full(err):
            raise
        raise DiskFull(f"no space left for the embedded model {source} in the cache '{cache_root()}': free space "
                       "there, or set ASDM_EXPORT_CACHE to a folder on another disk") from err
