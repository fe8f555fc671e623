"""Training data for ``distill``: captioned images, encoded once into the teacher VAE's latent space.

Two sources:
  * ``toyworld`` (default): the toy world's generator, world seed 0, the images the shipped teacher was
    trained on (docs/toyworld.md);
  * a folder of images with captions in diffusers' / Hugging Face ``imagefolder`` convention: a
    ``metadata.jsonl`` whose lines are ``{"file_name": "0001.png", "text": "a red circle"}``.

The VAE is frozen during distillation, so each image's posterior (mean and standard deviation) is computed
once; every training step draws a fresh latent from it, as the teacher's recipe does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import umask
from ..errors import InputError, first_line

TOYWORLD = "toyworld"
METADATA = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption")  # diffusers' train_text_to_image default column, then the common alternative
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LatentData:
    """Posterior means / standard deviations (N, C, h, w), already scaled by the VAE's ``scaling_factor``,
    and each image's caption index into ``prompts`` (the unique captions, sorted)."""

    mean: "torch.Tensor"  # noqa: F821
    std: "torch.Tensor"  # noqa: F821
    caption: "torch.Tensor"  # noqa: F821
    prompts: list[str]
    source: dict


def describe_source(spec: str, images: int) -> dict:
    """What ``--data`` names, checked before any slow work: ``{"kind": "toyworld", ...}`` or a folder."""
    if spec == TOYWORLD:
        if images < 1:
            raise InputError(f"--images must be at least 1, got {images}")
        return {"kind": TOYWORLD, "world_seed": 0, "images": images}
    folder = Path(spec)
    if not folder.is_dir():
        raise InputError(f"--data '{spec}' is neither 'toyworld' nor a folder; give a folder with images and "
                         f"a {METADATA} of {{\"file_name\": ..., \"text\": ...}} lines")
    entries = read_metadata(folder)
    return {"kind": "folder", "path": str(folder.resolve()), "images": len(entries)}


def read_metadata(folder: Path) -> list[tuple[Path, str]]:
    """``(image path, caption)`` per line of ``metadata.jsonl``; every problem is one clear line."""
    path = folder / METADATA
    if not path.is_file():
        raise InputError(f"data folder '{folder}' has no {METADATA}; write one line per image: "
                         '{"file_name": "0001.png", "text": "a caption"}')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); write it as JSON lines") \
            from None
    entries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {n} is not JSON ({err.msg})") from err
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row, dict) and k in row), None)
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(caption, str):
            raise InputError(f"{path} line {n} needs a \"file_name\" and a \"text\" string")
        image = folder / row["file_name"]
        if not image.is_file():
            raise InputError(f"{path} line {n}: image '{row['file_name']}' is not in {folder}")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{path} line {n}: '{row['file_name']}' is not an image ({', '.join(IMAGE_SUFFIXES)})")
        entries.append((image, caption))
    if not entries:
        raise InputError(f"data folder '{folder}' has an empty {METADATA}: no images to train on")
    return entries


def _load_image(path: Path, size: int) -> np.ndarray:
    """RGB, centre-cropped to a square and resized to ``size`` (the VAE's sample size), uint8 HWC."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"image '{path}' could not be read ({err})") from err


class ImageFiles:
    """A folder's images as uint8 NHWC, read a slice at a time: 20,000 images at 512 px are 15 GB in memory."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.stack([_load_image(p, self.size) for p in self.paths[index]])


def images_per_batch(size: int) -> int:
    """Images the VAE encodes at once: 256 at the toy world's 64 px, 4 at SD's 512 px (its encoder's activations
    take about 0.6 GB per 512 px image)."""
    return max(1, min(256, 2**20 // (size * size)))


def load_images(source: dict, size: int) -> tuple[np.ndarray | ImageFiles, list[str]]:
    """uint8 NHWC images (a folder's: read as they are encoded) and their captions for a source from
    ``describe_source``."""
    from ..toyworld import world

    if source["kind"] == TOYWORLD:
        images, labels = world.dataset(source["world_seed"], source["images"])
        if size != world.SIZE:  # a teacher whose VAE takes another size (e.g. asdm:tiny, 128): the same scenes
            from PIL import Image

            images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                               for im in images])
        return images, [world.caption(c, s) for c, s in labels]
    entries = read_metadata(Path(source["path"]))
    return ImageFiles([p for p, _ in entries], size), [c for _, c in entries]


def cached_latents(vae, source: dict, size: int, teacher_sha256: str, cache: Path,
                   say: Callable[[str], None] = lambda line: None) -> LatentData:
    """The toy world's latents for this teacher, encoded once and kept in ``cache`` (encoding 20000 images takes
    minutes on 2 cores, drawing them seconds). Folders are encoded every time: their files may change. ``say``
    hears a line before an encoding starts (minutes with nothing else to show)."""
    import hashlib
    import os
    import tempfile

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    if source["kind"] != TOYWORLD:
        images, captions = load_images(source, size)
        say(f"encoding {len(images)} training images of '{source['path']}' with the teacher's VAE")
        return encode(vae, images, captions, source, size)
    key = hashlib.sha256(json.dumps({"teacher": teacher_sha256, "source": source, "size": size},
                                    sort_keys=True).encode()).hexdigest()[:20]
    path = cache / "latents" / f"toyworld-{key}.safetensors"
    if path.is_file():
        try:
            data = load_file(str(path))
            meta = json.loads(data.pop("_prompts").numpy().tobytes().decode())
            return LatentData(data["mean"], data["std"], data["caption"], meta, source)
        except (OSError, ValueError, KeyError, SafetensorError):
            pass  # a damaged cache entry is encoded again
    say(f"drawing and encoding {source['images']} toy-world training images with the teacher's VAE (once for "
        f"this teacher: kept in {path.parent})")
    images, captions = load_images(source, size)
    latents = encode(vae, images, captions, source, size)
    prompts = torch.frombuffer(bytearray(json.dumps(latents.prompts).encode()), dtype=torch.uint8)
    tmp = None
    try:  # a cache, not an output: one that cannot be kept (read-only, full) costs the next run the encoding
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would survive the rename
        save_file({"mean": latents.mean.contiguous(), "std": latents.std.contiguous(), "caption": latents.caption,
                   "_prompts": prompts}, tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        say(f"the latents could not be kept in {path.parent} ({first_line(err)}); the next run encodes them again "
            "(ASDM_EXPORT_CACHE moves the cache)")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return latents


def encode(vae, images: np.ndarray | ImageFiles, captions: list[str], source: dict, size: int) -> LatentData:
    """Encode with the (frozen) VAE: posterior mean and std per image, times the VAE's scaling factor. Images
    become float a batch at a time (all at once, 20,000 at 512 px would be 63 GB)."""
    import torch

    from ..toyworld import world

    batch = images_per_batch(size)
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dist = vae.encode(world.to_tensor(images[i:i + batch])).latent_dist
            # contiguous: the encoder returns channels-last tensors; a cached copy must train the same, and torch
            # 2.13's CPU GroupNorm backward segfaults on channels-last input when its affine needs no gradient
            # (the frozen teacher's stages that incubation backpropagates through)
            means.append((dist.mean * scale).contiguous())
            stds.append((dist.std * scale).contiguous())
    prompts = sorted(set(captions))
    index = {p: i for i, p in enumerate(prompts)}
    return LatentData(torch.cat(means), torch.cat(stds), torch.tensor([index[c] for c in captions]), prompts,
                      source)
