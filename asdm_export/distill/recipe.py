"""The settings of a distillation run (recorded in the student's ``distill.json``; a resumed run must match)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import InputError
from .losses import BASELINE


@dataclass(frozen=True)
class DistillRecipe:
    losses: dict = field(default_factory=lambda: dict(BASELINE))
    steps: int = 3000                 # end-to-end steps
    incubate_steps: int = 0           # per incubated level, before the end-to-end steps (0: no incubation)
    batch: int = 64
    lr: float = 2e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    grad_clip: float = 1.0
    caption_dropout: float = 0.1      # the teacher's, so the student keeps classifier-free guidance
    min_snr_gamma: float = 5.0        # weights the task term as the teacher's recipe weights its loss
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self):
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.incubate_steps < 0:
            raise InputError(f"--incubate-steps must be 0 (off) or more, got {self.incubate_steps}")
        if not 0 < self.lr < math.inf:
            raise InputError(f"--lr must be a positive number, got {self.lr}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DistillRecipe":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
