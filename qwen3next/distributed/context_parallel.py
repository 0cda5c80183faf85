"""Context parallelism: each rank holds a contiguous part of the sequence (uneven parts allowed).

Gated DeltaNet, by state passing (no all-to-all of activations). Per value head the recurrence is
affine in the state: S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, so a rank's whole
segment maps its incoming state as S_out = M S_in + B (M [dk, dk], B [dk, dv]). The state's columns
evolve independently, so both come out of runs of the chunked rule at the layer's own widths: B is the
final state of a run on v from zero, M that of a run on zero values from the identity (not one run on
[v | 0] of width dv + dk: the kernels are tuned and checked at the model's head sizes, and on Hopper with
Triton < 3.7.1 a wider backward takes the reference path). Every rank computes its
(M, B) at once; they are all-gathered (small matrices per head); rank r folds
those of ranks 0..r-1 into its true initial state; then it runs the rule on its segment from that
state. Everything is differentiable through the op itself, so the backward is exact; the gather's
backward reduce-scatters each rank's (M, B) gradient back to its owner.

The causal conv needs the previous rank's last K-1 inputs; softmax attention all-gathers K/V (two KV
heads in Qwen3-Next) and masks causally at the query's global offset.

Packed documents (`cu_seqlens`, the whole row's offsets): a rank's slice may start inside a document
or at its first token. Within the slice the ops run the documents apart as usual; only the slice's
first document continues from the previous rank (state and conv inputs of that document alone), and
a slice that holds a document start passes on M = 0 (what came before no longer matters). Attention
masks causally within each document.

Both layers keep their own forward: attention gets the gathered K/V through the cache interface
(`append`); Gated DeltaNet calls its ops through its `ops` attribute, which `parallelize` sets to a
`ContextParallelOps`.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from .. import ops
from . import comm


class CPRuntime:
    """What the context-parallel ops need from the current forward call: the group, every rank's length
    and, for packed documents, the document of every position of the whole row."""

    def __init__(self, group):
        self.group = group
        self.size = comm.group_size(group)
        self.rank = comm.group_rank(group)
        self.sizes: list[int] = []  # every rank's sequence length in the current forward call
        self.documents: torch.Tensor | None = None  # [sum(sizes)] document index per position, or None
        self.continues = self.rank > 0  # whether this slice's first token continues the previous rank's sequence

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    def start(self, sizes: list[int], cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
        """Set up a forward call: every rank's length, and the packed documents from the whole row's
        offsets `cu_seqlens` [N+1] (or None). Returns this slice's own offsets [n+1] (or None)."""
        self.sizes = sizes
        total, lo, hi = sum(sizes), self.offset, self.offset + sizes[self.rank]
        if cu_seqlens is None:
            self.documents, self.continues = None, self.rank > 0
            return None
        first = last = starts_here = None
        if cu_seqlens.dim() == 1 and len(cu_seqlens):  # one host round trip for the checks and `continues`
            first, last, starts_here = torch.stack([cu_seqlens[0], cu_seqlens[-1], (cu_seqlens == lo).any()]).tolist()
        if first != 0 or last != total:
            raise ValueError(f"under context parallelism cu_seqlens are the offsets of the whole row (0 .. {total}; "
                             f"every cp rank passes the same); got {cu_seqlens.tolist()}")
        self.continues = self.rank > 0 and not starts_here  # no document starts at the slice's first token
        self.documents = torch.searchsorted(cu_seqlens[1:], torch.arange(total, device=cu_seqlens.device), right=True)
        inner = cu_seqlens[(cu_seqlens > lo) & (cu_seqlens < hi)] - lo
        return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), hi - lo)])

    def tail_mask(self, n: int) -> torch.Tensor:
        """[n] 1.0 where position offset - n + j lies in this slice's first document, else 0.0."""
        pos = torch.arange(self.offset - n, self.offset, device=self.documents.device)
        same = self.documents[pos.clamp(min=0)] == self.documents[self.offset]
        return (same & (pos >= 0)).float()


