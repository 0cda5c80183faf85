"""The sparse-MoE block under tensor and/or expert parallelism.

Expert parallel (ep > 1): the routed experts are sharded E / ep per rank (`experts.*` Shard(0) on the
ep mesh). The ep ranks hold the same tokens; each takes its share of them (uneven allowed), routes
with the replicated router, and sends every (token, slot) pair to the rank owning its expert with an
all-to-all of uneven splits (the counts are exchanged first). The owner runs its experts on what it
received with the grouped expert op (`ops.moe_experts`), the results travel back the same way, are
weighted and summed per token, and the shares are all-gathered so every ep rank again holds all
tokens. The router's logits cover all tokens on every ep rank, so the load-balancing loss is exactly
one process's.

Expert parallel over the data ranks (`ParallelDims(ep_in_dp=True)`): each ep rank has its own tokens,
sends all of them to their experts and keeps its results; no split, no gather. The experts' gradients
then already sum over the ep group's tokens (the all-to-all's backward); the ranks that hold the same
experts but other tokens ("expert_dp") sum them once more. FSDP leaves the experts alone there: they are
sharded by ep, and replicated over "expert_dp".

Tensor parallel (tp > 1): the shared expert is column/row parallel; the routed experts too when
ep = 1 (expert tensor parallelism: each rank holds its slice of every expert's intermediate dim),
so routed and shared outputs are partial sums reduced together in one reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from . import comm
from .tensor_parallel import TPRuntime, local


class EPRuntime:
    """The ep group; `shares_tokens`: whether its ranks hold the same tokens (False under ep_in_dp);
    `replica_group`: the ranks with the same experts and other tokens (ep_in_dp only, else None)."""

    def __init__(self, mesh, shares_tokens: bool = True, replica_group=None):
        self.mesh = mesh
        self.group = None if mesh is None else mesh.get_group()
        self.size = comm.group_size(self.group)
        self.rank = comm.group_rank(self.group)
        self.shares_tokens = shares_tokens
        self.replica_group = replica_group


def expert_rules(tp: TPRuntime, ep: EPRuntime) -> dict:
    """Local views of the ep-sharded experts; they are replicated over tp, where (under SP) each rank
    routes its own tokens, so there their gradients also sum over tp (and over ep's replica group)."""
    return {name: (lambda w: comm.grad_all_reduce(tp.data_sum(local(w)), ep.replica_group))
            for name in ("experts.gate_up_proj", "experts.down_proj")}


def check_ep(config, ep: int) -> list[str]:
    if ep > 1 and (config.num_experts == 0 or config.num_experts % ep):
        return [f"ep={ep} must divide num_experts={config.num_experts}"]
    return []


def dispatch_to_experts(x, weights, ids, gate_up, down, group) -> torch.Tensor:
    """sum_s weights[n, s] * expert_{ids[n, s]}(x[n]) for this rank's tokens x [N, D], with the experts
    spread over `group` (this rank holds experts rank * E_r .. (rank + 1) * E_r - 1: gate_up [E_r, 2I, D],
    down [E_r, D, I]; cast to x's dtype). Two uneven all-to-alls: pairs out to their experts' ranks,
    results back."""
    gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
    n_ranks, e_local, k = comm.group_size(group), gate_up.shape[0], ids.shape[1]
    flat_ids = ids.reshape(-1)
    dest = flat_ids // e_local
    order = torch.argsort(dest, stable=True)  # pairs grouped by destination rank
    token = order // k
    send = torch.bincount(dest, minlength=n_ranks)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send, recv = send.tolist(), recv.tolist()
    x_in = comm.all_to_all(x[token], recv, send, group)
    e_in = comm.all_to_all_raw((flat_ids[order] - dest[order] * e_local)[:, None].contiguous(), recv, send, group)
    y_in = ops.moe_experts(x_in, gate_up, down, x_in.new_ones(x_in.shape[0], 1), e_in)
    y = comm.all_to_all(y_in, send, recv, group) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, y)


def moe_forward(module, inner, tp: TPRuntime, ep: EPRuntime, x: torch.Tensor):
    """SparseMoE.forward's contract (replacing `inner`): x [B, T, D], this rank's residual-stream
    tokens -> (y like x, router logits [B*T, E] of these tokens). The module's parameters are the
    local views its decoder layer put in place."""
    flat = x.reshape(-1, x.shape[-1])
    router_logits = F.linear(flat, module.gate.weight)
    weights, ids = ops.route(router_logits, module.top_k, module.norm_topk_prob)
    gate_up, down = module.experts.gate_up_proj, module.experts.down_proj

    x_all = tp.enter(flat)  # all tokens when the residual stream is sequence-parallel
    partial = module.shared_expert(x_all) * torch.sigmoid(module.shared_expert_gate(x_all))
    if ep.size > 1 and not ep.shares_tokens:
        return (tp.exit(partial) + dispatch_to_experts(flat, weights, ids, gate_up, down, ep.group)).view_as(x), router_logits
    if ep.size > 1:
        sizes = comm.split_sizes(flat.shape[0], ep.size)
        start = sum(sizes[: ep.rank])
        mine = dispatch_to_experts(
            comm.split(flat, 0, sizes, ep.group), comm.split(weights, 0, sizes, ep.group),
            ids[start : start + sizes[ep.rank]], gate_up, down, ep.group,
        )
        routed = comm.gather(mine, 0, sizes, ep.group)
        return (tp.exit(partial) + routed).view_as(x), router_logits
    if tp.sp:
        ids = comm.all_gather_raw(ids, 0, [ids.shape[0]] * tp.size, tp.group)
    partial = partial + ops.moe_experts(x_all, gate_up, down, tp.enter(weights), ids)
    return tp.exit(partial).view_as(x), router_logits

