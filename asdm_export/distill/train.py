"""The distillation loop: phases, one training step, EMA, and checkpoints that resume bit-identically.

A run is a list of phases. With ``incubate_steps > 0`` it starts with progressive incubation (our definition,
after Deep Incubation, Ni et al. 2023): the student's stages are trained a level at a time inside the teacher
(level i = down stage i and its mirror up stage, whose skip connections pair up, so the swapped pair fits the
teacher's wiring), innermost level first, each new level joining those already incubated; only the new level
learns, to reproduce the teacher's output and its own stages' outputs. Then the whole student is trained end to
end with the recipe's losses. Everything is counted in steps and seeded, so a run repeats exactly on the same
torch build and thread count.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StageError
from ..toyworld.recipe import lr_factor
from .data import LatentData
from .losses import (AttentionScores, Taps, cross_attention_pairs, feat_loss, min_snr_weight, sas_loss,
                     stage_pairs, task_target)
from .recipe import DistillRecipe

INCUBATION_LOSSES = {"kd": 1.0, "feat": 1.0}  # a level learns to give the teacher's output and stage outputs
RUNNING = 50  # steps behind each logged loss (a running mean)


@dataclass
class Phase:
    name: str                              # "incubate down_blocks.2+up_blocks.1" or "end-to-end"
    steps: int
    levels: list[int]                      # teacher levels swapped into the teacher (incubation) so far
    pairs: list[tuple[str, str]]           # (student module, teacher module) compared by ``feat``
    losses: dict


# ---- progressive incubation --------------------------------------------------------------------------------

def incubation_levels(layout, teacher, student) -> list[int]:
    """Teacher levels (down stage i + up stage n-1-i) that the plan changed and whose student pair fits the
    teacher's wiring (same down/up-samplers), innermost first. Dropped levels and the mid block are left to
    the end-to-end phase."""
    n = len(teacher.down_blocks)
    levels = []
    for i in reversed(range(n)):
        down, up = layout.stage(f"down_blocks.{i}"), layout.stage(f"up_blocks.{n - 1 - i}")
        if down.student is None or up.student is None:
            continue
        pairs = [(student.get_submodule(s.student), teacher.get_submodule(s.teacher)) for s in (down, up)]
        changed = any(len(s.resnets) != len(t.resnets) or len(getattr(s, "attentions", ()))
                      != len(getattr(t, "attentions", ())) for s, t in pairs)
        fits = all((getattr(s, k, None) is None) == (getattr(t, k, None) is None)
                   for s, t in pairs for k in ("downsamplers", "upsamplers"))
        if changed and fits:
            levels.append(i)
    return levels


def level_pairs(layout, n: int, level: int) -> list[tuple[str, str]]:
    return [(layout.stage(t).student, t) for t in (f"down_blocks.{level}", f"up_blocks.{n - 1 - level}")]


@contextlib.contextmanager
def swapped_in(teacher: nn.Module, student: nn.Module, layout, levels: list[int]):
    """The teacher with the student's stages of ``levels`` in place of its own (the student's modules, not
    copies) for the duration of the block; the teacher's own stages are put back after."""
    n = len(teacher.down_blocks)
    saved = []
    try:
        for i in levels:
            for s_name, t_name in level_pairs(layout, n, i):
                kind, index = t_name.split(".")
                blocks = getattr(teacher, kind)
                saved.append((blocks, int(index), blocks[int(index)]))
                blocks[int(index)] = student.get_submodule(s_name)
        yield teacher
    finally:
        for blocks, index, module in reversed(saved):
            blocks[index] = module


def plan_phases(recipe: DistillRecipe, layout, teacher, student) -> list[Phase]:
    phases = []
    if recipe.incubate_steps:
        n = len(teacher.down_blocks)
        done = []
        for level in incubation_levels(layout, teacher, student):
            done = done + [level]
            names = " + ".join(t for _, t in level_pairs(layout, n, level))
            phases.append(Phase(f"incubate {names}", recipe.incubate_steps, list(done), level_pairs(layout, n, level),
                                dict(INCUBATION_LOSSES)))
    phases.append(Phase("end-to-end", recipe.steps, [], stage_pairs(layout), dict(recipe.losses)))
    return phases


# ---- the loop ------------------------------------------------------------------------------------------------

