"""Triton mixture-of-experts: routing, grouped expert GEMMs, a decode path, and the backward of all of it.

Same contracts as `qwen3next.ops.moe` (`route_ref`, `moe_experts_ref`). With N tokens, k slots, E experts,
experts gate_up [E, 2I, D] (gate rows, then up rows) and down [E, D, I], and M = N*k (token, slot) rows:

  route    logits [N, E] -> weights [N, k], ids [N, k]: one kernel (softmax in fp32, k rounds of argmax,
           renormalisation).
  sort     ids -> order [M] (the flat pair index n*k + s of each row once sorted by expert) and ends [E]
           (cumulative rows per expert): a counting sort in two kernels, stable, no host sync (torch.sort
           beyond 262144 pairs).
  gate/up  act[r] = silu(x[t] . Wg[e]) * (x[t] . Wu[e]) for sorted row r = (token t, expert e): a grouped
           GEMM whose A rows are gathered from x, SiLU-times-up fused into its epilogue.
  down     Y[order[r]] = w[order[r]] * (act[r] . Wd[e]): a grouped GEMM with the routing weight applied
           and each row stored back at its (token, slot) position; out[t] = sum over s of Y[t, s], in slot
           order (one kernel): deterministic, no atomics.

On Hopper the forward's 128-row tiles read the weights through TMA descriptors (bulk copies, zero-filled
out of bounds); the gathered activation rows always go through pointer loads.

The grouped GEMM kernel maps its programs onto (expert, row tile) pairs itself: each program reads the
per-expert row ends and finds its expert by a prefix sum over tile counts, so the launch grid is an upper
bound known on the host and nothing waits for the device. Experts with no rows get no programs and are
never read. For a few tokens without gradients, `moe_experts` instead runs two GEMV kernels that read the
selected experts' rows directly (no sort, no padding to tiles); each token's k results are summed inside
the second kernel.

Backward (`_MoEExperts.backward`; the forward saves the pre-activations h, not act): dact' = dout[t] . Wd[e]
(grouped GEMM, gathered rows); one row kernel recomputes act from h and gives the routing-weight gradient
(dact' . act), dh = d(silu(g) * u) * w, and w * act; dx rows = dh . Wg/u[e] (grouped GEMM, scattered and
summed over slots like the forward); the weight gradients are grouped outer products over each expert's
rows, dWg/u from dh and x[t], dWd from dout[t] and w * act (the weight scales the narrow operand):
`torch._grouped_mm` on CUDA where present (faster there), else our kernel (one program per expert and
weight tile, a fixed row order: deterministic). Accumulation is fp32 everywhere; stored tensors take the
inputs' dtype.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..moe import _grouped_mm_takes, autocast_operands, check_moe_inputs, check_route_inputs, sort_by_expert
from . import cdiv, dot_precision, next_power_of_2

try:  # host-side TMA descriptors: Triton 3.4 on (older Triton reads the weights by pointers)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

DECODE_MAX_TOKENS = 4  # at most this many tokens (and no gradient): the GEMV decode path


# ----------------------------------------------------------------------------------------------------------
# routing


@triton.jit
def _row_softmax(logits, n, stride_l, E, BLOCK_E: tl.constexpr):
    """(expert indices [BLOCK_E], their mask, fp32 softmax of row n of the logits over its E experts)."""
    cols = tl.arange(0, BLOCK_E)
    valid = cols < E
    z = tl.load(logits + n * stride_l + cols, mask=valid, other=-float("inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, 0))
    return cols, valid, p / tl.sum(p, 0)


@triton.jit
def _route_fwd_kernel(logits, weights, ids, E, stride_l, K: tl.constexpr, NORM: tl.constexpr,
                      BLOCK_E: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols, valid, p = _row_softmax(logits, n, stride_l, E, BLOCK_E)
    cand = tl.where(valid, p, -1.0)  # probabilities are >= 0: -1 marks "taken" and padding
    slot = tl.full([BLOCK_E], -1, tl.int32)
    for j in range(K):
        best = tl.max(cand, 0)
        pick = tl.min(tl.where(cand == best, cols, BLOCK_E), 0)  # ties: the lowest expert index
        slot = tl.where(cols == pick, j, slot)
        cand = tl.where(cols == pick, -1.0, cand)
    chosen = slot >= 0
    if NORM:
        p = p / tl.sum(tl.where(chosen, p, 0.0), 0)
    tl.store(weights + n * K + slot, p.to(weights.dtype.element_ty), mask=chosen)
    tl.store(ids + n * K + slot, cols.to(tl.int64), mask=chosen)


@triton.jit
def _route_bwd_kernel(logits, ids, dweights, dlogits, E, stride_l, stride_dl, K: tl.constexpr,
                      NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols, valid, p = _row_softmax(logits, n, stride_l, E, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    sel = tl.load(ids + n * K + slots, mask=slots < K, other=-1)
    g = tl.load(dweights + n * K + slots, mask=slots < K, other=0.0).to(tl.float32)
    hit = sel[:, None] == cols[None, :]
    g_p = tl.sum(tl.where(hit, g[:, None], 0.0), 0)  # d loss / d (selected probability), per expert
    if NORM:  # w_j = p_j / S  =>  d/dp_i = (g_i - sum_j g_j w_j) / S on the selected experts
        chosen = tl.sum(hit.to(tl.int32), 0) > 0
        s = tl.sum(tl.where(chosen, p, 0.0), 0)
        g_p = tl.where(chosen, (g_p - tl.sum(g_p * p, 0) / s) / s, 0.0)
    dz = p * (g_p - tl.sum(g_p * p, 0))
    tl.store(dlogits + n * stride_dl + cols, dz.to(dlogits.dtype.element_ty), mask=valid)


def _route_forward(logits, top_k, norm_topk_prob):
    """(weights, ids) of `route`: the kernel's launch."""
    N, E = logits.shape
    weights = torch.empty(N, top_k, device=logits.device, dtype=logits.dtype)
    ids = torch.empty(N, top_k, device=logits.device, dtype=torch.int64)
    if N > 0:
        _route_fwd_kernel[(N,)](logits, weights, ids, E, logits.stride(0), K=top_k, NORM=norm_topk_prob,
                                BLOCK_E=next_power_of_2(E), num_warps=4)
    return weights, ids


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, norm_topk_prob):
        weights, ids = _route_forward(logits, top_k, norm_topk_prob)
        ctx.save_for_backward(logits, ids)
        ctx.norm = norm_topk_prob
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, dweights, _dids):
        logits, ids = ctx.saved_tensors
        N, E = logits.shape
        K = ids.shape[1]
        dlogits = torch.empty_like(logits)
        if N > 0:
            _route_bwd_kernel[(N,)](logits, ids, dweights.contiguous(), dlogits, E, logits.stride(0),
                                    dlogits.stride(0), K=K, NORM=ctx.norm, BLOCK_E=next_power_of_2(E),
                                    BLOCK_K=next_power_of_2(K), num_warps=4)
        return dlogits, None, None


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """`route_ref` in one kernel: router_logits [N, E] (last dim contiguous) -> (weights [N, k] in the logits'
    dtype, ids [N, k] int64). Ties go to the lower expert index. Differentiable in the logits."""
    check_route_inputs(router_logits, top_k)
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    if torch.is_grad_enabled() and router_logits.requires_grad:
        return _Route.apply(router_logits, top_k, bool(norm_topk_prob))
    return _route_forward(router_logits, top_k, bool(norm_topk_prob))  # no autograd node: less to launch


