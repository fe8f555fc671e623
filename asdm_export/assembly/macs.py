"""Parameter and MAC counts per UNet stage, computed on the meta device (no weights, no compute).

MACs are half the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts for one forward pass:
convolutions, linear layers, attention (scaled_dot_product_attention, bmm) and ME-CondConv's kernel
mixing. Unlike BK-SDM's thop numbers, the attention matmuls are included (SD1.5 at 512 px: 401.6 G
here against thop's 339 G, which misses them).
"""

from __future__ import annotations

import torch

OTHER = "other"


def stage_of(name: str) -> str:
    """``down_blocks.1.resnets.0.conv1.weight`` -> ``down_blocks.1``; conv_in, time embedding, ... -> other."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    if parts[0] == "mid_block":
        return "mid_block"
    return OTHER


def stage_names(unet) -> list[str]:
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return names + [OTHER]


def params_per_stage(unet) -> dict[str, int]:
    out = dict.fromkeys(stage_names(unet), 0)
    for name, p in unet.named_parameters():
        out[stage_of(name)] += p.numel()
    return out


def macs_per_stage(unet, latent: int, batch: int = 1, text_len: int = 77) -> dict[str, int]:
    """MACs of one forward pass at ``batch`` x 4 x latent x latent, per stage, for a meta-device UNet."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(unet.parameters()).device
    if device.type != "meta":  # on CPU, FlopCounterMode does not see the fused attention kernel (a sixth short)
        raise ValueError(f"count MACs on the meta device (assembly.skeleton), not {device}")
    cfg = unet.config
    cross = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    with torch.device(device), torch.no_grad():
        sample = torch.zeros(batch, cfg.in_channels, latent, latent)
        timestep = torch.full((batch,), 500.0)
        text = torch.zeros(batch, text_len, cross)
        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, timestep, text, return_dict=False)
    counts = {name.split(".", 1)[1] if "." in name else name: sum(v.values())
              for name, v in counter.get_flop_counts().items()}
    out = {s: counts.get(s, 0) // 2 for s in stage_names(unet) if s != OTHER}
    out[OTHER] = counts["Global"] // 2 - sum(out.values())
    return out


def profile(unet, latent: int, batch: int = 1) -> dict:
    """``{"params": {stage: n}, "macs": {stage: n}}`` with a ``total`` entry in each."""
    params, macs = params_per_stage(unet), macs_per_stage(unet, latent, batch)
    params["total"], macs["total"] = sum(params.values()), sum(macs.values())
    return {"params": params, "macs": macs, "latent": latent, "batch": batch}