class _IncomingState(torch.autograd.Function):
    """All-gather every rank's affine map [B, Hv, dk, dv + dk] = (B_j | M_j) and fold those of the
    ranks before this one into its true initial state (rank 0: `initial`). Every rank takes part in
    the backward (a reduce-scatter of the maps' gradients), whatever it used, so the ranks' collectives
    stay in step."""

    @staticmethod
    def forward(ctx, affine, initial, group):
        every = comm.all_gather_raw(affine.unsqueeze(0).contiguous(), 0, [1] * comm.group_size(group), group)
        ctx.save_for_backward(every, initial)
        ctx.group = group
        return _fold(every, initial, comm.group_rank(group)).clone()

    @staticmethod
    def backward(ctx, grad):
        every, initial = ctx.saved_tensors
        every, initial = every.detach().requires_grad_(), initial.detach().requires_grad_()
        with torch.enable_grad():
            out = _fold(every, initial, comm.group_rank(ctx.group))
            g_every, g_initial = torch.autograd.grad(out, (every, initial), grad, allow_unused=True)
        g_every = torch.zeros_like(every) if g_every is None else g_every
        g_affine = comm.reduce_scatter_raw(g_every, 0, [1] * every.shape[0], ctx.group)[0]
        return g_affine, g_initial, None


def _fold(every, initial, rank):
    """The state entering rank `rank`'s segment: S_{j+1} = M_j S_j + B_j over the ranks before it.
    Rank 0's map already starts from the sequence's initial state, so the fold starts from its B."""
    if rank == 0:
        return initial
    dv = initial.shape[-1]
    state = every[0, ..., :dv]
    for j in range(1, rank):
        state = every[j, ..., dv:] @ state + every[j, ..., :dv]
    return state


def cp_gated_delta_rule(rule, cp: CPRuntime, q, k, v, g, beta, scale=None, initial_state=None,
                        output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kw):
    """`rule`'s contract (see `ops.chunk_gated_delta_rule`) on this rank's segment of the sequence,
    run from the segment's true initial state. `initial_state` is the state before the whole
    sequence, read on the first rank only; the final state returned is the one after this rank's
    segment (on the last rank: after the whole sequence). With packed documents, `cu_seqlens` are
    this slice's offsets (`CPRuntime.start`); only its first document continues a previous rank's."""
    B, _, Hv, dv = v.shape
    dk = k.shape[-1]
    if cu_seqlens is not None and initial_state is not None:
        raise ValueError("context parallelism over packed documents starts every document from zero (no initial_state)")
    n = B if cu_seqlens is None else len(cu_seqlens) - 1  # the sequences: rows, or this slice's documents
    first = n if cu_seqlens is None else 1  # how many of them may continue from the previous rank
    state_dtype = torch.promote_types(v.dtype, torch.float32)  # the rule's state dtype
    start = v.new_zeros(n, Hv, dk, dv, dtype=state_dtype)
    if cp.rank == 0 and initial_state is not None:
        start = initial_state.to(state_dtype)
    # this segment's map (B | M): B from `start` on v, M from I on zero values. The last rank's is not
    # needed, but computing it costs no time (the others compute theirs meanwhile) and keeps every rank's
    # autograd graph, hence its order of collectives in the backward, the same. A sequence that does not
    # continue (a later document, or a first one that starts here) starts from [0 | 0], M = 0.
    carry = torch.zeros(n, 1, 1, 1, dtype=state_dtype, device=v.device)
    carry[:first] = 1.0 if cp.continues or cp.rank == 0 else 0.0
    eye = torch.eye(dk, dtype=state_dtype, device=v.device).expand(n, Hv, dk, dk) * carry

    def final_state(values, state):
        return rule(q, k, values, g, beta, scale=scale, initial_state=state, output_final_state=True,
                    use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens, **kw)[1]

    affine = torch.cat([final_state(v, start), final_state(v.new_zeros(B, v.shape[1], Hv, dk), eye)], dim=-1)
    # the map of the whole slice is that of the sequence reaching its end (its last document)
    s_in = _IncomingState.apply(affine[n - first:], start[:first], cp.group) * carry[:first]
    return rule(q, k, v, g, beta, scale=scale, initial_state=torch.cat([s_in, start[first:]]),
                output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                cu_seqlens=cu_seqlens, **kw)


class _PreviousTail(torch.autograd.Function):
    """The previous rank's last K-1 conv inputs [B, C, K-1] (rank 0: `initial`); the backward returns
    each tail's gradient to its owner (a reduce-scatter every rank joins)."""

    @staticmethod
    def forward(ctx, tail, initial, group):
        n, rank = comm.group_size(group), comm.group_rank(group)
        tails = comm.all_gather_raw(tail.unsqueeze(0).contiguous(), 0, [1] * n, group)
        ctx.group = group
        return tails[rank - 1] if rank > 0 else initial.clone()

    @staticmethod
    def backward(ctx, grad):
        n, rank = comm.group_size(ctx.group), comm.group_rank(ctx.group)
        every = grad.new_zeros(n, *grad.shape)
        if rank > 0:
            every[rank - 1] = grad
        return comm.reduce_scatter_raw(every, 0, [1] * n, ctx.group)[0], (grad if rank == 0 else None), None


