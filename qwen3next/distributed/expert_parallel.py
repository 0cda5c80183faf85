"""The sparse-MoE block under tensor and/or expert parallelism.

Expert parallel (ep > 1): the routed experts are sharded E / ep per rank (`experts.*` Shard(0) on the
ep mesh). The ep ranks hold the same tokens; each takes its share of them (uneven allowed), routes
with the replicated router, and sends each token once to every rank that owns any of its experts, with
an all-to-all of uneven splits (the counts are exchanged first; `dispatch_to_experts`). The owner runs
the token's (token, slot) pairs with the grouped expert op (`ops.moe_experts`), sums their weighted
results and sends one row back; the shares are all-gathered so every ep rank again holds all tokens.
The router's logits cover all tokens on every ep rank, so the load-balancing loss is exactly one
process's.

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
    down [E_r, D, I]; cast to x's dtype).

    A token travels once to each rank that holds any of its k experts, with its slots there (local expert
    ids, -1 for slots elsewhere, and their routing weights); that rank runs the token's pairs, sums their
    weighted results and sends one row back. So a token costs one row per rank it visits, not one per
    slot (k = 10 over 2 ranks: 5x fewer bytes than sending every pair). Two uneven all-to-alls of rows
    (plus the slots beside them); the counts go through the host once. No atomic adds: the sums are over
    dense [rows, slots] and [ranks, tokens] layouts, so the result does not depend on thread timing."""
    gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
    n_ranks, e_local, (N, k) = comm.group_size(group), gate_up.shape[0], ids.shape
    dest = ids // e_local  # [N, k] the rank of each slot's expert
    slot_on = dest[None, :, :] == torch.arange(n_ranks, device=ids.device)[:, None, None]  # [R, N, k]
    visits = slot_on.any(-1)  # [R, N]: token n goes to rank r
    counts = torch.stack([visits.sum(1), slot_on.sum((1, 2))], 1)  # [R, 2]: rows and pairs sent to each rank
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    (send_rows, _), (recv_rows, recv_pairs) = torch.stack([counts.t(), recv_counts.t()]).tolist()  # one sync
    # the rows to send, rank by rank, each rank's tokens in order: flat positions r * N + n of `visits`
    sent = torch.argsort((~visits).flatten().to(torch.int8), stable=True)[: sum(send_rows)]
    rank_of, token = sent // N, sent % N
    mine = slot_on[rank_of, token]  # [S, k] which of the row's slots that rank serves
    local_ids = torch.where(mine, ids[token] - rank_of[:, None] * e_local, -1)
    x_in = comm.all_to_all(x[token], recv_rows, send_rows, group)
    ids_in = comm.all_to_all_raw(local_ids.contiguous(), recv_rows, send_rows, group)
    w_in = comm.all_to_all(torch.where(mine, weights[token], 0).contiguous(), recv_rows, send_rows, group)
    # this rank's pairs: flat positions row * k + slot of the slots it serves, row by row
    pair = torch.argsort((ids_in < 0).flatten().to(torch.int8), stable=True)[: sum(recv_pairs)]
    row = pair // k
    y_pairs = ops.moe_experts(x_in[row], gate_up, down, w_in.flatten()[pair, None], ids_in.flatten()[pair, None])
    y_rows = y_pairs.new_zeros(x_in.shape[0] * k, x.shape[1]).index_copy(0, pair, y_pairs)
    with torch.autocast(x.device.type, enabled=False):  # CUDA autocast would sum, and send, in fp32
        y_back = comm.all_to_all(y_rows.view(-1, k, x.shape[1]).sum(1), send_rows, recv_rows, group)
        out = y_back.new_zeros(n_ranks * N, x.shape[1]).index_copy(0, sent, y_back)
        return out.view(n_ranks, N, -1).sum(0)


def moe_forward(module, inner, tp: TPRuntime, ep: EPRuntime, x: torch.Tensor):
    """SparseMoE.forward's contract (replacing `inner`): x [B, T, D], this rank's residual-stream
    tokens -> (y like x, router logits [B*T, E] of these tokens). The module's parameters are the
    local views its decoder layer put in place."""
    flat = x.reshape(-1, x.shape[-1])
    router_logits = F.linear(flat, module.gate.weight)
    weights, ids = ops.route(router_logits, module.top_k, module.norm_topk_prob)
    gate_up, down = module.experts.gate_up_proj, module.experts.down_proj

    x_all = tp.enter(flat)  # all tokens when the residual stream is sequence-parallel
    partial = ops.sigmoid_gate(module.shared_expert(x_all), module.shared_expert_gate(x_all))
    if ep.size > 1 and not ep.shares_tokens:
        routed = dispatch_to_experts(flat, weights, ids, gate_up, down, ep.group)  # this rank's own tokens
        return (tp.exit(partial) + routed).view_as(x), router_logits
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

