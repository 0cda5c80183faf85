"""Triton element-wise epilogues: one launch each for what the references in `qwen3next.ops.fused` do in
several. Same contracts; inference only except `sigmoid_gate` and `split_qkvz` (which have backward
kernels): under autograd (an input that requires grad) and for fp64 they run the reference (`rms_norm_rotary`:
the Triton RMSNorm, then the reference rotation). Arithmetic is fp32 with one final rounding, so results differ
from the references (which round after each op in low precision) by at most the output's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fused import (
    add_rms_norm_ref, check_gdn_gates_inputs, check_rms_norm_rotary_inputs, check_split_qkvz_inputs, gdn_gates_ref,
    rotary_ref, sigmoid_gate_ref, split_qkvz_ref,
)
from . import cdiv, next_power_of_2
from . import conv
from .norms import rms_norm


def _wants_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of `tensors` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _reference_needed(*tensors) -> bool:
    """The inference-only kernels' fallback: under autograd, or for fp64."""
    return _wants_grad(*tensors) or any(t is not None and t.dtype == torch.float64 for t in tensors)


def _row_view(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with unit column stride: a view where t's rows are evenly strided (e.g. a slice of
    a projection's output), else a contiguous copy. The kernels take the row stride."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _row_block(D: int) -> tuple[int, int]:
    """(BLOCK_D, rows per program) for rows of D elements."""
    block_d = next_power_of_2(D)
    return block_d, max(1, min(16, 4096 // block_d))


# ---------------------------------------------------------------------------------------------------- qkvz split
@triton.jit
def _move(a, b, mask, B_TO_A: tl.constexpr):
    """Copy the tile at pointers a to pointers b (B_TO_A: b to a)."""
    if B_TO_A:
        tl.store(a, tl.load(b, mask=mask).to(a.dtype.element_ty), mask=mask)
    else:
        tl.store(b, tl.load(a, mask=mask).to(b.dtype.element_ty), mask=mask)


@triton.jit
def _split_qkvz_kernel(src, mixed, z, n_rows, stride_src, HK: tl.constexpr, DK: tl.constexpr, VW: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, ROWS: tl.constexpr, MERGE: tl.constexpr):
    """ROWS rows of key head h = program_id(1): its q, k [DK] and v, z [VW = r dv] columns of src [rows, Hk (2 DK
    + 2 VW)] (row stride stride_src) to their places in mixed [rows, 2 Hk DK + Hk VW] and z [rows, Hk VW], both
    contiguous; MERGE: from there back into src (the backward)."""
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    h = tl.program_id(1)
    ck = tl.arange(0, BLOCK_K)[None, :]
    cv = tl.arange(0, BLOCK_V)[None, :]
    mk = (rows < n_rows) & (ck < DK)
    mv = (rows < n_rows) & (cv < VW)
    grp = src + rows * stride_src + h * (2 * DK + 2 * VW)
    out = mixed + rows * (2 * HK * DK + HK * VW)
    _move(grp + ck, out + h * DK + ck, mk, MERGE)
    _move(grp + DK + ck, out + HK * DK + h * DK + ck, mk, MERGE)
    _move(grp + 2 * DK + cv, out + 2 * HK * DK + h * VW + cv, mv, MERGE)
    _move(grp + 2 * DK + VW + cv, z + rows * (HK * VW) + h * VW + cv, mv, MERGE)


def _split_qkvz_launch(src, mixed, z, num_k_heads, dk, vw, merge):
    """src [rows, Hk (2 dk + 2 vw)] (unit column stride) <-> mixed [rows, 2 Hk dk + Hk vw], z [rows, Hk vw]."""
    n = src.shape[0]
    block_k, block_v = next_power_of_2(dk), next_power_of_2(vw)
    per = max(1, min(32, 4096 // block_v))
    if n:
        _split_qkvz_kernel[(cdiv(n, per), num_k_heads)](
            src, mixed, z, n, src.stride(0), HK=num_k_heads, DK=dk, VW=vw, BLOCK_K=block_k, BLOCK_V=block_v,
            ROWS=per, MERGE=merge, num_warps=4)


def _split_qkvz_forward(qkvz, num_k_heads, num_v_heads, dk, dv):
    rows = _row_view(qkvz, qkvz.shape[-1])
    vw = num_v_heads // num_k_heads * dv
    mixed = qkvz.new_empty(rows.shape[0], num_k_heads * (2 * dk + vw))
    z = qkvz.new_empty(rows.shape[0], num_v_heads * dv)
    _split_qkvz_launch(rows, mixed, z, num_k_heads, dk, vw, merge=False)
    lead = qkvz.shape[:-1]
    return mixed.view(*lead, -1), z.view(*lead, num_v_heads, dv)


class _SplitQKVZ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkvz, num_k_heads, num_v_heads, dk, dv):
        ctx.meta = (qkvz.shape, qkvz.dtype, num_k_heads, num_v_heads // num_k_heads * dv, dk)
        return _split_qkvz_forward(qkvz, num_k_heads, num_v_heads, dk, dv)

    @staticmethod
    def backward(ctx, dmixed, dz):
        shape, dtype, num_k_heads, vw, dk = ctx.meta
        dqkvz = torch.empty(shape, dtype=dtype, device=dmixed.device)
        _split_qkvz_launch(dqkvz.view(-1, shape[-1]), dmixed.contiguous().view(-1, dmixed.shape[-1]),
                           dz.contiguous().view(-1, num_k_heads * vw), num_k_heads, dk, vw, merge=True)
        return dqkvz, None, None, None, None


def split_qkvz(qkvz: torch.Tensor, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int):
    """Triton `split_qkvz_ref`: one launch that reads each key head's group once and writes the conv's input
    and z (one launch back under autograd); fp64 runs the reference."""
    check_split_qkvz_inputs(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
    if qkvz.dtype == torch.float64:
        return split_qkvz_ref(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
    if _wants_grad(qkvz):
        return _SplitQKVZ.apply(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
    return _split_qkvz_forward(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)


def qkvz_causal_conv1d(qkvz: torch.Tensor, weight: torch.Tensor, num_k_heads: int, num_v_heads: int,
                       head_k_dim: int, head_v_dim: int, initial_state=None, output_final_state: bool = False,
                       cu_seqlens=None, activation="silu"):
    """Triton `qkvz_causal_conv1d_ref`: without gradients one conv launch that reads the q, k, v columns of qkvz
    in place, and z a view of qkvz (nothing copied); under autograd (or fp64) `split_qkvz`, then `causal_conv1d`."""
    r = check_split_qkvz_inputs(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
    if qkvz.dim() != 3:
        raise ValueError(f"qkvz must be [B, T, width]; got {tuple(qkvz.shape)}")
    if qkvz.dtype == torch.float64 or _wants_grad(qkvz, weight, initial_state):
        mixed, z = split_qkvz(qkvz, num_k_heads, num_v_heads, head_k_dim, head_v_dim)
        y, final = conv.causal_conv1d(mixed, weight, initial_state, output_final_state, cu_seqlens, activation)
        return y, z.unflatten(-2, (num_k_heads, r)), final
    B, T, width = qkvz.shape
    dk, vw = head_k_dim, r * head_v_dim
    conv.check_conv_inputs(B, T, num_k_heads * (2 * dk + vw), weight, initial_state, cu_seqlens, activation)
    y, final, _ = conv._conv_forward(qkvz, weight, initial_state, output_final_state, cu_seqlens,
                                     activation == "silu", qkvz_heads=(num_k_heads, dk, vw),
                                     block_t=conv.INFERENCE_BT)
    z = qkvz.unflatten(-1, (num_k_heads, 2 * dk + 2 * vw))[..., 2 * dk + vw:].unflatten(-1, (r, head_v_dim))
    return y, z, final


# ---------------------------------------------------------------------------------------------------- gates
@triton.jit
def _gdn_gates_kernel(ba, A_log, dt_bias, beta, g, n_rows, stride_row, clip,
                      HV: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                      HAS_CLIP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    h = tl.arange(0, BLOCK_H)
    hmask = h < HV
    col_b = (h // R) * (2 * R) + h % R  # value head h: key head h // R, its (h % R)-th b column; a is R later
    mask = (rows < n_rows)[:, None] & hmask[None, :]
    src = ba + rows[:, None] * stride_row + col_b[None, :]
    b = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(src + R, mask=mask, other=0.0).to(tl.float32)
    if HAS_CLIP:
        b = tl.minimum(tl.maximum(b, -clip), clip)
    x = a + tl.load(dt_bias + h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    softplus = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
    decay = -tl.exp(tl.load(A_log + h, mask=hmask, other=0.0).to(tl.float32))[None, :] * softplus
    dst = rows[:, None] * HV + h[None, :]
    tl.store(beta + dst, tl.sigmoid(b), mask=mask)
    tl.store(g + dst, decay, mask=mask)


def gdn_gates(ba, A_log, dt_bias, num_k_heads: int, clip_val: float | None = None):
    """Triton `gdn_gates_ref`: ba [..., Hk * 2r] -> (beta, g) [..., Hv] fp32, in one launch."""
    r = check_gdn_gates_inputs(ba, A_log, dt_bias, num_k_heads)
    if _reference_needed(ba, A_log, dt_bias):
        return gdn_gates_ref(ba, A_log, dt_bias, num_k_heads, clip_val)
    Hv = A_log.shape[0]
    rows = _row_view(ba, 2 * Hv)
    n = rows.shape[0]
    beta = torch.empty(n, Hv, dtype=torch.float32, device=ba.device)
    g = torch.empty_like(beta)
    block_h = next_power_of_2(Hv)
    per = max(1, min(64, 2048 // block_h))
    if n:
        _gdn_gates_kernel[(cdiv(n, per),)](
            rows, A_log, dt_bias, beta, g, n, rows.stride(0), float(clip_val or 0.0), HV=Hv, R=r,
            BLOCK_H=block_h, ROWS=per, HAS_CLIP=clip_val is not None, num_warps=4)
    shape = (*ba.shape[:-1], Hv)
    return beta.view(shape), g.view(shape)


# ---------------------------------------------------------------------------------------------------- add + norm
@triton.jit
def _add_rms_norm_kernel(x, res, w, s, y, n_rows, D, eps, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    total = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(res + offs, mask=mask, other=0.0).to(tl.float32)
    total = total.to(s.dtype.element_ty)  # the sum is rounded to the activation dtype, as torch's add does
    tl.store(s + offs, total, mask=mask)
    sf = total.to(tl.float32)
    normed = sf * tl.rsqrt(tl.sum(sf * sf, 1) / D + eps)[:, None]
    wf = tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y + offs, (normed * (1.0 + wf)[None, :]).to(y.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """Triton `add_rms_norm_ref`: (x + residual, rms_norm(x + residual)) in one pass."""
    if residual.shape != x.shape or weight.shape != (x.shape[-1],):
        raise ValueError(f"need x and residual of one shape and weight [D]; got {tuple(x.shape)}, "
                         f"{tuple(residual.shape)}, {tuple(weight.shape)}")
    if _reference_needed(x, residual, weight):
        return add_rms_norm_ref(x, residual, weight, eps)
    D = x.shape[-1]
    xr, rr = x.contiguous().view(-1, D), residual.contiguous().view(-1, D)
    s = torch.empty(xr.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = torch.empty_like(s)
    block_d, per = _row_block(D)
    if xr.shape[0]:
        _add_rms_norm_kernel[(cdiv(xr.shape[0], per),)](
            xr, rr, weight, s, y, xr.shape[0], D, eps, BLOCK_D=block_d, ROWS=per,
            num_warps=4 if block_d <= 1024 else 8)
    return s.view(x.shape), y.view(x.shape)


# ---------------------------------------------------------------------------------------------------- gate
@triton.jit
def _sigmoid_gate_kernel(x, gate, res, out, D, gate_stride, BLOCK: tl.constexpr, BCAST: tl.constexpr,
                         HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    xv = tl.load(x + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if BCAST:
        gv = tl.load(gate + row * gate_stride).to(tl.float32)
    else:
        gv = tl.load(gate + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    o = xv * tl.sigmoid(gv)
    if HAS_RES:
        o += tl.load(res + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * D + cols, o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_gate_bwd_kernel(dout, x, gate, dx, dgate, D, gate_stride, BLOCK: tl.constexpr, BCAST: tl.constexpr):
    """With s = sigmoid(gate): dx = dout * s, dgate = dout * x * s (1 - s); BCAST (one gate per row): dgate is
    that summed over the row, which one program walks in BLOCK-wide steps."""
    row = tl.program_id(0).to(tl.int64)
    if BCAST:
        s = tl.sigmoid(tl.load(gate + row * gate_stride).to(tl.float32))
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, D, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < D
            do = tl.load(dout + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx + row * D + cols, (do * s).to(dx.dtype.element_ty), mask=mask)
            acc += do * tl.load(x + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dgate + row, (tl.sum(acc, 0) * s * (1.0 - s)).to(dgate.dtype.element_ty))
    else:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        s = tl.sigmoid(tl.load(gate + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32))
        do = tl.load(dout + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx + row * D + cols, (do * s).to(dx.dtype.element_ty), mask=mask)
        tl.store(dgate + row * D + cols, (do * xv * s * (1.0 - s)).to(dgate.dtype.element_ty), mask=mask)


def _gate_launch(rows: torch.Tensor, gate: torch.Tensor) -> tuple[int, bool]:
    """(BLOCK, BCAST) of the gate kernels for x rows [N, D] and gate rows [N, D or 1]: BCAST when one gate
    serves a row of more than one column."""
    D = rows.shape[1]
    return min(1024, next_power_of_2(D)), gate.shape[1] == 1 and D > 1


def _sigmoid_gate_forward(x, gate, residual):
    """The forward launch: (out [rows, D], x and gate as the [rows, *] views the kernels read)."""
    D = x.shape[-1]
    xr = x.contiguous().view(-1, D)
    gr = _row_view(gate, gate.shape[-1])  # attention's gate: a view of q_proj's output
    rr = residual.contiguous().view(-1, D) if residual is not None else xr
    out = torch.empty_like(xr)
    if xr.shape[0]:
        block, bcast = _gate_launch(xr, gr)
        _sigmoid_gate_kernel[(xr.shape[0], cdiv(D, block))](
            xr, gr, rr, out, D, gr.stride(0), BLOCK=block, BCAST=bcast, HAS_RES=residual is not None, num_warps=4)
    return out, xr, gr


class _SigmoidGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, residual):
        out, xr, gr = _sigmoid_gate_forward(x, gate, residual)
        ctx.save_for_backward(xr, gr)
        ctx.shapes = (x.shape, gate.shape)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        xr, gr = ctx.saved_tensors
        x_shape, gate_shape = ctx.shapes
        D = xr.shape[1]
        do = dout.contiguous().view(-1, D)
        dx, dgate = torch.empty_like(xr), torch.empty(gr.shape, dtype=gr.dtype, device=gr.device)
        if xr.shape[0]:
            block, bcast = _gate_launch(xr, gr)
            _sigmoid_gate_bwd_kernel[(xr.shape[0], 1 if bcast else cdiv(D, block))](
                do, xr, gr, dx, dgate, D, gr.stride(0), BLOCK=block, BCAST=bcast, num_warps=4)
        dres = dout if ctx.needs_input_grad[2] else None
        return dx.view(x_shape), dgate.view(gate_shape), dres


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `sigmoid_gate_ref`: x * sigmoid(gate) (+ residual), one launch; differentiable (one launch back)
    where x, gate and residual share a dtype, else (and for fp64) the reference."""
    if gate.shape not in (x.shape, (*x.shape[:-1], 1)) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"gate must be like x {tuple(x.shape)} or [..., 1], residual like x; got "
                         f"{tuple(gate.shape)}, {None if residual is None else tuple(residual.shape)}")
    dtypes = {x.dtype, gate.dtype} | ({residual.dtype} if residual is not None else set())
    if torch.float64 in dtypes or len(dtypes) > 1:
        return sigmoid_gate_ref(x, gate, residual)
    if _wants_grad(x, gate, residual):
        return _SigmoidGate.apply(x, gate, residual)
    return _sigmoid_gate_forward(x, gate, residual)[0].view(x.shape)


# ---------------------------------------------------------------------------------------------------- norm + rotary
@triton.jit
def _rms_norm_rotary_kernel(x, w, cos, sin, y, n_rows, H, D, R, stride_x, stride_cs, eps,
                            BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Row = (token, head): y = rotate(round(x / rms(x) * (1 + w))) over its D columns; columns c < R/2
    take -sin times their partner c + R/2, columns R/2 <= c < R take +sin times c - R/2."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    rmask = rows < n_rows
    mask = rmask[:, None] & cmask[None, :]
    half = R // 2
    partner = tl.where(cols < half, cols + half, tl.where(cols < R, cols - half, cols))
    xf = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x + rows[:, None] * stride_x + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)[:, None]
    wf = tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)
    wp = tl.load(w + partner, mask=cmask, other=0.0).to(tl.float32)
    dt = y.dtype.element_ty
    n = (xf * rstd * (1.0 + wf)[None, :]).to(dt).to(tl.float32)  # the norm's output, rounded as the reference
    n_p = (xp * rstd * (1.0 + wp)[None, :]).to(dt).to(tl.float32)
    rot = cols < R
    cs_offs = (rows // H)[:, None] * stride_cs + cols[None, :]
    c = tl.load(cos + cs_offs, mask=rmask[:, None] & rot[None, :], other=1.0).to(tl.float32)
    s = tl.load(sin + cs_offs, mask=rmask[:, None] & rot[None, :], other=0.0).to(tl.float32)
    sign = tl.where(cols < half, -1.0, 1.0)
    out = tl.where(rot[None, :], n * c + sign[None, :] * n_p * s, n)
    tl.store(y + rows[:, None] * D + cols[None, :], out.to(dt), mask=mask)


def rms_norm_rotary(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """Triton `rms_norm_rotary_ref` in one pass over x (a strided view of a projection's output is read in
    place); under autograd the Triton RMSNorm and the reference rotation."""
    check_rms_norm_rotary_inputs(x, weight, cos, sin)
    if _reference_needed(x, weight, cos, sin):
        return rotary_ref(rms_norm(x, weight, eps), cos, sin)
    B, T, H, D = x.shape
    R = cos.shape[-1]
    rows = _row_view(x, D)
    cos, sin = cos.reshape(B * T, R).contiguous(), sin.reshape(B * T, R).contiguous()
    y = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    block_d, per = _row_block(D)
    if rows.shape[0]:
        _rms_norm_rotary_kernel[(cdiv(rows.shape[0], per),)](
            rows, weight, cos, sin, y, rows.shape[0], H, D, R, rows.stride(0), cos.stride(0), eps,
            BLOCK_D=block_d, ROWS=per, num_warps=4)
    return y
