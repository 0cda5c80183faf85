"""Triton causal depthwise conv1d with fused SiLU: forward, backward, one decode step.

Same contracts as `qwen3next.ops.conv` (`causal_conv1d_ref`, `causal_conv1d_update_ref`): channels-last
x [B, T, C], weight [C, K], conv state [N, C, K-1] (oldest first), `cu_seqlens` packing N sequences in a row.
Every input is seen as one packed row of tokens; a program covers BT tokens of one sequence and BC channels.
Inputs before a sequence's start come from its initial state (zeros without one). The backward recomputes
the pre-activation (no saved activations) in a first kernel that writes its gradient dy * silu'(pre) in
fp32, from which a second forms dx, the initial state's gradient and each program's share of the weight
gradient (summed over programs by torch). (One kernel that recomputed the pre-activation at each dx
element's K shifted positions took 0.97 ms at 8192 tokens x 8192 channels on an H200, 7x the forward.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import blocks, cdiv, next_power_of_2

BT = 64  # tokens a program takes (forward and backward)
# The in-place conv over qkvz (no backward follows): programs of 8 tokens x 128 channels in two warps, 0.182 ms at
# 8192 tokens x 8192 channels on an H100, where 32 x 64 in four warps took 0.216 (the fastest of a sweep over 8-64
# tokens, 64-128 channels, 1-4 warps; a channel-major grid was no faster; a plain copy of the output: 0.092 ms)
INFERENCE_BT, INFERENCE_BC, INFERENCE_WARPS = 8, 128, 2


@triton.jit
def _x_at(x, init, n, bos, L, pos, cols, cmask, C, KM1: tl.constexpr, HAS_INIT: tl.constexpr, x_cols, stride_x):
    """fp32 input at sequence-relative positions `pos` [R] and channels `cols` [BC]; positions in
    [-(K-1), 0) read the initial state, others outside [0, L) are zero. x's rows are stride_x wide, the
    channels at columns x_cols (`cols` itself, or their place in the grouped qkvz layout: `_qkvz_columns`)."""
    inside = (pos >= 0) & (pos < L)
    val = tl.load(x + (bos + pos)[:, None] * stride_x + x_cols[None, :], mask=inside[:, None] & cmask[None, :],
                  other=0.0)
    val = val.to(tl.float32)
    if HAS_INIT:
        before = (pos < 0) & (pos >= -KM1)
        val += tl.load(init + (n * C + cols[None, :]) * KM1 + (pos + KM1)[:, None],
                       mask=before[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return val


@triton.jit
def _pre_at(x, init, w, n, bos, L, pos, cols, cmask, C, K: tl.constexpr, HAS_INIT: tl.constexpr, x_cols, stride_x):
    """The conv output before the activation at positions `pos` (fp32 [R, BC])."""
    acc = tl.zeros([pos.shape[0], cols.shape[0]], dtype=tl.float32)
    for i in tl.static_range(K):
        wi = tl.load(w + cols * K + i, mask=cmask, other=0.0).to(tl.float32)
        acc += wi[None, :] * _x_at(x, init, n, bos, L, pos - (K - 1) + i, cols, cmask, C, K - 1, HAS_INIT, x_cols,
                                   stride_x)
    return acc


@triton.jit
def _qkvz_columns(c0, HK: tl.constexpr, DK: tl.constexpr, VW: tl.constexpr, BC: tl.constexpr):
    """Where conv channels c0 .. c0 + BC (all q, then all k, then all v channels; BC divides DK and VW) lie in
    a row of the fused projection qkvz, grouped per key head h as [q_h (DK), k_h (DK), v_h (VW), z_h (VW)]."""
    G: tl.constexpr = 2 * DK + 2 * VW
    if c0 < HK * DK:
        start = (c0 // DK) * G + c0 % DK
    elif c0 < 2 * HK * DK:
        start = ((c0 - HK * DK) // DK) * G + DK + (c0 - HK * DK) % DK
    else:
        start = ((c0 - 2 * HK * DK) // VW) * G + 2 * DK + (c0 - 2 * HK * DK) % VW
    return start + tl.arange(0, BC)


@triton.jit
def _program_block(cu, blk_seq, blk_pos, C, BT: tl.constexpr, BC: tl.constexpr):
    """This program's block: (sequence n, its first token, its length, the block's first position, positions
    [BT], channels [BC] and their mask)."""
    pid, cb = tl.program_id(0), tl.program_id(1)
    n = tl.load(blk_seq + pid)
    p0 = tl.load(blk_pos + pid) * BT
    bos = tl.load(cu + n).to(tl.int64)
    L = tl.load(cu + n + 1).to(tl.int64) - bos
    cols = cb * BC + tl.arange(0, BC)
    return n, bos, L, p0, p0 + tl.arange(0, BT), cols, cols < C


@triton.jit
def _conv_fwd_kernel(x, w, init, y, final, cu, blk_seq, blk_pos, C, stride_x,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     SILU: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                     QKVZ: tl.constexpr, HK: tl.constexpr, DK: tl.constexpr, VW: tl.constexpr):
    """y = act(conv(x)) for one block; QKVZ: x is the grouped projection qkvz (rows stride_x wide, see
    `_qkvz_columns`), else [tokens, C]."""
    n, bos, L, p0, pos, cols, cmask = _program_block(cu, blk_seq, blk_pos, C, BT, BC)
    if QKVZ:
        x_cols = _qkvz_columns(tl.program_id(1) * BC, HK, DK, VW, BC)
    else:
        x_cols = cols
    out = _pre_at(x, init, w, n, bos, L, pos, cols, cmask, C, K, HAS_INIT, x_cols, stride_x)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(y + (bos + pos)[:, None] * C + cols[None, :], out.to(y.dtype.element_ty),
             mask=(pos < L)[:, None] & cmask[None, :])
    if STORE_FINAL:
        if p0 == 0:  # the sequence's first block writes its last K-1 inputs
            j = tl.arange(0, KP)
            last = _x_at(x, init, n, bos, L, L - (K - 1) + j, cols, cmask, C, K - 1, HAS_INIT, x_cols, stride_x)
            tl.store(final + (n * C + cols[None, :]) * (K - 1) + j[:, None], last.to(final.dtype.element_ty),
                     mask=(j < K - 1)[:, None] & cmask[None, :])


@triton.jit
def _conv_dpre_kernel(x, w, init, dy, dpre, cu, blk_seq, blk_pos, C, K: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, HAS_INIT: tl.constexpr):
    """The gradient at the pre-activation, dy * silu'(pre) (fp32), with pre recomputed from x."""
    n, bos, L, p0, pos, cols, cmask = _program_block(cu, blk_seq, blk_pos, C, BT, BC)
    pre = _pre_at(x, init, w, n, bos, L, pos, cols, cmask, C, K, HAS_INIT, cols, C)
    offs = (bos + pos)[:, None] * C + cols[None, :]
    mask = (pos < L)[:, None] & cmask[None, :]
    sig = tl.sigmoid(pre)
    g = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dpre + offs, g * sig * (1.0 + pre * (1.0 - sig)), mask=mask)


