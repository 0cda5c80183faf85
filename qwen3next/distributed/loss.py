"""The causal-LM loss and the load-balancing loss over the global batch, from each rank's share.

Tokens are spread over ranks (rows over dp_shard, sequence parts over cp, sequence-parallel pieces
over tp) and the vocabulary over tp. Each rank computes sufficient statistics of its share, they are
summed over the groups that split the tokens, and every rank ends with the loss one process would
compute on the whole batch. The sums' backward is the identity (`comm.all_reduce`), so each rank
back-propagates its own share and the parameter gradients add up over ranks to one process's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import comm


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group):
    """Per-token cross-entropy of vocab-sharded logits [N, V_r] (this rank holds vocab ids
    vocab_start .. vocab_start + V_r - 1) against targets [N] (-100: ignored, loss 0). The log-sum-exp
    and the target logit are summed over the group; no rank ever holds the full [N, V]."""
    logits = logits.float()
    shift = comm.all_reduce_max_(logits.detach().max(dim=-1).values, group)
    shifted = logits - shift[:, None]
    sum_exp = comm.all_reduce(shifted.exp().sum(dim=-1), group)
    valid = targets != -100
    rel = targets - vocab_start
    mine = valid & (rel >= 0) & (rel < logits.shape[-1])
    picked = shifted.gather(1, rel.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(1) * mine
    target_logit = comm.all_reduce(picked, group)
    return (sum_exp.log() - target_logit) * valid


def global_mean(per_token: torch.Tensor, valid: torch.Tensor, groups) -> torch.Tensor:
    """sum(per_token) / count(valid) over every rank of `groups` (the groups that split the tokens)."""
    total, count = per_token.sum(), valid.sum().to(per_token.dtype)
    for g in groups:
        total = comm.all_reduce(total, g)
        count = comm.all_reduce(count.detach(), g)
    return total / count


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None, groups):
    """`ops.load_balancing_loss` over the union of the ranks' tokens: E * sum_e f_e * P_e with the
    assignment counts, router-probability sums and token counts summed over `groups`.
    router_logits: this rank's [N_r, E] per MoE layer; token_mask [N_r] or None."""
    E = router_logits[0].shape[-1]
    mask = torch.ones(router_logits[0].shape[0], device=router_logits[0].device) if token_mask is None else token_mask.float()
    counts = torch.zeros(E, device=mask.device)
    prob_sum = torch.zeros(E, device=mask.device)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        ids = torch.topk(probs, top_k, dim=-1).indices
        counts = counts.scatter_add(0, ids.reshape(-1), mask.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
    rows = mask.sum() * len(router_logits)
    stats = torch.cat([counts, rows[None]])
    for g in groups:
        if comm.group_size(g) > 1:
            dist.all_reduce(stats, group=g)
        prob_sum = comm.all_reduce(prob_sum, g)
    counts, rows = stats[:E], stats[E]
    return E * torch.sum((counts / rows) * (prob_sum / rows))
