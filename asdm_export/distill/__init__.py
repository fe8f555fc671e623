"""The tuning half of A-SDM: distil an assembled student from its teacher (``distill``)."""

from .distill import distill
from .losses import LOSSES, parse_losses
from .recipe import DistillRecipe

__all__ = ["distill", "DistillRecipe", "LOSSES", "parse_losses"]