# ----------------------------------------------------------------------------------------------------------
# grouped GEMMs over expert-sorted rows


@triton.jit
def _expert_counts_kernel(ids, counts, M, E, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """counts[b, e] = pairs routed to expert e among pairs b*BLOCK .. (b+1)*BLOCK (BINS > E: a bin for padding)."""
    b = tl.program_id(0)
    idx = b * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(ids + idx, mask=idx < M, other=E).to(tl.int32)
    hist = tl.histogram(v, BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts + b * E + bins, hist, mask=bins < E)


@triton.jit
def _expert_scatter_kernel(ids, counts, offsets, order, ends, M, E, NB, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """Block b of the pairs: each pair's place once sorted by expert, stably, from the counts of every block:
    start of expert e + pairs of e in earlier blocks + the pair's rank among its block's pairs of e (a sort of
    the block's (expert, index) keys). offsets [NB, E] is scratch; program 0 also writes ends."""
    b = tl.program_id(0)
    bins = tl.arange(0, BINS)
    bmask = bins < E
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    for j in range(0, NB):
        c = tl.load(counts + j * E + bins, mask=bmask, other=0)
        total += c
        before += tl.where(j < b, c, 0)
    mine = tl.load(counts + b * E + bins, mask=bmask, other=0)
    start = tl.cumsum(total, 0) - total
    if b == 0:
        tl.store(ends + bins, start + total, mask=bmask)
    # sorted position p of a pair of expert e: its block rank r plus the block's pairs of experts < e
    tl.store(offsets + b * E + bins, start + before - (tl.cumsum(mine, 0) - mine), mask=bmask)
    tl.debug_barrier()
    local = tl.arange(0, BLOCK)
    idx = b * BLOCK + local
    v = tl.load(ids + idx, mask=idx < M, other=E).to(tl.int32)
    keys = tl.sort(v * BLOCK + local)  # unique keys: stable within an expert
    e = keys // BLOCK
    src = b * BLOCK + keys % BLOCK
    dest = tl.load(offsets + b * E + e, mask=e < E, other=0) + local
    tl.store(order + dest, src.to(tl.int64), mask=e < E)


SORT_BLOCK = 1024  # pairs a program of the expert sort takes: 26 us at 81920 pairs on an H100 (2048: 36, 4096: 104)
SORT_KERNEL_MAX_PAIRS = 262144  # beyond, torch.sort: every block of ours reads all blocks' counts (quadratic)


def _sort_by_expert(ids: torch.Tensor, num_experts: int):
    """`qwen3next.ops.moe.sort_by_expert` (the same order and ends: stable) as a counting sort in two launches,
    no host sync: each block of SORT_BLOCK pairs counts its experts; then each block places its pairs from all
    blocks' counts. (It replaced one kernel with a program per expert that scanned every pair, 117-146 us at
    8192 tokens x 10 slots over 512 experts on an H100, compute-bound on its scans; torch.sort's path takes 77.)
    Beyond SORT_KERNEL_MAX_PAIRS pairs, torch.sort."""
    M = ids.numel()
    if M > SORT_KERNEL_MAX_PAIRS:
        return sort_by_expert(ids, num_experts)
    order = torch.empty(M, device=ids.device, dtype=torch.int64)
    ends = torch.empty(num_experts, device=ids.device, dtype=torch.int32)
    block = min(SORT_BLOCK, next_power_of_2(max(M, 16)))
    nb = max(cdiv(M, block), 1)
    bins = next_power_of_2(num_experts + 1)
    counts = torch.empty(nb, num_experts, device=ids.device, dtype=torch.int32)
    offsets = torch.empty_like(counts)
    flat = ids.contiguous().view(-1)
    _expert_counts_kernel[(nb,)](flat, counts, M, num_experts, BLOCK=block, BINS=bins, num_warps=4)
    _expert_scatter_kernel[(nb,)](flat, counts, offsets, order, ends, M, num_experts, nb, BLOCK=block, BINS=bins,
                                  num_warps=8)
    return order, ends


@triton.jit
def _tile_segment(ends, E, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile `pid_m` of the expert-sorted rows -> (expert, first row, end of the expert's rows).
    Experts' tiles are numbered expert by expert; expert == E means the tile is past the last one."""
    e_idx = tl.arange(0, BLOCK_E)
    valid = e_idx < E
    seg_end = tl.load(ends + e_idx, mask=valid, other=0)
    seg_start = tl.load(ends + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = tl.where(valid, (seg_end - seg_start + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(tiles, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    mine = e_idx == e
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, seg_start, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return e, row0, tl.sum(tl.where(mine, seg_end, 0), 0)


@triton.jit
def _pairs(order, rows, rmask, LOAD: tl.constexpr):
    """The flat (token, slot) pair of each sorted row, from `order` (LOAD), else the row index itself."""
    if LOAD:
        pair = tl.load(order + rows, mask=rmask, other=0)
    else:
        pair = rows.to(tl.int64)
    return pair


@triton.jit
def _operand_rows(pair, rows, TOP_K: tl.constexpr, GATHER: tl.constexpr):
    """The operand row a sorted row reads: its token's (GATHER: pair // k) or its own."""
    if GATHER:
        src = pair // TOP_K
    else:
        src = rows.to(tl.int64)
    return src


@triton.jit
def _desc_tile(b, e, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile of expert e at output column n0 and reduction step k0, through the
    TMA descriptor b over the stacked weights [E, N, K] (block [1, BLOCK_N, BLOCK_K]); out-of-bounds elements
    read as zero."""
    return tl.trans(b.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))


@triton.jit
def _grouped_gemm_tile(
    a, b, c, h, order, scale, e, row0, row_end, pid_n, N_OUT, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_hm, up_offset,
    TOP_K: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, SCALE: tl.constexpr,
    SWIGLU: tl.constexpr, STORE_H: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
    B_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One output tile of `_grouped_gemm_kernel`: rows row0 .. row0 + BLOCK_M (masked at row_end) of expert
    e, columns pid_n * BLOCK_N .. + BLOCK_N."""
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    pair = _pairs(order, rows, rmask, GATHER_A or SCATTER_C or SCALE)
    a_rows = _operand_rows(pair, rows, TOP_K, GATHER_A)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a + a_rows[:, None] * stride_am + ks[None, :]
    if not B_DESC:
        b_ptrs = b + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # K % BLOCK_K == 0: no mask along K
            a_mask = rmask[:, None]
            b_mask = nmask[None, :]
        else:
            kmask = ks < K - k0
            a_mask = rmask[:, None] & kmask[None, :]
            b_mask = kmask[:, None] & nmask[None, :]
        a_tile = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if B_DESC:
            b_tile = _desc_tile(b, e, pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K)
        else:
            b_tile = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=PREC)
        if SWIGLU:
            if B_DESC:  # the up rows follow the gate rows: N_OUT = I rows further
                up_tile = _desc_tile(b, e, N_OUT + pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K)
            else:
                up_tile = tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0)
            acc_up = tl.dot(a_tile, up_tile, acc_up, input_precision=PREC)
        a_ptrs += BLOCK_K
        if not B_DESC:
            b_ptrs += BLOCK_K * stride_bk
    mask = rmask[:, None] & nmask[None, :]
    if SWIGLU:
        if STORE_H:
            h_ptrs = h + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
            tl.store(h_ptrs, acc.to(h.dtype.element_ty), mask=mask)
            tl.store(h_ptrs + N_OUT, acc_up.to(h.dtype.element_ty), mask=mask)
        acc = acc * tl.sigmoid(acc) * acc_up
    if SCALE:
        acc = acc * tl.load(scale + pair, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if SCATTER_C:
        c_rows = pair
    else:
        c_rows = rows.to(tl.int64)
    tl.store(c + c_rows[:, None] * stride_cm + cols[None, :], acc.to(c.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gemm_kernel(
    a, b, c, h, order, scale, ends, E, N_OUT, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_hm, up_offset,
    TOP_K: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, SCALE: tl.constexpr,
    SWIGLU: tl.constexpr, STORE_H: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
    B_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, SHORT_TAILS: tl.constexpr,
):
    """C[row] = A[row'] @ B[e] over the sorted rows r of expert e, B[e][k, n] at b + e*stride_be +
    k*stride_bk + n*stride_bn. row' = order[r] // TOP_K (GATHER_A: the token) else r; C's row = order[r]
    (SCATTER_C: the (token, slot) position) else r. SCALE multiplies row r by scale[order[r]]. SWIGLU: a
    second product with B shifted by up_offset gives `up`; C = silu(first) * up, and STORE_H keeps both
    pre-activations in h [M, 2*N_OUT]. SHORT_TAILS: an expert's last tile, when at most half full, runs
    as a half-height tile (a quarter-height one when at most a quarter full), so it does not multiply
    padding rows: at 160 rows per expert, 128-row tiles compute 256 rows, with short tails about 176.
    B_DESC: b is a TMA descriptor over the stacked weights [E, N_OUT rows (2 N_OUT with SWIGLU), K] (the
    forward's layout: reduction contiguous), block [1, BLOCK_N, BLOCK_K]; the strides are then unused."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    e, row0, row_end = _tile_segment(ends, E, pid_m, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rest = row_end - row0
    if SHORT_TAILS >= 2 and rest <= BLOCK_M // 4:
        _grouped_gemm_tile(a, b, c, h, order, scale, e, row0, row_end, pid_n, N_OUT, K, stride_am, stride_be,
                           stride_bn, stride_bk, stride_cm, stride_hm, up_offset, TOP_K, GATHER_A, SCATTER_C, SCALE,
                           SWIGLU, STORE_H, EVEN_K, PREC, B_DESC, BLOCK_M // 4, BLOCK_N, BLOCK_K)
    elif SHORT_TAILS >= 1 and rest <= BLOCK_M // 2:
        _grouped_gemm_tile(a, b, c, h, order, scale, e, row0, row_end, pid_n, N_OUT, K, stride_am, stride_be,
                           stride_bn, stride_bk, stride_cm, stride_hm, up_offset, TOP_K, GATHER_A, SCATTER_C, SCALE,
                           SWIGLU, STORE_H, EVEN_K, PREC, B_DESC, BLOCK_M // 2, BLOCK_N, BLOCK_K)
    else:
        _grouped_gemm_tile(a, b, c, h, order, scale, e, row0, row_end, pid_n, N_OUT, K, stride_am, stride_be,
                           stride_bn, stride_bk, stride_cm, stride_hm, up_offset, TOP_K, GATHER_A, SCATTER_C, SCALE,
                           SWIGLU, STORE_H, EVEN_K, PREC, B_DESC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _grouped_wgrad_kernel(
    g, a, order, ends, dw, N_OUT, K,
    stride_gm, stride_am, stride_we, stride_wn, stride_wk,
    TOP_K: tl.constexpr, GATHER_G: tl.constexpr, GATHER_A: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW[e][n, k] = sum over expert e's sorted rows r of G[r, n] * A[r, k] (fixed row order). G's row is
    order[r] // TOP_K with GATHER_G (a token's row), else r; likewise A's row with GATHER_A. One program per
    (expert, weight tile); experts without rows get zeros."""
    e = tl.program_id(1)
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    start = tl.where(e > 0, tl.load(ends + tl.maximum(e - 1, 0)), 0)
    end = tl.load(ends + e)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = ns < N_OUT
    kmask = ks < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        pair = _pairs(order, rows, rmask, GATHER_G or GATHER_A)
        g_rows = _operand_rows(pair, rows, TOP_K, GATHER_G)
        a_rows = _operand_rows(pair, rows, TOP_K, GATHER_A)
        g_tile = tl.load(g + g_rows[:, None] * stride_gm + ns[None, :], mask=rmask[:, None] & nmask[None, :],
                         other=0.0)
        a_tile = tl.load(a + a_rows[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
        acc = tl.dot(tl.trans(g_tile), a_tile, acc, input_precision=PREC)
    out = dw + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(out, acc.to(dw.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])


@triton.jit
def _swiglu_bwd_kernel(dact, h, order, scale, dh, dscale, act_w, I, HAS_DACT: tl.constexpr, STORE_ACT_W: tl.constexpr,
                       BLOCK_I: tl.constexpr):
    """Row r of the expert-sorted rows: h = [g | u] its pre-activations, a = silu(g) * u, w = scale[order[r]].
    HAS_DACT (dact: the gradient of a, not yet weighted): dscale[order[r]] = dact . a (the routing-weight
    gradient) and dh = [da * u * silu'(g) | da * silu(g)] with da = w * dact. STORE_ACT_W: act_w = w * a,
    the down projection's weight-gradient operand (so that its [M, D] gradient rows need no scaling)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_I)
    m = cols < I
    pair = tl.load(order + r)
    w = tl.load(scale + pair).to(tl.float32)
    gate = tl.load(h + r * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
    up = tl.load(h + r * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    if STORE_ACT_W:
        tl.store(act_w + r * I + cols, (w * silu * up).to(act_w.dtype.element_ty), mask=m)
    if HAS_DACT:
        da = tl.load(dact + r * I + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dscale + pair, tl.sum(da * silu * up, 0))
        da = da * w
        tl.store(dh + r * 2 * I + cols, (da * up * sig * (1.0 + gate * (1.0 - sig))).to(dh.dtype.element_ty),
                 mask=m)
        tl.store(dh + r * 2 * I + I + cols, (da * silu).to(dh.dtype.element_ty), mask=m)


@triton.jit
def _slot_sum_kernel(rows, out, D, TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = the sum over slots s, in slot order and in fp32, of rows[t * TOP_K + s] (rows [N*TOP_K, D] and
    out [N, D] contiguous)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(TOP_K):
        acc += tl.load(rows + (t * TOP_K + s) * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out + t * D + cols, acc.to(out.dtype.element_ty), mask=m)


def _slot_sum(rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """rows [N*k, D] (the (token, slot) rows) -> [N, D]: each token's k rows summed (deterministic)."""
    M, D = rows.shape
    out = rows.new_empty(M // top_k, D)
    if M:
        block = min(1024, next_power_of_2(D))
        _slot_sum_kernel[(M // top_k, cdiv(D, block))](rows, out, D, TOP_K=top_k, BLOCK_D=block, num_warps=4)
    return out


def _gemm_config(rows: int, experts: int, swiglu: bool, element_size: int) -> dict:
    """Tile shapes by the mean rows per expert: 16-row tiles for few rows (memory-bound, weight reads
    dominate; the fastest of a sweep at 32 and 256 tokens on an H100: 90-95% of the copy bandwidth; fp32 takes
    half the reduction depth, or gate and up tiles overflow shared memory), 32-row tiles up to 48 rows, and
    128-row tiles with short tails beyond (gate/up down to a quarter, down to half height): in 16-bit,
    128 x 256 outputs (gate and up 128 columns each) four stages deep, the fastest at 8192 tokens x 10 slots
    over 512 experts on an H100 (gate/up 1.02-1.05 ms, down 0.68, against 1.15 and 0.75-0.83 with the
    128 x 128 tiles that fp32 keeps for shared memory; benchmarks/moe_gpu.py sweep). The 128-row tiles of the
    forward read the weights through TMA descriptors (B_DESC): on an H200, three runs, gate/up 0.88-0.91
    against 0.92-0.94 ms, down 0.60-0.64 against 0.64-0.72 (pointer loads); the small tiles are unmeasured
    that way and keep pointers."""
    mean = rows / max(experts, 1)
    if mean <= 16:
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128 if element_size <= 2 else 64, num_warps=4, num_stages=3,
                    SHORT_TAILS=0)
    if mean <= 48:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SHORT_TAILS=0)
    wide = element_size <= 2
    block_n = (128 if wide else 64) if swiglu else (256 if wide else 128)
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64, num_warps=8, num_stages=4 if wide else 3,
                SHORT_TAILS=2 if swiglu else 1, B_DESC=True)


# Weight-gradient tiles: the fastest of the sweep for both projections (dgate_up 1.78 ms, ddown 0.95 at 8192
# tokens on an H100; 32-row reduction steps, four warps).
WGRAD_CONFIG = dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=32, num_warps=4, num_stages=3)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Whether `device` has Hopper's bulk copies (capability 9 or later); Triton's interpreter does too."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_loads(t: torch.Tensor) -> bool:
    """Whether t is read through a TMA descriptor: with Triton 3.4 or later on a Hopper-or-later GPU (or in
    Triton's interpreter), the last dim contiguous and a 16-byte aligned start and strides (the bulk-copy
    rules)."""
    if TensorDescriptor is None or not _has_tma(t.device):
        return False
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def _grouped_gemm(a, w, order, ends, n_out, k_dim, w_strides, out, *, top_k, gather_a=False, scatter=False,
                  scale=None, swiglu_up_offset=None, h=None, config=None):
    """Launch `_grouped_gemm_kernel`; w_strides = (per-expert, per-output-column, per-reduction-step)."""
    M, E = order.shape[0], ends.shape[0]
    cfg = config or _gemm_config(M, E, swiglu_up_offset is not None, a.element_size())
    if M == 0:
        return out
    num_tiles = cdiv(M, cfg["BLOCK_M"]) + min(E, M)
    grid = (num_tiles * cdiv(n_out, cfg["BLOCK_N"]),)
    # TMA for the forward's weights (rows = output columns, reduction contiguous); the backward's transposed
    # reads measured no faster that way (H200: dact, dx -0.06 to +0.05 ms over three runs) and keep pointers
    cfg = dict(cfg, B_DESC=cfg.get("B_DESC", False) and w_strides[2] == 1 and _tma_loads(w))
    if cfg["B_DESC"]:
        w = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, cfg["BLOCK_N"], cfg["BLOCK_K"]])
    _grouped_gemm_kernel[grid](
        a, w, out, h if h is not None else out, order, scale if scale is not None else out, ends, E, n_out, k_dim,
        a.stride(0), *w_strides, out.stride(0), h.stride(0) if h is not None else 0,
        swiglu_up_offset or 0,
        TOP_K=top_k, GATHER_A=gather_a, SCATTER_C=scatter, SCALE=scale is not None,
        SWIGLU=swiglu_up_offset is not None, STORE_H=h is not None, EVEN_K=k_dim % cfg["BLOCK_K"] == 0,
        PREC=dot_precision(a.dtype),
        BLOCK_E=next_power_of_2(E), **cfg)
    return out


def _grouped_wgrad(g, a, order, ends, dw, *, top_k, gather_g=False, gather_a=False, config=None):
    """Launch `_grouped_wgrad_kernel`: dw [E, N_OUT, K] from g [*, N_OUT] and a [*, K]."""
    E, n_out, k_dim = dw.shape
    cfg = config or WGRAD_CONFIG
    grid = (cdiv(n_out, cfg["BLOCK_N"]) * cdiv(k_dim, cfg["BLOCK_K"]), E)
    _grouped_wgrad_kernel[grid](
        g, a, order, ends, dw, n_out, k_dim, g.stride(0), a.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        TOP_K=top_k, GATHER_G=gather_g, GATHER_A=gather_a, PREC=dot_precision(g.dtype), **cfg)
    return dw


def _weight_grad(g, a, order, ends, like, *, top_k, gather_g=False, gather_a=False, token=None):
    """dW [E, N_OUT, K] = sum over expert e's rows of G[r]^T A[r] (rows as in `_grouped_wgrad_kernel`; token:
    order // top_k, the gathered rows, if the caller has it).

    On CUDA where `torch._grouped_mm` takes the operands, the rows are gathered and one grouped product
    (CUTLASS, empty groups give zeros in this layout) does it: 1.61 and 0.93 ms with the gathers against our
    kernel's 1.78 and 0.95 for gate_up and down at 8192 tokens on an H100 (benchmarks/moe_gpu.py sweep).
    Else our kernel.
    """
    if g.is_cuda and ends.shape[0] < 1024 and _grouped_mm_takes(g, a):  # its CUDA kernel takes < 1024 groups
        token = order // top_k if token is None else token
        if gather_g:
            g = g[token]
        if gather_a:
            a = a[token]
        return torch._grouped_mm(g.t(), a, offs=ends)
    return _grouped_wgrad(g, a, order, ends, torch.empty_like(like), top_k=top_k, gather_g=gather_g,
                          gather_a=gather_a)


def _experts_forward(x, gate_up, down, weights, ids, training):
    """The grouped forward: (out [N, D], and with `training` what the backward needs: the routing weights
    flattened, the sort's order and ends, the pre-activations h; else None)."""
    N, D = x.shape
    E, I, k = gate_up.shape[0], down.shape[2], ids.shape[1]
    M = N * k
    order, ends = _sort_by_expert(ids, E)
    w_flat = weights.reshape(-1)
    act = x.new_empty(M, I)
    h = x.new_empty(M, 2 * I) if training else None
    gu = gate_up.stride()
    _grouped_gemm(x, gate_up, order, ends, I, D, (gu[0], gu[1], gu[2]), act, top_k=k, gather_a=True,
                  swiglu_up_offset=I * gu[1], h=h)
    rows = x.new_empty(M, D)
    dn = down.stride()
    _grouped_gemm(act, down, order, ends, D, I, (dn[0], dn[1], dn[2]), rows, top_k=k, scatter=True,
                  scale=w_flat)
    return _slot_sum(rows, k), (w_flat, order, ends, h) if training else None


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, weights, ids):
        training = any(ctx.needs_input_grad[:4])
        out, saved = _experts_forward(x, gate_up, down, weights, ids, training)
        if training:  # act is recomputed from h in the backward
            ctx.save_for_backward(x, gate_up, down, *saved)
            ctx.shape = (x.shape[0], ids.shape[1], weights.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gate_up, down, w_flat, order, ends, h = ctx.saved_tensors
        (N, k, w_dtype), (M, I), D = ctx.shape, (h.shape[0], h.shape[1] // 2), x.shape[1]
        need_x, need_gu, need_dn, need_w = ctx.needs_input_grad[:4]
        dout = dout.to(x.dtype).contiguous()  # an fp32 gradient may reach a bf16 output
        dx = dgu = ddn = dw = None
        need_dact = need_x or need_gu or need_w
        dact = dh = dscale = act_w = None
        if need_dact:
            dn = down.stride()  # dact'[r, i] = sum_d dout[t, d] * down[e, d, i]
            dact = _grouped_gemm(dout, down, order, ends, I, D, (dn[0], dn[2], dn[1]), x.new_empty(M, I),
                                 top_k=k, gather_a=True)
            dh = torch.empty_like(h)
            dscale = torch.empty(M, device=x.device, dtype=torch.float32)
        if need_dn:
            act_w = x.new_empty(M, I)
        if M > 0:
            _swiglu_bwd_kernel[(M,)](dact if need_dact else h, h, order, w_flat, dh if need_dact else h,
                                     dscale if need_dact else w_flat, act_w if need_dn else h, I, HAS_DACT=need_dact,
                                     STORE_ACT_W=need_dn, BLOCK_I=next_power_of_2(I), num_warps=4)
        if need_w:
            dw = dscale.view(N, k).to(w_dtype)
        if need_x:
            gu = gate_up.stride()  # dx rows[r, d] = sum_j dh[r, j] * gate_up[e, j, d]
            rows = _grouped_gemm(dh, gate_up, order, ends, D, 2 * I, (gu[0], gu[2], gu[1]), x.new_empty(M, D),
                                 top_k=k, scatter=True)
            dx = _slot_sum(rows, k)
        token = order // k if need_gu and need_dn else None  # both weight gradients gather by it
        if need_gu:
            dgu = _weight_grad(dh, x, order, ends, gate_up, top_k=k, gather_a=True, token=token)
        if need_dn:
            ddn = _weight_grad(dout, act_w, order, ends, down, top_k=k, gather_g=True, token=token)
        return dx, dgu, ddn, dw, None


# ----------------------------------------------------------------------------------------------------------
# decode: a few tokens, no gradient


@triton.jit
def _decode_gate_up_kernel(x, ids, w, act, D, I, stride_xm, stride_we, stride_wn, stride_wk,
                           TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[r, n] = silu(x[t] . gate[e, n]) * (x[t] . up[e, n]) for pair r = t*TOP_K + s, e = ids[r]."""
    r = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < I
    ks = tl.arange(0, BLOCK_K)
    e = tl.load(ids + r).to(tl.int64)
    x_ptrs = x + (r // TOP_K) * stride_xm + ks
    w_ptrs = w + e * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = ks < D - k0
        xv = tl.load(x_ptrs, mask=kmask, other=0.0).to(tl.float32)[None, :]
        wmask = nmask[:, None] & kmask[None, :]
        acc_gate += tl.sum(tl.load(w_ptrs, mask=wmask, other=0.0).to(tl.float32) * xv, 1)
        acc_up += tl.sum(tl.load(w_ptrs + I * stride_wn, mask=wmask, other=0.0).to(tl.float32) * xv, 1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    tl.store(act + r * I + ns, acc_gate * tl.sigmoid(acc_gate) * acc_up, mask=nmask)


@triton.jit
def _decode_down_kernel(act, ids, weights, w, out, D, I, stride_we, stride_wn, stride_wk, stride_om,
                        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, n] = sum over slots s (in order) of weights[t, s] * (act[t*TOP_K + s] . down[ids[t, s], n])."""
    t = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(TOP_K):
        r = t * TOP_K + s
        e = tl.load(ids + r).to(tl.int64)
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kmask = ks < I - k0
            av = tl.load(act + r * I + k0 + ks, mask=kmask, other=0.0)
            wt = tl.load(w + e * stride_we + ns[:, None] * stride_wn + (k0 + ks)[None, :] * stride_wk,
                         mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            part += tl.sum(wt * av[None, :], 1)
        acc += tl.load(weights + r).to(tl.float32) * part
    tl.store(out + t * stride_om + ns, acc.to(out.dtype.element_ty), mask=nmask)


def _moe_decode(x, gate_up, down, weights, ids):
    N, D = x.shape
    I, k = down.shape[2], ids.shape[1]
    ids, weights = ids.contiguous(), weights.contiguous()
    act = torch.empty(N * k, I, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    if N == 0:
        return out
    bn = 16
    _decode_gate_up_kernel[(N * k, cdiv(I, bn))](
        x, ids, gate_up, act, D, I, x.stride(0), *gate_up.stride(), TOP_K=k, BLOCK_N=bn,
        BLOCK_K=min(256, next_power_of_2(D)), num_warps=4)
    bn = 8
    _decode_down_kernel[(N, cdiv(D, bn))](
        act, ids, weights, down, out, D, I, *down.stride(), out.stride(0), TOP_K=k, BLOCK_N=bn,
        BLOCK_K=min(512, next_power_of_2(I)), num_warps=4)
    return out


def moe_experts(x, gate_up, down, weights, ids):
    """`moe_experts_ref`'s contract on Triton kernels. Up to DECODE_MAX_TOKENS tokens without gradients run
    the decode kernels; everything else the grouped kernels, differentiable in x, gate_up, down, weights.
    Under autocast x and the experts run in its dtype."""
    x, gate_up, down = autocast_operands(x, gate_up, down)
    check_moe_inputs(x, gate_up, down, weights, ids)
    x = x.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, weights))
    # the operands are cast: the wrappers run as written (CUDA autocast would, e.g., cast a product's output);
    # the context only where autocast is on (entering it costs the host more than a kernel launch)
    device = x.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        if needs_grad:
            return _MoEExperts.apply(x, gate_up, down, weights, ids)
        if x.shape[0] <= DECODE_MAX_TOKENS:
            return _moe_decode(x, gate_up, down, weights, ids)
        return _experts_forward(x, gate_up, down, weights, ids, training=False)[0]  # no autograd node
