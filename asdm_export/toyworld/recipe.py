"""The toy world's training recipe: a Stable-Diffusion-shaped pipeline trained from scratch on 2 CPU cores.

Stages, all seeded and counted in steps (never in wall time, so a re-run does the same work):
  1. an AutoencoderKL (64x64x3 <-> 16x16x4), its ``scaling_factor`` computed from the data's latents;
  2. a CLIPTextModel and an SD1.x-layout UNet2DConditionModel, trained together with DDPM epsilon loss
     (Min-SNR-5 weighted, which speeds up learning the coarse layout a prompt decides), caption dropout
     for classifier-free guidance, and an EMA of the weights, which is what ships.
The result is saved in fp16 with ``save_pretrained`` as an ordinary diffusers pipeline folder (DDIM
scheduler), with ``recipe.json`` (every setting, the library versions, timings) and ``train.log``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import world

RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class ToyRecipe:
    seed: int = 0
    images: int = 20000
    # tokenizer / text encoder: prompts are a handful of words, so 16 positions are plenty
    text_length: int = 16
    text_encoder: dict = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64))
    vae: dict = field(default_factory=lambda: dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64))
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_warmup_steps: int = 20
    # L1 keeps edges sharp; a tiny KL keeps the latent well scaled without blurring
    vae_l1_weight: float = 0.5
    vae_kl_weight: float = 1e-4
    # SD1.x layout; `attention_head_dim` is diffusers' (mis)name for the head count in SD1.x configs
    unet: dict = field(default_factory=lambda: dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 96, 64),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16))
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_weight_decay: float = 1e-2
    warmup_steps: int = 100
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ToyRecipe":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))


class _Log:
    """Timestamped progress lines, to ``train.log`` and to ``echo``; a context manager that closes the file."""

    def __init__(self, path: Path, echo):
        self.file, self.echo, self.t0 = open(path, "a", encoding="utf-8"), echo, time.perf_counter()

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.0f}s] {msg}"
        self.file.write(line + "\n")
        self.file.flush()
        self.echo(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def train_vae(recipe: ToyRecipe, x_all, log):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    n = len(recipe.vae["block_out_channels"])
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, **recipe.vae)
    log(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters, {recipe.vae_steps} steps")
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed + 10)
    for step in range(recipe.vae_steps):
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * lr_factor(step, recipe.vae_steps, recipe.vae_warmup_steps)
        x = x_all[torch.randint(0, len(x_all), (recipe.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).mean()
        mse = F.mse_loss(rec, x)
        loss = mse + recipe.vae_l1_weight * F.l1_loss(rec, x) + recipe.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"vae step {step + 1}/{recipe.vae_steps} mse {mse.item():.5f} kl {kl.item():.2f}")
    return vae.eval().requires_grad_(False)


def encode_latents(vae, x_all, batch: int = 256):
    """Posterior means and standard deviations of the whole data set (the UNet samples from them)."""
    import torch

    with torch.no_grad():
        dists = [vae.encode(x_all[i:i + batch]).latent_dist for i in range(0, len(x_all), batch)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def build_text_encoder(recipe: ToyRecipe, tokenizer):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=recipe.text_length,
                            bos_token_id=vocab[tokenizer.bos_token], eos_token_id=vocab[tokenizer.eos_token],
                            pad_token_id=vocab[tokenizer.pad_token], **recipe.text_encoder)
    torch.manual_seed(recipe.seed + 1)
    return CLIPTextModel(config)


def build_unet(recipe: ToyRecipe):
    import torch
    from diffusers import UNet2DConditionModel

    from ..models.presets import SD1_DOWN, SD1_UP

    torch.manual_seed(recipe.seed + 2)
    return UNet2DConditionModel(down_block_types=SD1_DOWN, up_block_types=SD1_UP, **recipe.unet)


def train_denoiser(recipe: ToyRecipe, latents, captions: list[str], tokenizer, log):
    """Text encoder + UNet, DDPM epsilon objective; returns the EMA copies."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from ..models.presets import SD1_SCHEDULER

    mean, std = latents
    scale = recipe_scale(latents)
    text_encoder, unet = build_text_encoder(recipe, tokenizer), build_unet(recipe)
    log(f"unet: {sum(p.numel() for p in unet.parameters()):,} parameters, text encoder: "
        f"{sum(p.numel() for p in text_encoder.parameters()):,}, {recipe.unet_steps} steps")
    # every prompt of the data set (plus the empty one) tokenized once; batches index into it
    prompts = sorted(set(captions)) + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=recipe.text_length, truncation=True,
                    return_tensors="pt").input_ids
    prompt_of = torch.tensor([prompts.index(c) for c in captions])
    empty = len(prompts) - 1

    sched = DDPMScheduler(**{k: v for k, v in SD1_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=recipe.min_snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction

    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=recipe.unet_weight_decay)
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in (unet, text_encoder)]
    gen = torch.Generator().manual_seed(recipe.seed + 20)
    running = []
    for step in range(recipe.unet_steps):
        for group in opt.param_groups:
            group["lr"] = recipe.unet_lr * lr_factor(step, recipe.unet_steps, recipe.warmup_steps)
        idx = torch.randint(0, len(mean), (recipe.unet_batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(recipe.unet_batch, generator=gen) < recipe.caption_dropout
        tokens = ids[torch.where(drop, empty, prompt_of[idx])]
        t = torch.randint(0, len(alphas), (recipe.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, text_encoder(tokens).last_hidden_state).sample
        loss = (weight[t] * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for avg, model in zip(ema, (unet, text_encoder)):
                for pa, p in zip(avg.parameters(), model.parameters()):
                    pa.lerp_(p, 1 - decay)
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"unet step {step + 1}/{recipe.unet_steps} loss {np.mean(running[-200:]):.4f}")
    return ema[0], ema[1]


def recipe_scale(latents) -> float:
    """The VAE's ``scaling_factor``: 1 / std of the data's latents, so the UNet sees unit-variance inputs."""
    mean, std = latents
    return float(1.0 / (mean.var() + (std ** 2).mean()).sqrt())


def train_toyworld(out: Path | str, recipe: ToyRecipe = ToyRecipe(), overwrite: bool = False,
                   echo=lambda line: None) -> Path:
    """Run the whole recipe and write the fp16 pipeline folder ``out`` (atomically)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..artifacts import atomic_output_dir
    from ..models.presets import SD1_SCHEDULER
    from ..models.tokenizer import write_tokenizer

    with atomic_output_dir(out, overwrite=overwrite) as tmp, _Log(tmp / "train.log", echo) as log:
        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed)
        images, labels = world.dataset(recipe.seed, recipe.images)
        x_all = world.to_tensor(images)
        captions = [world.caption(c, s) for c, s in labels]
        log(f"world seed {recipe.seed}: {recipe.images} images; versions {versions()}")

        vae = train_vae(recipe, x_all, log)
        t_vae = time.perf_counter() - t0
        latents = encode_latents(vae, x_all)
        scale = recipe_scale(latents)
        vae.register_to_config(scaling_factor=scale)
        log(f"latents {tuple(latents[0].shape)}, scaling_factor {scale:.4f}")

        write_tokenizer(tmp / "tokenizer", max_length=recipe.text_length)
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
        unet, text_encoder = train_denoiser(recipe, latents, captions, tokenizer, log)

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(**SD1_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
        seconds = time.perf_counter() - t0
        (tmp / RECIPE_FILE).write_text(json.dumps(
            {"recipe": recipe.to_json(), "versions": versions(),
             "seconds": {"vae": round(t_vae, 1), "total": round(seconds, 1)}}, indent=2) + "\n")
        log(f"done in {seconds / 60:.1f} min")
    return Path(out)
