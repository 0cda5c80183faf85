"""Reference gated delta rule: the recurrence (decode) and its chunked form (prefill, training).

Per value head, with state S in R^{dk x dv}, decay a_t = exp(g_t) (g_t <= 0) and write strength beta_t:

    S_t = a_t * S_{t-1}
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T     # delta rule: write only what S mispredicts for k_t
    o_t = S_t^T (scale * q_t)

Shapes (fla-compatible): q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; states
[N, Hv, dk, dv] (N = B, or the number of packed sequences). Hv is a multiple of Hk (grouped value
attention): key head j serves value heads j*r .. j*r + r - 1, r = Hv / Hk (repeat_interleave).
`cu_seqlens` [N+1] (int) packs N sequences into one row (B = 1); each runs as if alone.
Arithmetic is fp32 (fp64 when any input is fp64); o comes back in v's dtype, the state in fp32/fp64.
"""

from __future__ import annotations

import torch

from .norms import l2_norm_ref
from .packing import PaddedLayout, length_groups


def check_gated_delta_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    """Validate shapes and dtypes; return N, the number of sequences (rows of the state)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, Hk, dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, Hv, dv] with B={B}, T={T}; got {tuple(v.shape)}")
    Hv, dv = v.shape[2], v.shape[3]
    if Hv % Hk:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}; got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: batch size must be 1, got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or len(cu_seqlens) < 2:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of N+1 offsets")
        if bool((cu_seqlens[0] != 0) | (cu_seqlens[-1] != T) | (cu_seqlens[1:] < cu_seqlens[:-1]).any()):  # one sync
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}; got {cu_seqlens.tolist()}")
        N = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, Hv, dk, dv):
        raise ValueError(f"initial_state must be [N, Hv, dk, dv] = {(N, Hv, dk, dv)}; got {tuple(initial_state.shape)}")
    return N


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _heads_first(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    """To [B, Hv, T, d] in the compute dtype, q/k repeated over their value-head group, q scaled."""
    dtype = _compute_dtype(q, k, v, g, beta)
    r = v.shape[2] // q.shape[2]
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    g, beta = (x.to(dtype).transpose(1, 2) for x in (g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2_norm_ref(q), l2_norm_ref(k)
    q = q * (scale if scale is not None else q.shape[-1] ** -0.5)
    if r > 1:
        q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)
    return q, k, v, g, beta


def _varlen(fn, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens):
    """Run `fn` on packed sequences laid out as padded batches [n, L], sequences of similar length together
    (`length_groups`: padding at most doubles the work, however unequal the lengths). Padding steps get
    g = 0 and beta = 0, so they leave the state unchanged; their outputs are dropped."""
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    groups = length_groups(lengths)
    outs, positions, states = [], [], []
    for group in groups:
        layout = PaddedLayout.from_spans(starts[group], lengths[group], q.shape[1])
        valid = layout.valid[..., None].to(g.dtype)
        o, state = fn(
            layout.pad(q), layout.pad(k), layout.pad(v), layout.pad(g) * valid, layout.pad(beta) * valid,
            scale=scale, initial_state=initial_state[group] if initial_state is not None else None,
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )
        outs.append(layout.unpad(o))
        positions.append(layout.positions)
        states.append(state)
    if len(groups) == 1:  # the sequences in order: the row as it was
        return outs[0], states[0]
    o = torch.cat(outs, dim=1).index_select(1, torch.cat(positions).argsort())
    state = torch.cat(states).index_select(0, torch.cat(groups).argsort()) if output_final_state else None
    return o, state


def recurrent_gated_delta_rule_ref(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None,
):
    """The recurrence, one step at a time. Returns (o [B, T, Hv, dv], final state [N, Hv, dk, dv] or None)."""
    check_gated_delta_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _varlen(recurrent_gated_delta_rule_ref, q, k, v, g, beta, scale, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)
    out_dtype = v.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    B, H, T, dk = k.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for t in range(T):
        S = S * g[:, :, t, None, None].exp()
        predicted = torch.einsum("bhkv,bhk->bhv", S, k[:, :, t])
        delta = beta[:, :, t, None] * (v[:, :, t] - predicted)
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o.to(out_dtype), (S if output_final_state else None)


def chunk_gated_delta_rule_ref(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_size=32,
):
    """The chunked (UT/WY) form: same contract and result as `recurrent_gated_delta_rule_ref`.

    Within a chunk of C steps, with cumulative log-decay c_i = g_1 + ... + g_i, the delta-rule writes
    d_i = beta_i (v_i - S_{i-1}^T k_i) solve the unit-lower-triangular system
        (I + A) d = beta v - (beta exp(c) k) S_0,   A_ij = beta_i exp(c_i - c_j) k_i.k_j  (j < i),
    so C sequential updates become matmuls: d = u - w S_0 with [u | w] = (I + A)^-1 [beta v | beta exp(c) k].
    Then, with attn_ij = exp(c_i - c_j) q_i.k_j (j <= i) and K_j = exp(c_C - c_j) k_j,
        o = attn d + exp(c) q S_0,      S_C = exp(c_C) S_0 + K^T d.
    Vectorised over batch, heads and positions; the only Python loop passes the state from chunk to
    chunk (computing each chunk's d on the way), then the outputs of all chunks are two products.
    Any chunk_size gives the same result; 32 was the fastest on a CPU (fp32, forward + backward) at
    head dims 32 to 128, from [8, 256] to [1, 2048] tokens.
    """
    check_gated_delta_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _varlen(chunk_gated_delta_rule_ref, q, k, v, g, beta, scale, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)
    out_dtype = v.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C if T else C  # an empty sequence runs one chunk of padding: the state passes through
    if pad:  # padded steps: g = 0 and beta = 0 change nothing
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)

    c = g.cumsum(-1)                                               # [B, H, n, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # exp(c_i - c_j), j <= i
    k_beta = k * beta[..., None]
    # `unitriangular` reads only A's strictly lower part (j < i) and takes the diagonal as 1: I + A
    A = (k_beta @ k.transpose(-1, -2)) * decay
    uw = torch.linalg.solve_triangular(A, torch.cat([v * beta[..., None], k_beta * c.exp()[..., None]], dim=-1),
                                       upper=False, unitriangular=True)  # [u | w]: [B, H, n, C, dv + dk]
    k_to_end = (k * (c[..., -1:] - c).exp()[..., None]).transpose(-1, -2)  # K^T [B, H, n, dk, C]
    chunk_decay = c[..., -1, None, None].exp()                     # [B, H, n, 1, 1]

    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    starts, writes = [], []  # the state entering each chunk, the chunk's d
    chunks = (x.unbind(2) for x in (*uw.split([dv, dk], dim=-1), k_to_end, chunk_decay))  # unbind: one backward copy
    for u_i, w_i, k_i, decay_i in zip(*chunks):
        starts.append(S)
        writes.append(u_i - w_i @ S)
        S = S * decay_i + k_i @ writes[-1]
    attn = (q @ k.transpose(-1, -2)) * decay                       # [B, H, n, C, C], j <= i
    o = attn @ torch.stack(writes, dim=2) + (q * c.exp()[..., None]) @ torch.stack(starts, dim=2)
    o = o.reshape(B, H, n * C, dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)


def check_pool_update_inputs(q, k, v, g, beta, state_pool, state_indices) -> None:
    """Validate the inputs of a state-pool update (see `recurrent_gated_delta_rule_update_ref`)."""
    check_gated_delta_inputs(q, k, v, g, beta, None, None)
    B, dk, Hv, dv = q.shape[0], q.shape[3], v.shape[2], v.shape[3]
    if state_pool.dim() != 4 or tuple(state_pool.shape[1:]) != (Hv, dk, dv):
        raise ValueError(f"state_pool must be [P, Hv, dk, dv] with (Hv, dk, dv) = {(Hv, dk, dv)}; "
                         f"got {tuple(state_pool.shape)}")
    if state_pool.dtype != torch.float32 or not state_pool.is_contiguous():
        raise TypeError(f"state_pool must be a contiguous float32 tensor, got {state_pool.dtype}")
    if state_indices.shape != (B,) or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_indices must be an int32/int64 tensor of shape ({B},); "
                         f"got {state_indices.dtype} {tuple(state_indices.shape)}")


def recurrent_gated_delta_rule_update_ref(
    q, k, v, g, beta, state_pool, state_indices, scale=None, use_qk_l2norm_in_kernel=False,
):
    """Decode against a pool of states, in place (continuous batching).

    q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]: T new steps for each of B sequences.
    Sequence b's state is row `state_indices[b]` of `state_pool` [P, Hv, dk, dv] (float32): it starts
    the recurrence and receives the state after the T steps. A negative index marks a padding entry
    (o = 0, no row touched); the non-negative indices must be distinct. Returns o [B, T, Hv, dv] in v's dtype.
    """
    check_pool_update_inputs(q, k, v, g, beta, state_pool, state_indices)
    live = state_indices >= 0
    rows = state_indices.clamp(min=0).long()
    o, state = recurrent_gated_delta_rule_ref(
        q, k, v, g, beta, scale=scale, initial_state=state_pool[rows], output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )
    state_pool[rows[live]] = state[live].to(state_pool.dtype)
    return o * live.view(-1, 1, 1, 1).to(o.dtype)
