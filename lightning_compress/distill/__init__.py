"""Pure-torch knowledge-distillation numerics (no Lightning import in here)."""

from lightning_compress.distill.losses import (
    LOSSES,
    cosine,
    distillation_loss,
    kl_divergence,
    mse,
    reverse_kl_divergence,
    top1_agreement,
)

__all__ = [
    "LOSSES",
    "cosine",
    "distillation_loss",
    "kl_divergence",
    "mse",
    "reverse_kl_divergence",
    "top1_agreement",
]
