"""Reference norms: zero-centred RMSNorm, gated RMSNorm, L2 norm (plain PyTorch, fp32 inside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-centred RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + weight)`.

    x [..., D], weight [D] (initialised to 0). Computed in fp32, cast back to x.dtype after the multiply.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm_ref(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain RMSNorm times a SiLU gate: `rmsnorm(x) * weight * silu(gate)` over the last dim.

    x, gate [..., d]; weight [d] (initialised to 1). The normalised x is cast back to x.dtype before the
    weight multiply, and the gate is applied in fp32 (the transformers order of roundings).
    """
    dtype = x.dtype
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    y = weight * y
    return (y * F.silu(gate.float())).to(dtype)


def l2_norm_ref(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(sum(x^2) + eps)` over the last dim, in x's dtype (callers pass fp32)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