@triton.jit
def _dpre_at(dpre, bos, L, pos, cols, cmask, C):
    """The pre-activation's gradient at positions `pos` (fp32, zero outside [0, L))."""
    inside = (pos >= 0) & (pos < L)
    return tl.load(dpre + (bos + pos)[:, None] * C + cols[None, :], mask=inside[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _conv_bwd_kernel(x, w, init, dpre, dx, dinit, dw_part, cu, blk_seq, blk_pos, C,
                     K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_INIT: tl.constexpr):
    """dx, this block's share of dw, and the initial state's gradient, from the pre-activation's gradient dpre."""
    n, bos, L, p0, pos, cols, cmask = _program_block(cu, blk_seq, blk_pos, C, BT, BC)
    # dx[t] = sum_i w_i dpre[t + K-1-i]
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):
        wi = tl.load(w + cols * K + i, mask=cmask, other=0.0).to(tl.float32)
        acc += wi[None, :] * _dpre_at(dpre, bos, L, pos + (K - 1) - i, cols, cmask, C)
    tl.store(dx + (bos + pos)[:, None] * C + cols[None, :], acc.to(dx.dtype.element_ty),
             mask=(pos < L)[:, None] & cmask[None, :])
    # dw[c, i] = sum_t dpre[t] x[t - (K-1) + i], this block's share
    g = _dpre_at(dpre, bos, L, pos, cols, cmask, C)
    for i in tl.static_range(K):
        xi = _x_at(x, init, n, bos, L, pos - (K - 1) + i, cols, cmask, C, K - 1, HAS_INIT, cols, C)
        tl.store(dw_part + (tl.program_id(0) * C + cols) * K + i, tl.sum(g * xi, 0), mask=cmask)
    if HAS_INIT:
        if p0 == 0:  # the initial state holds positions -(K-1) .. -1: same formula as dx
            j = tl.arange(0, KP)
            vpos = j - (K - 1)
            acc0 = tl.zeros([KP, BC], dtype=tl.float32)
            for i in tl.static_range(K):
                wi = tl.load(w + cols * K + i, mask=cmask, other=0.0).to(tl.float32)
                acc0 += wi[None, :] * _dpre_at(dpre, bos, L, vpos + (K - 1) - i, cols, cmask, C)
            tl.store(dinit + (n * C + cols[None, :]) * (K - 1) + j[:, None], acc0.to(dinit.dtype.element_ty),
                     mask=(j < K - 1)[:, None] & cmask[None, :])


def _block_c(C: int) -> int:
    return min(64, next_power_of_2(C))


def _qkvz_block_c(dk: int, vw: int) -> int:
    """Channels per program over the grouped qkvz layout: at most INFERENCE_BC, a power of 2 dividing dk and vw, so
    that a program's channels are one contiguous run of a key head's q, k or v columns."""
    block = INFERENCE_BC
    while dk % block or vw % block:
        block //= 2
    return block


def _conv_forward(x, weight, initial_state, output_final_state, cu_seqlens, silu, qkvz_heads=None, block_t=BT):
    """Launch the forward kernel: (y [B, T, C], final state or None, what the backward needs). qkvz_heads =
    (Hk, dk, r dv): x is the grouped projection qkvz [B, T, Hk (2 dk + 2 r dv)] (unit column stride, rows
    evenly strided) and the conv reads its q, k, v columns in place, in the INFERENCE_ tiles; else x is [B, T, C].
    block_t: tokens a program takes (BT where the backward follows, which reuses the layout)."""
    B, T = x.shape[:2]
    C, K = weight.shape
    layout = blocks(B, T, cu_seqlens, block_t, True, x.device)
    if qkvz_heads is None:
        xc = x.contiguous()
        stride_x, (HK, DK, VW), BC, warps = C, (1, 1, 1), _block_c(C), 4
    else:
        HK, DK, VW = qkvz_heads
        xc = x if x.stride(-1) == 1 and x.stride(0) == T * x.stride(1) else x.contiguous()
        stride_x, BC, warps = xc.stride(1), _qkvz_block_c(DK, VW), INFERENCE_WARPS
    wc = weight.contiguous()
    init = initial_state.contiguous() if initial_state is not None else None
    y = x.new_empty(B, T, C)
    final = torch.empty(layout.N, C, K - 1, dtype=x.dtype, device=x.device) if output_final_state else None
    _conv_fwd_kernel[(layout.NB, cdiv(C, BC))](
        xc, wc, init if init is not None else xc, y, final if final is not None else y, layout.cu, layout.seq,
        layout.pos, C, stride_x, K=K, KP=next_power_of_2(max(K - 1, 1)), BT=block_t, BC=BC, SILU=silu,
        HAS_INIT=init is not None, STORE_FINAL=output_final_state, QKVZ=qkvz_heads is not None, HK=HK, DK=DK,
        VW=VW, num_warps=warps)
    return y, final, (xc, wc, init, layout)


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, initial_state, output_final_state, cu_seqlens, silu):
        y, final, (xc, wc, init, layout) = _conv_forward(x, weight, initial_state, output_final_state, cu_seqlens,
                                                         silu)
        ctx.save_for_backward(xc, wc, init, layout.cu, layout.seq, layout.pos)
        ctx.meta = (layout.offsets, layout.NB, silu, initial_state.dtype if initial_state is not None else None)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        xc, wc, init, cu, blk_seq, blk_pos = ctx.saved_tensors
        offsets, nb, silu, init_dtype = ctx.meta
        _, T, C = xc.shape
        K = wc.shape[1]
        BC = _block_c(C)
        grid = (nb, cdiv(C, BC))
        dy = dy.contiguous()
        dpre = dy  # without the activation the pre-activation's gradient is dy itself
        if silu:  # else every dx element would recompute the pre-activation at its K shifted positions
            dpre = torch.empty(xc.shape, dtype=torch.float32, device=xc.device)
            _conv_dpre_kernel[grid](xc, wc, init if init is not None else xc, dy, dpre, cu, blk_seq, blk_pos, C,
                                    K=K, BT=BT, BC=BC, HAS_INIT=init is not None)
        # the final state's gradient is added to dx afterwards, in fp32: then dx is rounded once
        dx = torch.empty(xc.shape, dtype=torch.float32 if dfinal is not None else xc.dtype, device=xc.device)
        dinit = torch.empty(init.shape, dtype=torch.float32, device=xc.device) if init is not None else None
        dw_part = torch.empty(nb, C, K, dtype=torch.float32, device=xc.device)
        _conv_bwd_kernel[grid](
            xc, wc, init if init is not None else xc, dpre, dx, dinit if dinit is not None else dx, dw_part, cu,
            blk_seq, blk_pos, C, K=K, KP=next_power_of_2(max(K - 1, 1)), BT=BT, BC=BC,
            HAS_INIT=init is not None)
        if dfinal is not None:  # the final state is the last K-1 inputs: route its gradient to them
            _add_final_state_grad(dx, dinit, dfinal.float(), offsets, K)
        return (dx.to(xc.dtype), dw_part.sum(0).to(wc.dtype), dinit.to(init_dtype) if dinit is not None else None,
                None, None, None)