def cp_causal_conv1d(conv, cp: CPRuntime, x, weight, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **kw):
    """`conv`'s contract (see `ops.causal_conv1d`) on this rank's segment: the first K-1 outputs read
    the previous rank's last K-1 inputs (with packed documents: those of the slice's first document;
    `cu_seqlens` are this slice's offsets). `initial_state` is read on the first rank only."""
    if cu_seqlens is not None and initial_state is not None:
        raise ValueError("context parallelism over packed documents starts every document from zero (no initial_state)")
    K = weight.shape[-1]
    tail = x[:, x.shape[1] - (K - 1):].transpose(1, 2)  # [B, C, K-1]: this rank's last inputs
    initial = x.new_zeros(tail.shape) if initial_state is None else initial_state.to(x.dtype)
    state = _PreviousTail.apply(tail, initial, cp.group)
    if cu_seqlens is not None:  # the slice's later documents start from zeros
        state = torch.cat([state * cp.tail_mask(K - 1).to(x.dtype), state.new_zeros(len(cu_seqlens) - 2, *state.shape[1:])])
    return conv(x, weight, initial_state=state, output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kw)


class ContextParallelOps:
    """`qwen3next.ops` as a Gated DeltaNet layer sees it under cp (its `ops` attribute): the causal conv
    (alone and after the qkvz split) and the gated delta rule replaced by their context-parallel forms, every
    other op the same."""

    def __init__(self, cp: CPRuntime):
        self.cp = cp

    def __getattr__(self, name):
        return getattr(ops, name)

    def causal_conv1d(self, *args, **kwargs):
        return cp_causal_conv1d(ops.causal_conv1d, self.cp, *args, **kwargs)

    def qkvz_causal_conv1d(self, qkvz, weight, num_k_heads, num_v_heads, head_k_dim, head_v_dim, **kwargs):
        """The split, then the context-parallel conv (which exchanges q, k, v columns, not the projection's)."""
        mixed, z = ops.split_qkvz(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
        y, final = self.causal_conv1d(mixed, weight, **kwargs)
        return y, z.unflatten(-2, (num_k_heads, num_v_heads // num_k_heads)), final

    def chunk_gated_delta_rule(self, *args, **kwargs):
        return cp_gated_delta_rule(ops.chunk_gated_delta_rule, self.cp, *args, **kwargs)

    def fused_recurrent_gated_delta_rule(self, *args, **kwargs):
        return cp_gated_delta_rule(ops.fused_recurrent_gated_delta_rule, self.cp, *args, **kwargs)

    def causal_conv1d_update(self, *args, **kwargs):
        raise ValueError("context parallelism is for prefill and training; decode a sequence on one rank")


class _GatheredKV:
    """Stands in for an attention layer's cache: `append` returns the keys and values of the whole sequence
    up to position `end` (exclusive), gathered from every rank."""

    def __init__(self, cp: CPRuntime, end: int):
        self.cp, self.end = cp, end

    def append(self, key, value):
        gather = lambda t: comm.gather(t, 2, self.cp.sizes, self.cp.group, partial_consumers=True)  # noqa: E731
        return gather(key)[:, :, : self.end], gather(value)[:, :, : self.end]


def cp_attention_forward(module, inner, cp: CPRuntime, x, cos, sin, attn_mask=None, cache=None):
    """The layer's own forward for this rank's queries against the keys and values up to the end of its
    slice (all-gathered along the sequence). Plain sequences: causal aligned to the last key
    (`causal_lower_right`, no mask is materialised: flash attention); packed documents: a boolean mask,
    causal at the queries' global positions and within each document (the model's own `attn_mask`
    describes this slice alone, and is replaced)."""
    if cache is not None or (attn_mask is not None and cp.documents is None):
        raise ValueError("context parallelism takes plain causal sequences: no attention mask or cache")
    T = x.shape[1]
    end = cp.offset + T
    if cp.documents is None:
        return inner(x, cos, sin, causal_lower_right(T, end), _GatheredKV(cp, end))
    q_pos = torch.arange(T, device=x.device) + cp.offset
    documents = cp.documents.to(x.device)
    causal = q_pos[:, None] >= torch.arange(end, device=x.device)[None, :]
    mask = causal & (documents[q_pos][:, None] == documents[None, :end])
    return inner(x, cos, sin, mask[None, None], _GatheredKV(cp, end))
