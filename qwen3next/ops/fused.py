"""Reference element-wise epilogues that the model fuses on the GPU (plain PyTorch, the model's exact ops).

Each one replaces several small launches in a decode step (see `benchmarks/e2e_gpu.py --profile`):
  split_qkvz    the Gated DeltaNet layer's `in_proj_qkvz` output (grouped per key head) into the conv's input
                and z: four strided copies, which in prefill move the projection's whole output
  qkvz_causal_conv1d  that split and the causal conv after it, the conv reading q, k, v in place (no copy)
  gdn_gates     the Gated DeltaNet layer's write strength and decay from its `in_proj_ba` output
  add_rms_norm  the residual add and the zero-centred RMSNorm after it
  sigmoid_gate  x * sigmoid(gate) (+ residual): attention's output gate, the shared expert's gate
  rms_norm_rotary  attention's per-head query/key RMSNorm and the rotary embedding after it
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import causal_conv1d_ref
from .norms import rms_norm_ref


def check_split_qkvz_inputs(qkvz: torch.Tensor, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                            head_v_dim: int) -> int:
    """Validate; return r = Hv / Hk, the value heads per key head."""
    if num_k_heads < 1 or num_v_heads % num_k_heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    width = 2 * num_k_heads * head_k_dim + 2 * num_v_heads * head_v_dim
    if qkvz.dim() < 2 or qkvz.shape[-1] != width:
        raise ValueError(f"qkvz must be [..., 2 Hk dk + 2 Hv dv = {width}]; got {tuple(qkvz.shape)}")
    return num_v_heads // num_k_heads


def split_qkvz_ref(qkvz: torch.Tensor, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int):
    """Undo the per-key-head grouping of the fused projection qkvz [..., Hk (2 dk + 2 r dv)] (r = Hv / Hk; key
    head h holds its q [dk], k [dk], v [r dv], z [r dv]) -> (the conv's input [..., 2 Hk dk + Hv dv]: all q,
    then all k, then all v channels; z [..., Hv, dv]), both contiguous."""
    r = check_split_qkvz_inputs(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
    lead, dk, dv = qkvz.shape[:-1], head_k_dim, head_v_dim
    q, k, v, z = qkvz.reshape(*lead, num_k_heads, -1).split([dk, dk, r * dv, r * dv], dim=-1)
    mixed = qkvz.new_empty(*lead, num_k_heads * (2 * dk + r * dv))
    start = 0
    for part in (q, k, v):  # one strided copy each, straight into place
        width = part.shape[-2] * part.shape[-1]
        mixed[..., start:start + width].view(part.shape).copy_(part)
        start += width
    return mixed, z.reshape(*lead, num_v_heads, dv)


def qkvz_causal_conv1d_ref(qkvz: torch.Tensor, weight: torch.Tensor, num_k_heads: int, num_v_heads: int,
                           head_k_dim: int, head_v_dim: int, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           activation: str | None = "silu"):
    """The Gated DeltaNet layer's conv straight from its fused projection qkvz [B, T, Hk (2 dk + 2 r dv)]:
    `split_qkvz_ref`, then `causal_conv1d_ref` over the q, k, v channels (weight [C, K], C = 2 Hk dk + Hv dv;
    the state and packing arguments as there). Returns (y [B, T, C], z [B, T, Hk, r, dv], final state or None);
    z is a view of qkvz where a kernel does the conv (here a copy)."""
    mixed, z = split_qkvz_ref(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
    y, final = causal_conv1d_ref(mixed, weight, initial_state, output_final_state, cu_seqlens, activation)
    return y, z.unflatten(-2, (num_k_heads, num_v_heads // num_k_heads)), final


def check_gdn_gates_inputs(ba: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, num_k_heads: int) -> int:
    """Validate; return r = Hv / Hk, the value heads per key head."""
    Hv = A_log.shape[0] if A_log.dim() == 1 else -1
    if Hv < 1 or dt_bias.shape != (Hv,):
        raise ValueError(f"A_log and dt_bias must both be [Hv]; got {tuple(A_log.shape)}, {tuple(dt_bias.shape)}")
    if num_k_heads < 1 or Hv % num_k_heads:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({num_k_heads})")
    if ba.shape[-1] != 2 * Hv or not ba.is_floating_point():
        raise ValueError(f"ba must be a floating [..., 2 Hv = {2 * Hv}] tensor; got {ba.dtype} {tuple(ba.shape)}")
    return Hv // num_k_heads


def gdn_gates_ref(ba, A_log, dt_bias, num_k_heads: int, clip_val: float | None = None):
    """ba [..., Hk * 2r] (per key head: r columns of b, then r of a; Hv = Hk r) -> (beta, g) [..., Hv]:
    beta = sigmoid(b) (b clamped to [-clip_val, clip_val] if given), g = -exp(A_log) softplus(a + dt_bias),
    in fp32 (fp64 for fp64 inputs)."""
    r = check_gdn_gates_inputs(ba, A_log, dt_bias, num_k_heads)
    lead, Hv = ba.shape[:-1], A_log.shape[0]
    b, a = ba.reshape(*lead, num_k_heads, 2 * r).split([r, r], dim=-1)
    b, a = b.reshape(*lead, Hv), a.reshape(*lead, Hv)
    if clip_val is not None:
        b = b.clamp(-clip_val, clip_val)
    dtype = torch.promote_types(b.dtype, torch.float32)
    beta = torch.sigmoid(b.to(dtype))
    g = -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))
    return beta, g


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(s, rms_norm(s)) with s = x + residual in torch's promoted dtype (a bf16 mixer output added to an
    fp32 residual stream under autocast stays fp32); x, residual [..., D], weight [D]."""
    s = x + residual
    return s, rms_norm_ref(s, weight, eps)


def sigmoid_gate_ref(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x * sigmoid(gate), plus `residual` if given; x [..., D], gate [..., D] or [..., 1], residual like x."""
    out = x * torch.sigmoid(gate)
    return out if residual is None else residual + out


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of the first r dims of each head, the rest passed: x [B, T, H, hd];
    cos/sin [B, T, r] (each half of the r columns repeats the frequencies); in x's dtype."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def check_rms_norm_rotary_inputs(x, weight, cos, sin) -> None:
    """Raise a clear error unless x is [B, T, H, hd], weight [hd], cos and sin [B, T, r] with r even, <= hd."""
    if x.dim() != 4 or weight.shape != (x.shape[-1],):
        raise ValueError(f"need x [B, T, H, hd] and weight [hd]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    r = cos.shape[-1]
    if cos.shape != sin.shape or cos.shape[:2] != x.shape[:2] or cos.dim() != 3 or r % 2 or r > x.shape[-1]:
        raise ValueError(f"cos and sin must be [B, T, r] with even r <= hd, for x {tuple(x.shape)}; got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")


def rms_norm_rotary_ref(x, weight, cos, sin, eps: float = 1e-6) -> torch.Tensor:
    """Zero-centred RMSNorm of each head (`rms_norm_ref`, rounded to x's dtype) then `rotary_ref`:
    x [B, T, H, hd] (any strides), weight [hd], cos/sin [B, T, r] -> [B, T, H, hd] in x's dtype."""
    check_rms_norm_rotary_inputs(x, weight, cos, sin)
    return rotary_ref(rms_norm_ref(x, weight, eps), cos, sin)
