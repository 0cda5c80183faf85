"""Reference mixture-of-experts pieces: top-k routing, the routed SwiGLU experts, the load-balancing loss.

Experts are stored stacked: gate_up [E, 2I, D] (rows 0..I-1 the gate projection, I..2I-1 the up
projection) and down [E, D, I]. Tokens are flattened: x [N, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
