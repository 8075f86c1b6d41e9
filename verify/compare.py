"""Comparing two peers' outputs for the same input (pure).

The metric is per-token relative L2 error of the span's *update* Δ = y − x, not of y: a few huge
activations pass through blocks unchanged and would mask cheating in y (../shared/notes/verification.md
§0). e_t = ‖ΔA_t − ΔB_t‖ / max(‖ΔA_t‖, ‖ΔB_t‖, ε), in float32; a pair disagrees if the median over
tokens exceeds τ_med, the max exceeds τ_max, or anything is non-finite. Thresholds depend on the
pair of declared dtypes; peers of different dtypes are never judged against each other.
"""

from __future__ import annotations

import dataclasses

import torch

EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Thresholds:
    median: float  # τ_med on the per-token relative update error
    maximum: float  # τ_max
    gross_factor: float = 5.0  # e above gross_factor * τ_max is a gross fault (identity, skip, wrong weights)


# max(the notes' defaults, 3 x the honest disagreement measured by bench/calibrate.py on SmolLM2
# blocks 10-20: step-by-step decode vs one-prefill replay, 1 vs 2 threads, batch 1 vs padded batch).
# fp32: median 2.2e-6, max 9.2e-6; fp16: 2.4e-3, 7.8e-3; bf16: 1.7e-2, 5.2e-2 (README, "Verification").
THRESHOLDS = {
    "float32": Thresholds(1e-3, 5e-3),
    "float16": Thresholds(7.5e-3, 2.5e-2),
    "bfloat16": Thresholds(5e-2, 1.6e-1),
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    comparable: bool  # False: different declared dtypes, no verdict possible
    agree: bool
    median: float
    maximum: float
    gross: bool

    @classmethod
    def incomparable(cls) -> "Comparison":
        return cls(False, True, float("nan"), float("nan"), False)


def token_errors(x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, hidden) inputs and two outputs -> (batch * tokens,) relative update errors."""
    if not (x.shape == y_a.shape == y_b.shape) or x.ndim != 3:
        raise ValueError(f"shapes must be equal (batch, tokens, hidden): {x.shape}, {y_a.shape}, {y_b.shape}")
    x, y_a, y_b = x.float(), y_a.float(), y_b.float()
    d_a = (y_a - x).flatten(0, 1)  # (batch * tokens, hidden)
    d_b = (y_b - x).flatten(0, 1)
    scale = torch.maximum(d_a.norm(dim=-1), d_b.norm(dim=-1)).clamp_min(EPS)
    return (d_a - d_b).norm(dim=-1) / scale


def compare(x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, dtype_a: str, dtype_b: str,
            mask: torch.Tensor | None = None) -> Comparison:
    """Judge whether A and B computed the same span on input x. ``mask`` (batch, tokens) 0/1 leaves out
    padding positions, whose values are meaningless."""
    if dtype_a != dtype_b or dtype_a not in THRESHOLDS:
        return Comparison.incomparable()
    tau = THRESHOLDS[dtype_a]
    if not (torch.isfinite(y_a).all() and torch.isfinite(y_b).all()):
        return Comparison(True, False, float("inf"), float("inf"), True)
    errors = token_errors(x, y_a, y_b)
    if mask is not None:
        errors = errors[mask.flatten().bool()]
    if errors.numel() == 0:
        return Comparison.incomparable()
    median, maximum = float(errors.median()), float(errors.max())
    agree = median <= tau.median and maximum <= tau.maximum
    return Comparison(True, agree, median, maximum, maximum > tau.gross_factor * tau.maximum)