def _add_final_state_grad(dx, dinit, dfinal, offsets, K):
    """final[n, :, j] is the input at position L_n - (K-1) + j of sequence n (the initial state's
    column for negative positions): add dfinal there. dx [B, T, C] is indexed as packed tokens."""
    dx_tokens = dx.view(-1, dx.shape[-1])
    for n in range(len(offsets) - 1):
        bos, L = offsets[n], offsets[n + 1] - offsets[n]
        for j in range(K - 1):
            p = L - (K - 1) + j
            if p >= 0:
                dx_tokens[bos + p] += dfinal[n, :, j]
            elif dinit is not None:
                dinit[n, :, p + K - 1] += dfinal[n, :, j]


def check_conv_inputs(B: int, T: int, C: int, weight, initial_state, cu_seqlens, activation) -> None:
    """Validate a conv over [B, T, C] inputs (see `causal_conv1d`)."""
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"need weight [C = {C}, K]; got {tuple(weight.shape)}")
    if weight.shape[1] < 2:
        raise ValueError("kernel size K must be at least 2")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: batch size must be 1, got {B}")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, C, weight.shape[1] - 1):
        raise ValueError(f"initial_state must be [N, C, K-1] = {(N, C, weight.shape[1] - 1)}, "
                         f"got {tuple(initial_state.shape)}")


