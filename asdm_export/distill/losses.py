"""The distillation objective: which terms exist, and the hooks that read what they compare.

Terms (docs/method.md section 7 states them with their sources):
  task  the denoising loss, ``|eps_s - eps|^2`` (Min-SNR weighted, as the teacher was trained); for a
        v-prediction teacher ``|v_s - v|^2`` with the velocity's Min-SNR weight;
  kd    output knowledge distillation, ``|eps_s - eps_t|^2`` (BK-SDM's L_OutKD);
  feat  feature knowledge distillation, ``sum_stages |f_s - f_t|^2`` at the output of every student stage and
        the teacher stage it was made from (BK-SDM's L_FeatKD);
  sas   semantic-aware supervision (our definition): the student's cross-attention maps (for every pixel, the
        distribution over the prompt's tokens) follow the teacher's, ``KL(A_t || A_s)`` per query, averaged
        over layers; the maps say which word each region is drawing, the semantic layout of the image.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..errors import InputError

LOSSES = ("task", "kd", "feat", "sas")
PREDICTIONS = ("epsilon", "v_prediction")  # what the UNet's output is (the scheduler's prediction_type)
BASELINE = {"task": 1.0, "kd": 1.0, "feat": 1.0}  # BK-SDM's three terms, each weighted 1


def parse_losses(text: str) -> dict[str, float]:
    """``"task,kd,feat,sas=0.5"`` -> ``{"task": 1.0, "kd": 1.0, "feat": 1.0, "sas": 0.5}``."""
    weights: dict[str, float] = {}
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in LOSSES:
            raise InputError(f"unknown loss '{name}'; choose from: {', '.join(LOSSES)} (e.g. --losses task,kd,feat)")
        try:
            weight = float(value) if value else 1.0
        except ValueError as err:
            raise InputError(f"loss weight '{item}' is not a number (write {name}=0.5)") from err
        if not 0 < weight < math.inf:
            raise InputError(f"loss weight '{item}' must be a positive number; leave a term out to disable it")
        if name in weights:  # the last one silently won: "task,task" is not twice the task term
            raise InputError(f"--losses names '{name}' twice; name each term once, with its weight (e.g. {name}=2)")
        weights[name] = weight
    if not weights:
        raise InputError(f"--losses names no term; choose from: {', '.join(LOSSES)}")
    return weights


# ---- what the terms read --------------------------------------------------------------------------------

def stage_pairs(layout) -> list[tuple[str, str]]:
    """(student stage, teacher module) for every stage the student keeps: where ``feat`` compares outputs."""
    return [(stage.student, _teacher_output(layout, stage)) for stage in layout.stages if stage.student is not None]


def _teacher_output(layout, stage) -> str:
    """The teacher module whose output means what the student stage's output means: the stage itself, except
    for the innermost kept down stage of a student that dropped stages. That stage loses its downsampler (it
    is now the last, as in BK-SDM-Tiny), so its output matches the teacher stage's before downsampling: the
    output of its last layer."""
    kind, _, index = stage.teacher.partition(".")
    types = layout.teacher_config.get("down_block_types", ())
    if not layout.dropped or kind != "down_blocks" or int(index) != len(types) - 1 - layout.dropped:
        return stage.teacher
    layer = "attentions" if "CrossAttn" in types[int(index)] else "resnets"
    return f"{stage.teacher}.{layer}.{stage.teacher_layers - 1}"


def cross_attention_pairs(layout, student) -> list[tuple[str, str]]:
    """(student ``attn2``, teacher ``attn2``) for every cross-attention the student keeps (inherited by position)."""
    return [(name, layout.teacher_key(name)) for name, _ in student.named_modules() if name.endswith(".attn2")]


class Taps(contextlib.AbstractContextManager):
    """Forward hooks that keep the output of named modules (a down block's output is its hidden state)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name):
        def hook(module, args, output):
            self.values[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self.values.clear()


class RecordingAttnProcessor:
    """Plain scaled-dot-product attention (SD's attention: no mask, norm or residual inside) that keeps the
    pre-softmax scores ``(B * heads, queries, keys)`` for the ``sas`` term. Same output as diffusers' AttnProcessor."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.residual_connection or attn.norm_cross or hidden_states.ndim != 3:
            raise InputError(f"'{self.name}' is not a plain SD cross-attention; the sas loss reads only those")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        scores = torch.bmm(q, k.transpose(1, 2)) * attn.scale
        self.store[self.name] = scores
        out = attn.batch_to_head_dim(torch.bmm(scores.softmax(-1), v))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class AttentionScores(contextlib.AbstractContextManager):
    """Puts a ``RecordingAttnProcessor`` on the named attention modules; restores their processors on exit."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self._saved = {}
        for name in names:
            attn = model.get_submodule(name)
            self._saved[name] = attn.processor
            attn.set_processor(RecordingAttnProcessor(self.values, name))
        self._model = model

    def __exit__(self, *exc):
        for name, proc in self._saved.items():
            self._model.get_submodule(name).set_processor(proc)
        self.values.clear()


def sas_loss(student_scores: dict, teacher_scores: dict, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean over layers of ``KL(softmax(teacher) || softmax(student))`` per query (batch, head and query averaged)."""
    terms = []
    for s_name, t_name in pairs:
        log_p_t = teacher_scores[t_name].log_softmax(-1)
        log_p_s = student_scores[s_name].log_softmax(-1)
        terms.append((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean())
    return torch.stack(terms).mean()


def feat_loss(student_feats: dict, teacher_feats: dict, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """BK-SDM's feature KD: the sum over stages of the mean squared difference of the stage outputs."""
    return sum(F.mse_loss(student_feats[s], teacher_feats[t]) for s, t in pairs)


def task_target(prediction_type: str, z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for ``z_t = sqrt(a) z0 + sqrt(1 - a) noise``: the noise, or the velocity
    ``v = sqrt(a) noise - sqrt(1 - a) z0`` (Salimans & Ho 2022; diffusers' ``get_velocity``). ``alpha_bar``
    broadcasts against the latents."""
    check_prediction_type(prediction_type)
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0
    return noise


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTIONS:
        raise InputError(f"the teacher predicts '{prediction_type}'; the task loss trains "
                         f"{' or '.join(PREDICTIONS)} models (drop 'task' from --losses to distil by kd/feat only)")


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights per timestep (Hang et al. 2023): ``min(snr, gamma) / snr`` for an epsilon
    target, ``min(snr, gamma) / (snr + 1)`` for a velocity target (both weight the implied x0 error by
    ``min(snr, gamma)``)."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
