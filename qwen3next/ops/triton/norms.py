"""Triton norms over the last dim, forward and backward: zero-centred RMSNorm, gated RMSNorm, L2 norm.

Same contracts as `qwen3next.ops.norms` (`rms_norm_ref`, `gated_rms_norm_ref`, `l2_norm_ref`). One kernel
pair serves all three (`MODE`): each program normalises `ROWS` rows of length D <= BLOCK_D in fp32 and
writes y in x's dtype. The weight gradient is summed per program, then over programs by torch.
Roundings differ from the references only by the final cast (everything stays fp32 until then).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2, num_sms

L2, RMS, GATED = 0, 1, 2


@triton.jit
def _norm_fwd_kernel(x, gate, w, y, n_rows, D, eps, gate_n1, gate_n2, gate_s0, gate_s1, gate_s2,
                     MODE: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows of x [n_rows, D] (contiguous); the gate's row i0 * n1 n2 + i1 n2 + i2 at i0 s0 + i1 s1 + i2 s2."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    xf = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        out = xf * tl.rsqrt(tl.sum(xf * xf, 1) + eps)[:, None]
    else:
        xh = xf * tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)[:, None]
        wf = tl.load(w + cols, mask=cols < D, other=0.0).to(tl.float32)
        if MODE == 1:
            out = xh * (1.0 + wf)[None, :]
        else:
            i12 = rows // gate_n2
            g_rows = (i12 // gate_n1) * gate_s0 + (i12 % gate_n1) * gate_s1 + (rows % gate_n2) * gate_s2
            z = tl.load(gate + g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            out = xh * wf[None, :] * z * tl.sigmoid(z)
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(x, gate, w, dy, dx, dgate, dw_part, n_rows, D, eps,
                     MODE: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if MODE != 0:
        wf = tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * ROWS, n_rows, tl.num_programs(0) * ROWS):
        rows = start + tl.arange(0, ROWS).to(tl.int64)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        xf = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(GROUP):  # row i's gradient: the sum of dy's rows i * GROUP + j
            g += tl.load(dy + (rows[:, None] * GROUP + j) * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            r = tl.rsqrt(tl.sum(xf * xf, 1) + eps)[:, None]
            yh = xf * r
            grad = r * (g - yh * tl.sum(yh * g, 1)[:, None])
        else:
            r = tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)[:, None]
            xh = xf * r
            if MODE == 1:
                dxh = g * (1.0 + wf)[None, :]
                dw_acc += tl.sum(g * xh, 0)
            else:
                z = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                silu = z * sig
                dxh = g * wf[None, :] * silu
                dw_acc += tl.sum(g * xh * silu, 0)
                dz = g * xh * wf[None, :] * sig * (1.0 + z * (1.0 - sig))
                tl.store(dgate + offs, dz.to(dgate.dtype.element_ty), mask=mask)
            grad = r * (dxh - xh * (tl.sum(dxh * xh, 1) / D)[:, None])
        tl.store(dx + offs, grad.to(dx.dtype.element_ty), mask=mask)
    if MODE != 0:
        tl.store(dw_part + pid * D + cols, dw_acc, mask=cmask)


def _config(D: int) -> tuple[int, int]:
    if D > 16384:
        raise ValueError(f"the Triton norms take rows of at most 16384 elements, got {D}")
    block_d = next_power_of_2(D)
    return block_d, max(1, min(16, 2048 // block_d))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


def _gate_rows(gate: torch.Tensor):
    """The gate as rows of D with unit column stride whose leading dims collapse into at most three, [n0, n1, n2]
    with strides (s0, s1, s2) (e.g. z as a view of the projection it comes from), else a contiguous copy:
    (tensor, n1, n2, s0, s1, s2)."""
    dims = []  # [size, stride], merged where the outer dim steps over the inner one exactly
    for size, stride in zip(gate.shape[:-1], gate.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if gate.stride(-1) != 1 or len(dims) > 3:
        gate = gate.contiguous()
        dims = [[gate.numel() // gate.shape[-1], gate.shape[-1]]]
    dims = [[1, 0]] * (3 - len(dims)) + dims
    return gate, dims[1][0], dims[2][0], dims[0][1], dims[1][1], dims[2][1]


def norm_forward(mode: int, x: torch.Tensor, gate, weight, eps: float) -> torch.Tensor:
    """Launch the forward kernel; x [..., D] (gate of x's shape, any strides: see `_gate_rows`; weight [D]
    where the mode uses them)."""
    xr = _rows(x)
    n, D = xr.shape
    block_d, rows = _config(D)
    y = torch.empty_like(xr)
    gate, n1, n2, s0, s1, s2 = _gate_rows(gate) if gate is not None else (xr, 1, 1, D, 0, 0)
    if n:
        _norm_fwd_kernel[(cdiv(n, rows),)](
            xr, gate, weight if weight is not None else xr, y, n, D, eps, n1, n2, s0, s1, s2,
            MODE=mode, BLOCK_D=block_d, ROWS=rows, num_warps=4 if block_d <= 1024 else 8)
    return y.view(x.shape)


def norm_backward(mode: int, x, gate, weight, dy, eps: float, group: int = 1):
    """Launch the backward kernel: returns (dx in x's dtype, dgate or None, dweight or None). With `group` > 1,
    dy has `group` rows for each row of x ([..., group, D] where x is [..., D]), and x's row gets their sum
    (a normalised tensor that fed `group` consumers, e.g. a key head shared by value heads)."""
    xr, dyr = _rows(x), _rows(dy)
    n, D = xr.shape
    if dyr.shape != (n * group, D):
        raise ValueError(f"dy must have {group} rows of {D} per row of x ({n} rows); got {tuple(dy.shape)}")
    block_d, rows = _config(D)
    dx = torch.empty_like(xr)
    dgate = torch.empty_like(_rows(gate)) if mode == GATED else None
    grid = max(1, min(cdiv(n, rows), 4 * num_sms(x.device)))
    dw_part = torch.empty(grid, D, dtype=torch.float32, device=x.device) if mode != L2 else None
    if n:
        _norm_bwd_kernel[(grid,)](
            xr, _rows(gate) if gate is not None else xr, weight if weight is not None else xr, dyr, dx,
            dgate if dgate is not None else dx, dw_part if dw_part is not None else dx, n, D, eps,
            MODE=mode, BLOCK_D=block_d, ROWS=rows, GROUP=group, num_warps=4 if block_d <= 1024 else 8)
    elif dw_part is not None:
        dw_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype) if dw_part is not None else None
    return dx.view(x.shape), (dgate.view(gate.shape) if dgate is not None else None), dw


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode, x, gate, weight, eps):
        ctx.mode, ctx.eps = mode, eps
        ctx.save_for_backward(x, gate, weight)
        return norm_forward(mode, x, gate, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight = ctx.saved_tensors
        dx, dgate, dw = norm_backward(ctx.mode, x, gate, weight, dy, ctx.eps)
        return None, dx, dgate, dw, None


def _check(x: torch.Tensor, weight: torch.Tensor | None, gate: torch.Tensor | None = None) -> None:
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if weight is not None and weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-centred RMSNorm `x / sqrt(mean(x^2) + eps) * (1 + weight)`; x [..., D], weight [D]."""
    _check(x, weight)
    return _Norm.apply(RMS, x, None, weight, eps)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`rmsnorm(x) * weight * silu(gate)`; x, gate [..., d], weight [d]."""
    _check(x, weight, gate)
    return _Norm.apply(GATED, x, gate, weight, eps)


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(sum(x^2) + eps)` over the last dim; x [..., D]."""
    _check(x, None)
    return _Norm.apply(L2, x, None, None, eps)