class Trainer:
    """Holds the models, the optimizer, the EMA and the data; ``run`` trains from ``self.step`` to the end."""

    def __init__(self, recipe: DistillRecipe, teacher, student, layout, data: LatentData, embeddings: torch.Tensor,
                 alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        self.recipe, self.teacher, self.student, self.layout, self.data = recipe, teacher, student, layout, data
        self.embeddings = embeddings  # (prompts + 1, tokens, width): the frozen text encoder's output; last = ""
        self.alphas = alphas_cumprod
        self.prediction_type = prediction_type  # the teacher's (its scheduler's): the student predicts the same
        self.snr_weight = min_snr_weight(alphas_cumprod, recipe.min_snr_gamma, prediction_type)
        teacher.requires_grad_(False).eval()
        student.requires_grad_(True).train()
        self.params = [p for p in student.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.ema = copy.deepcopy(student).eval().requires_grad_(False)
        self.gen = torch.Generator().manual_seed(recipe.seed + 20)
        self.phases = plan_phases(recipe, layout, teacher, student)
        self.total = sum(p.steps for p in self.phases)
        self.step = 0
        self.history: list[dict] = []  # one entry per logged step
        self._running: list[dict] = []  # every step's losses; the last RUNNING are the logged means
        self.in_step = False  # True while a step is half applied (a stop then must not save it)

    # -- state (checkpoints) --
    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        state.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, p in enumerate(self.params):
            for key, value in self.opt.state.get(p, {}).items():
                state[f"opt.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        state["rng"] = self.gen.get_state()
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def state_json(self) -> dict:
        """What the tensors do not hold: the step, the logged history and the losses behind the running means."""
        return {"step": self.step, "history": self.history, "running": self._running[-RUNNING:]}

    def load_state(self, state: dict[str, torch.Tensor], saved: dict) -> None:
        """Back to a checkpoint: ``state_tensors`` and ``state_json`` as saved."""
        self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")}, strict=True)
        self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")}, strict=True)
        self.opt.state.clear()
        for key, value in state.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                self.opt.state[self.params[int(i)]][name] = value.clone()
        self.gen.set_state(state["rng"])
        self.step, self.history, self._running = saved["step"], list(saved["history"]), list(saved.get("running", []))

    # -- one step --
    def phase_at(self, step: int) -> tuple[Phase, int]:
        start = 0
        for phase in self.phases:
            if step < start + phase.steps:
                return phase, step - start
            start += phase.steps
        raise IndexError(step)

    def batch(self):
        r, d = self.recipe, self.data
        idx = torch.randint(0, len(d.mean), (r.batch,), generator=self.gen)
        z0 = d.mean[idx] + d.std[idx] * torch.randn(d.mean[idx].shape, generator=self.gen)
        drop = torch.rand(r.batch, generator=self.gen) < r.caption_dropout
        prompt = torch.where(drop, len(self.embeddings) - 1, d.caption[idx])
        t = torch.randint(0, len(self.alphas), (r.batch,), generator=self.gen)
        noise = torch.randn(z0.shape, generator=self.gen)
        a = self.alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = task_target(self.prediction_type, z0, noise, a) if "task" in r.losses else noise
        return zt, t, self.embeddings[prompt], target

    def losses(self, phase: Phase, zt, t, emb, target) -> dict[str, torch.Tensor]:
        want = phase.losses
        attn = cross_attention_pairs(self.layout, self.student) if "sas" in want else []
        feats = phase.pairs if "feat" in want else []
        with Taps(self.teacher, [t_ for _, t_ in feats]) as t_taps, \
                AttentionScores(self.teacher, [t_ for _, t_ in attn]) as t_attn, torch.no_grad():
            eps_t = self.teacher(zt, t, emb).sample if ("kd" in want or feats or attn) else None
            t_feats, t_scores = dict(t_taps.values), dict(t_attn.values)
        model = swapped_in(self.teacher, self.student, self.layout, phase.levels) if phase.levels \
            else contextlib.nullcontext(self.student)
        with model as model, Taps(self.student, [s for s, _ in feats]) as s_taps, \
                AttentionScores(self.student, [s for s, _ in attn]) as s_attn:
            eps_s = model(zt, t, emb).sample
            s_feats, s_scores = dict(s_taps.values), dict(s_attn.values)
        terms = {}
        if "task" in want:
            terms["task"] = (self.snr_weight[t] * F.mse_loss(eps_s, target, reduction="none").mean((1, 2, 3))).mean()
        if "kd" in want:
            terms["kd"] = F.mse_loss(eps_s, eps_t)
        if feats:
            terms["feat"] = feat_loss(s_feats, t_feats, feats)
        if attn:
            terms["sas"] = sas_loss(s_scores, t_scores, attn)
        return terms

    def train_step(self) -> dict[str, float]:
        self.in_step = True
        phase, k = self.phase_at(self.step)
        r = self.recipe
        for group in self.opt.param_groups:
            group["lr"] = r.lr * lr_factor(k, phase.steps, min(r.warmup_steps, phase.steps))
        terms = self.losses(phase, *self.batch())
        loss = sum(phase.losses[name] * value for name, value in terms.items())
        if not torch.isfinite(loss):  # before any update: the weights, the average and the checkpoints stay finite
            self._diverged(phase, {"loss": loss, **terms})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if phase.levels:
            # levels incubated before this one sit in the teacher too; only the new level learns
            learning = {id(p) for s_name, _ in phase.pairs for p in self.student.get_submodule(s_name).parameters()}
            for p in self.params:
                if id(p) not in learning:
                    p.grad = None
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], r.grad_clip)
        if not torch.isfinite(norm):  # a finite loss can still overflow in the backward pass
            self._diverged(phase, {"loss": loss, "gradient norm": norm})
        self.opt.step()
        decay = min(r.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for avg, p in zip(self.ema.parameters(), self.params):
                avg.lerp_(p, 1 - decay)
        self.step += 1
        values = {"loss": loss.item(), **{name: v.item() for name, v in terms.items()}}
        self._running.append(values)
        self.in_step = False
        return values

    def _diverged(self, phase: Phase, values: dict[str, torch.Tensor]) -> None:
        """Training went to inf / NaN (a learning rate too high, or a bad batch): stop with the state as it was
        before this step, rather than train on and write a student of NaN weights."""
        self.in_step = False
        said = ", ".join(f"{k} {v.item():g}" for k, v in values.items())
        raise StageError(f"training diverged at step {self.step + 1}/{self.total} ({phase.name}: {said}); lower "
                         f"--lr (now {self.recipe.lr:g}) and start over (with --overwrite where a checkpoint was "
                         "saved)")

    def running(self, last: int = RUNNING) -> dict[str, float]:
        recent = self._running[-last:]
        return {k: float(np.mean([v[k] for v in recent if k in v])) for k in recent[-1]} if recent else {}

    def run(self, on_step=lambda trainer, values: None, stop_at: int | None = None) -> None:
        """Train until the end (or ``stop_at``); ``on_step`` sees every finished step (logging, checkpoints)."""
        end = self.total if stop_at is None else min(stop_at, self.total)
        while self.step < end:
            on_step(self, self.train_step())
