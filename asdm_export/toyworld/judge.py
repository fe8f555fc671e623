"""The judge: a small CNN that reads a toy-world image and says its colour and its shape.

Trained on the world itself (a different world seed than the generator's training data), with light
noise and blur so that slightly soft generated images are read as a person would read them. Its pooled
features also serve as the embedding for a Frechet distance between generated and real images.
Saved as ``judge.safetensors`` + ``judge.json`` (recipe, accuracy on real images).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, first_line
from . import world

COLOURS, SHAPES = list(world.COLOURS), list(world.SHAPES)
WEIGHTS, CONFIG = "judge.safetensors", "judge.json"


@dataclass(frozen=True)
class JudgeRecipe:
    seed: int = 1  # the world seed of its training images (the generator trains on seed 0)
    images: int = 20000
    steps: int = 2000
    batch: int = 64
    lr: float = 2e-3
    channels: tuple[int, ...] = (16, 32, 64, 128)
    eval_seed: int = 7  # held-out real images for the accuracy recorded with the weights
    eval_images: int = 2000


class Judge(nn.Module):
    def __init__(self, channels: tuple[int, ...] = JudgeRecipe.channels):
        super().__init__()
        widths = [3, *channels]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(len(channels)))
        self.colour = nn.Linear(widths[-1], len(COLOURS))
        self.shape = nn.Linear(widths[-1], len(SHAPES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.colour(f), self.shape(f)

    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
        """uint8 NHWC images -> predicted colour and shape indices and the pooled features."""
        out = {"colour": [], "shape": [], "features": []}
        for i in range(0, len(images), batch):
            f = self.features(world.to_tensor(images[i:i + batch]))
            out["colour"].append(self.colour(f).argmax(1).numpy())
            out["shape"].append(self.shape(f).argmax(1).numpy())
            out["features"].append(f.numpy().astype(np.float64))
        return {k: np.concatenate(v) for k, v in out.items()}


def labels_to_index(labels: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([COLOURS.index(c) for c, _ in labels]), np.array([SHAPES.index(s) for _, s in labels]))


def hits(read: dict[str, np.ndarray], labels: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Per image, from ``Judge.read``: was its colour, its shape, both read as ``labels`` say."""
    colour, shape = labels_to_index(labels)
    ok = {"colour": read["colour"] == colour, "shape": read["shape"] == shape}
    ok["both"] = ok["colour"] & ok["shape"]
    return ok


def accuracy(judge: Judge, images: np.ndarray, labels: list[tuple[str, str]]) -> dict[str, float]:
    return {key: float(ok.mean()) for key, ok in hits(judge.read(images), labels).items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the batch blurred a little, all of it with a little noise: generated images are not pixel-clean."""
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + 0.05 * torch.randn(x.shape, generator=gen)


def train_judge(out: Path | str, recipe: JudgeRecipe = JudgeRecipe(), overwrite: bool = False,
                echo=lambda line: None) -> dict:
    """Train the judge on world ``recipe.seed``; write it to ``out`` (atomically); return its record."""
    from safetensors.torch import save_file

    from ..artifacts import atomic_output_dir

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    images, labels = world.dataset(recipe.seed, recipe.images)
    x = world.to_tensor(images)
    y_colour, y_shape = (torch.from_numpy(a) for a in labels_to_index(labels))
    judge = Judge(recipe.channels)
    opt = torch.optim.AdamW(judge.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.steps):
        for group in opt.param_groups:  # cosine decay: the last steps settle the decision boundaries
            group["lr"] = recipe.lr * 0.5 * (1 + np.cos(np.pi * step / recipe.steps))
        idx = torch.randint(0, len(x), (recipe.batch,), generator=gen)
        logit_c, logit_s = judge(_augment(x[idx], gen))
        loss = F.cross_entropy(logit_c, y_colour[idx]) + F.cross_entropy(logit_s, y_shape[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            echo(f"judge step {step + 1}/{recipe.steps} loss {loss.item():.4f}")
    judge.eval()
    real = accuracy(judge, *world.dataset(recipe.eval_seed, recipe.eval_images))
    record = {"recipe": asdict(recipe), "accuracy_on_real": real, "seconds": round(time.perf_counter() - t0, 1),
              "torch": torch.__version__}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_file(judge.state_dict(), str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    echo(f"judge on {recipe.eval_images} real images (world seed {recipe.eval_seed}): {real}")
    return record


def load_judge(folder: Path | str) -> Judge:
    """A judge written by ``train_judge``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise InputError(f"'{folder}' is not a judge folder (needs {WEIGHTS} and {CONFIG}); "
                         "train one with `asdm-export toyworld judge`")
    try:
        judge = Judge(tuple(json.loads((folder / CONFIG).read_text())["recipe"]["channels"]))
        judge.load_state_dict(load_file(str(folder / WEIGHTS)))
        judge.folder = folder  # an input: an output that would replace it is refused
    except Exception as err:  # corrupt or foreign file: one line, not a traceback
        raise InputError(f"could not load the judge from '{folder}': {first_line(err)}") from err
    return judge.eval()