def causal_conv1d(x, weight, initial_state=None, output_final_state=False, cu_seqlens=None, activation="silu"):
    """Triton `causal_conv1d_ref`: x [B, T, C], weight [C, K]; returns (y [B, T, C], final state [N, C, K-1] or None)."""
    if x.dim() != 3:
        raise ValueError(f"need x [B, T, C]; got {tuple(x.shape)}")
    check_conv_inputs(*x.shape, weight, initial_state, cu_seqlens, activation)
    return _CausalConv1d.apply(x, weight, initial_state, output_final_state, cu_seqlens, activation == "silu")


@triton.jit
def _conv_update_kernel(x, state, w, y, C, K: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr):
    b, cb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    srow = state + (b * C + cols) * (K - 1)
    xnew = tl.load(x + b * C + cols, mask=cmask, other=0.0)
    acc = tl.load(w + cols * K + (K - 1), mask=cmask, other=0.0).to(tl.float32) * xnew.to(tl.float32)
    prev = tl.load(srow, mask=cmask, other=0.0)
    for i in tl.static_range(K - 1):
        acc += tl.load(w + cols * K + i, mask=cmask, other=0.0).to(tl.float32) * prev.to(tl.float32)
        if i + 1 < K - 1:
            nxt = tl.load(srow + i + 1, mask=cmask, other=0.0)
        else:
            nxt = xnew.to(prev.dtype)
        tl.store(srow + i, nxt, mask=cmask)
        prev = nxt
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + b * C + cols, acc.to(y.dtype.element_ty), mask=cmask)


def causal_conv1d_update(x, conv_state, weight, activation="silu"):
    """Triton `causal_conv1d_update_ref`: x [B, C]; conv_state [B, C, K-1] updated in place; returns y [B, C]."""
    B, C = x.shape
    K = weight.shape[1]
    if conv_state.shape != (B, C, K - 1) or not conv_state.is_contiguous():
        raise ValueError(f"conv_state must be a contiguous [B, C, K-1] = {(B, C, K - 1)}; got {tuple(conv_state.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    y = torch.empty_like(x)
    BC = _block_c(C)
    _conv_update_kernel[(B, cdiv(C, BC))](x.contiguous(), conv_state, weight.contiguous(), y, C, K=K, BC=BC,
                                          SILU=activation == "silu")
    return y
