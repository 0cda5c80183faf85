"""The causal-LM loss and the load-balancing loss over the global batch, from each rank's share.

Tokens are spread over ranks (rows over dp_shard, sequence parts over cp, sequence-parallel pieces
over tp) and the vocabulary over tp. Each rank computes sufficient statistics of its share, they are
summed over the groups that split the tokens, and every rank ends with the loss one process would
compute on the whole batch. The sums' backward is the identity (`comm.all_reduce`), so each rank
back-propagates its own share and the parameter gradients add up over ranks to one process's.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def global_sum(x: torch.Tensor, groups) -> torch.Tensor:
    """x summed over every rank of `groups` (the groups that split the tokens); the backward is the
    identity, so each rank back-propagates its own share."""
    for g in groups:
        x = comm.all_reduce(x, g)
    return x


@dataclass
class RoutingStats:
    """What the load-balancing loss needs of a set of tokens; statistics of disjoint sets add up.
    layer_counts [L, E]: top-k assignments per MoE layer and expert; prob_sum [E]: router probabilities
    summed over tokens and layers (differentiable); rows: tokens x layers."""

    layer_counts: torch.Tensor
    prob_sum: torch.Tensor
    rows: torch.Tensor

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(self.layer_counts + other.layer_counts, self.prob_sum + other.prob_sum,
                            self.rows + other.rows)

    def loss(self) -> torch.Tensor:
        """E * sum_e f_e * P_e, f_e and P_e pooled over the layers and tokens (`ops.load_balancing_loss`)."""
        E = self.prob_sum.shape[0]
        return E * torch.sum((self.layer_counts.sum(0) / self.rows) * (self.prob_sum / self.rows))


def routing_statistics(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None,
                       groups) -> RoutingStats:
    """The statistics of the union of the ranks' tokens (summed over `groups`). router_logits: this
    rank's [N_r, E] per MoE layer; token_mask [N_r] (0: padding, left out) or None."""
    E = router_logits[0].shape[-1]
    mask = torch.ones(router_logits[0].shape[0], device=router_logits[0].device) if token_mask is None else token_mask.float()
    counts, prob_sum = [], torch.zeros(E, device=mask.device)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        ids = torch.topk(probs, top_k, dim=-1).indices
        counts.append(torch.zeros(E, device=mask.device).scatter_add(0, ids.reshape(-1), mask.repeat_interleave(top_k)))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
    rows = mask.sum() * len(router_logits)
    stats = torch.cat([torch.stack(counts).flatten(), rows[None]])
    for g in groups:
        if comm.group_size(g) > 1:
            dist.all_reduce(stats, group=g)
    return RoutingStats(stats[:-1].view(len(router_logits), E), global_sum(prob_sum, groups), stats[-1])

