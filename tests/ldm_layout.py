"""Write a diffusers SD1.x pipeline as one checkpoint in the original (LDM / CompVis) key layout, the way most
Stable Diffusion checkpoints are shared, so tests can load such a file without the network.

The key map is the inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``; the
layout is the one of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``), written from
the module structure of the CompVis UNet and autoencoder: ``input_blocks`` / ``middle_block`` /
``output_blocks`` for the UNet, ``encoder.down`` / ``decoder.up`` (reversed) for the VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
VAE_RESNET = [("nin_shortcut", "conv_shortcut")]
VAE_ATTENTION = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for ldm, hf in pairs:
        key = key.replace(f".{hf}.", f".{ldm}.")
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    per = cfg.layers_per_block
    blocks = len(cfg.block_out_channels)
    prefix_map = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                  "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                  "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                  "mid_block.resnets.1.": "middle_block.2."}
    for i in range(blocks):
        for j in range(per):
            at = 1 + i * (per + 1) + j
            prefix_map[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{at}.0."
            prefix_map[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{at}.1."
        if i < blocks - 1:
            prefix_map[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
        has_attention = "CrossAttn" in cfg.up_block_types[i]
        for j in range(per + 1):
            at = i * (per + 1) + j
            prefix_map[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{at}.0."
            prefix_map[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{at}.1."
        if i < blocks - 1:
            at = i * (per + 1) + per
            prefix_map[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{at}.{2 if has_attention else 1}.conv."
    out = {}
    for key, value in unet.state_dict().items():
        hf = next(p for p in sorted(prefix_map, key=len, reverse=True) if key.startswith(p))
        rest = "." + key[len(hf):]
        if ".resnets." in hf or hf.startswith("mid_block.resnets"):
            rest = _rename(rest, RESNET)
        out["model.diffusion_model." + prefix_map[hf] + rest[1:]] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."),
             ("encoder.mid_block.resnets.0.", "encoder.mid.block_1."),
             ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
             ("encoder.mid_block.resnets.1.", "encoder.mid.block_2."),
             ("decoder.mid_block.resnets.0.", "decoder.mid.block_1."),
             ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1."),
             ("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")]
    for i in range(blocks):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample."))
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for hf, ldm in pairs:
            if new.startswith(hf):
                new = ldm + new[len(hf):]
                break
        new = "." + new
        if ".attn_1." in new:
            new = _rename(new, VAE_ATTENTION)
            if value.ndim == 2:  # the CompVis attention is 1x1 convolutions
                value = value[:, :, None, None]
        else:
            new = _rename(new, VAE_RESNET)
        out["first_stage_model." + new[1:]] = value
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 flattens CLIPTextModel; the original layout keeps the text_model level
        rest = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + rest] = value
    return out


def save_ldm_checkpoint(pipe, path: Path, parts=("unet", "vae", "text_encoder")) -> Path:
    from safetensors.torch import save_file

    convert = {"unet": unet_to_ldm, "vae": vae_to_ldm, "text_encoder": text_encoder_to_ldm}
    state = {}
    for part in parts:
        state.update(convert[part](getattr(pipe, part)))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path
