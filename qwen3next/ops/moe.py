"""Mixture-of-experts in plain PyTorch: top-k routing, the routed SwiGLU experts, the load-balancing loss.

Experts are stored stacked: gate_up [E, 2I, D] (rows 0..I-1 the gate projection, I..2I-1 the up
projection) and down [E, D, I]. Tokens are flattened: x [N, D].

`*_ref` are the readable references. `moe_experts_grouped` is the same computation sort-based: the
(token, slot) pairs are sorted by expert so that each expert's rows are one contiguous segment, and the
two projections are grouped matrix products over those segments (`torch._grouped_mm`); it is what the
torch backend runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_route_inputs(router_logits: torch.Tensor, top_k: int) -> None:
    """Raise a clear error unless router_logits is a floating [N, E] tensor and 1 <= top_k <= E."""
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a floating [N, E] tensor, got {router_logits.dtype} "
                         f"{tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k must be in [1, E={router_logits.shape[1]}], got {top_k}")


def check_moe_inputs(x, gate_up, down, weights, ids) -> None:
    """Raise a clear error unless the shapes and dtypes fit `moe_experts_ref`'s contract."""
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"expected x [N, D], gate_up [E, 2I, D], down [E, D, I]; got {tuple(x.shape)}, "
                         f"{tuple(gate_up.shape)}, {tuple(down.shape)}")
    (N, D), (E, two_i, D1), (E1, D2, I) = x.shape, gate_up.shape, down.shape
    if D1 != D or D2 != D or E1 != E or two_i != 2 * I:
        raise ValueError(f"inconsistent expert shapes: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)} "
                         f"(want [E, 2I, D]), down {tuple(down.shape)} (want [E, D, I])")
    if ids.dim() != 2 or ids.shape[0] != N or weights.shape != ids.shape:
        raise ValueError(f"weights and ids must both be [N={N}, k]; got {tuple(weights.shape)}, {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64) or not weights.is_floating_point():
        raise ValueError(f"ids must be int32/int64 and weights floating; got {ids.dtype}, {weights.dtype}")
    if not (x.dtype == gate_up.dtype == down.dtype):
        raise ValueError(f"x, gate_up, down must share a dtype; got {x.dtype}, {gate_up.dtype}, {down.dtype}")


def autocast_operands(x, gate_up, down):
    """(x, gate_up, down) in autocast's dtype where autocast is on for their device (it does not cast the
    operands of custom ops, which would otherwise run in fp32 beside bf16 matmuls), else as given."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, gate_up, down
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), gate_up.to(dtype), down.to(dtype)


def route_ref(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Softmax over all E experts (fp32), keep the top k, optionally renormalise them to sum to 1.

    router_logits [N, E] -> (weights [N, k] in the logits' dtype, expert ids [N, k] int64).
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_experts_ref(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """out[n] = sum_s weights[n, s] * down[e] @ (silu(gate[e] @ x[n]) * (up[e] @ x[n])),  e = ids[n, s].

    x [N, D]; gate_up [E, 2I, D]; down [E, D, I]; weights, ids [N, k]. Returns [N, D] in x.dtype.
    Loops over the experts that received tokens: the plain statement of the computation.
    """
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(out.dtype))
    return out


def _grouped_mm_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` exists and accepts these operands: fp32/bf16/fp16 on the CPU (bf16 on
    CUDA), 16-byte aligned, every non-unit stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if a.dtype not in ((torch.bfloat16,) if a.is_cuda else (torch.float32, torch.bfloat16, torch.float16)):
        return False
    size = a.element_size()
    return all(t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride()) for t in (a, b))


def _segment_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """out[r] = a[r] @ b[e] for the rows r of segment e. a [M, K] (rows sorted by segment), b [E, K, N],
    ends [E] int32 (cumulative segment ends) -> [M, N]. Falls back to one product per segment where
    `torch._grouped_mm` is absent or refuses the operands (fp64, unaligned sizes)."""
    if _grouped_mm_takes(a, b):
        return torch._grouped_mm(a, b, offs=ends)
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[e]
        start = end
    return out


def _segment_outer(g: torch.Tensor, a: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """out[e] = g[seg e]^T @ a[seg e]: g [M, N], a [M, K] -> [E, N, K] (zeros for empty segments)."""
    gt = g.t()
    if _grouped_mm_takes(gt, a):
        return torch._grouped_mm(gt, a, offs=ends)
    out = a.new_zeros(ends.shape[0], g.shape[1], a.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[e] = gt[:, start:end] @ a[start:end]
        start = end
    return out


class _GroupedLinear(torch.autograd.Function):
    """y[r] = w[e] @ a[r] for the rows r of expert e's segment: a [M, K], w [E, N, K] (the F.linear layout),
    ends [E] int32 -> y [M, N]. The backward is two more grouped products on transposed operands (on the
    CPU, torch 2.13's own `_grouped_mm` backward fails on these layouts)."""

    @staticmethod
    def forward(ctx, a, w, ends):
        ctx.save_for_backward(a, w, ends)
        return _segment_mm(a, w.transpose(1, 2), ends)

    @staticmethod
    def backward(ctx, grad):
        a, w, ends = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = _segment_mm(grad, w, ends) if ctx.needs_input_grad[0] else None
        grad_w = _segment_outer(grad, a, ends) if ctx.needs_input_grad[1] else None
        return grad_a, grad_w, None


def sort_by_expert(ids: torch.Tensor, num_experts: int):
    """Group the N*k (token, slot) pairs by expert, stably (so the order is deterministic).

    ids [N, k] -> (order [N*k] int64: flat pair index n*k + s of each sorted row,
                   ends [E] int32: cumulative row count of experts 0..e). No host synchronisation.
    """
    flat = ids.reshape(-1).to(torch.int32)  # 32-bit keys sort faster
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, bounds, right=True, out_int32=True)


def moe_experts_grouped(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """`moe_experts_ref`'s contract, sort-based: gather the rows by expert, two grouped products, scatter back.

    No per-expert Python loop where `torch._grouped_mm` takes the operands; differentiable in x, gate_up,
    down and weights. Under autocast x and the experts (and so the result) are in its dtype.
    """
    x, gate_up, down = autocast_operands(x, gate_up, down)
    check_moe_inputs(x, gate_up, down, weights, ids)
    k = ids.shape[1]
    order, ends = sort_by_expert(ids, gate_up.shape[0])
    token = order // k
    gate, up = _GroupedLinear.apply(x[token], gate_up, ends).chunk(2, dim=-1)
    y = _GroupedLinear.apply(F.silu(gate) * up, down, ends)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add(0, token, y)


def load_balancing_loss_ref(
    router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers, as transformers computes it.

    router_logits: one [N, E] tensor per MoE layer; token_mask [N] (1 = real token, 0 = padding, which
    is excluded). With f_e = (top-k assignments to e) / (tokens) and P_e = mean router probability of e,
    both pooled over layers and tokens: aux = E * sum_e f_e * P_e (so f sums to k; uniform routing
    gives aux = k).
    """
    E = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask = torch.ones(router_logits[0].shape[0], device=device) if token_mask is None else token_mask.float()
    counts = torch.zeros(E, device=device)
    prob_sum = torch.zeros(E, device=device)
    rows = 0.0
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        _, ids = torch.topk(probs, top_k, dim=-1)
        counts = counts.scatter_add(0, ids.reshape(-1), mask.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    return E * torch.sum((counts / rows) * (prob_sum / rows))
