"""Graphs: takes torch modules and produces ``GraphDef``s, the modules wrapped for export with named inputs,
dynamic axes and shape profiles (graphs.py), split at inheritance points into full / inherit graphs
(inheritance.py) and driven by sampling schedules (schedule.py)."""

from .graphs import (Axis, Derived, GraphDef, TextEncoderForExport, UNetForExport, UNetFull, UNetInherit,
                     VaeDecoderForExport, default_latent_range, text_encoder_graph, unet_downscale, unet_graphs,
                     vae_decoder_graph, vae_scale_factor)

__all__ = [
    "Axis", "Derived", "GraphDef", "TextEncoderForExport", "UNetForExport", "UNetFull", "UNetInherit",
    "VaeDecoderForExport", "default_latent_range", "text_encoder_graph", "unet_downscale", "unet_graphs",
    "vae_decoder_graph", "vae_scale_factor",
]
