"""Triton gated delta rule: chunked forward and backward (prefill, training), recurrent decode, pool update.

Contracts: `qwen3next.ops.gated_delta` (shapes, GVA, varlen, dtypes). Every input is seen as one packed
row of tokens ([B, T, ...] is B sequences of T); a value head hv reads key head hv // (Hv / Hk) directly
(repeated q/k are never materialised). q, k, v share one dtype (bf16, fp16 or fp32): the matrix products
take operands in that dtype with fp32 accumulation; gates, decays, states and all element-wise work are fp32.

Chunked form (C = 64 steps a chunk; c = within-chunk cumulative g, so every exp() below is of a
non-positive number; A_ij = beta_i exp(c_i - c_j) k_i.k_j for j < i; T = (I + A)^-1):
    d = T (beta * (v - exp(c) * (k S)))            the delta-rule writes (fla's v_new)
    o = exp(c) * (q S) + (P d),  P_ij = exp(c_i - c_j) q_i.k_j for j <= i
    S <- exp(c_C) S + (exp(c_C - c) * k)^T d
Kernels:
  1. `_chunk_inverse_kernel`, parallel over chunks x value heads: T of every chunk, by forward
     substitution on the four 16x16 diagonal blocks and block products for the rest. Writes only T
     (64 numbers per token and head, in the input dtype).
  1b. `_chunk_scores_kernel`, parallel like kernel 1: P of every chunk, when few sequences leave the
     sequential kernels latency-bound (B = 1: one program per multiprocessor); it takes the largest
     product off their per-chunk path (1.45 vs 1.62 ms at 1 x 16384 on an H100; slower at 8 x 8192).
     In training always: there kernel 3 reads P too (fwd+bwd 13.7 -> 11.7 ms at 8 x 8192 on an H200).
  2. `_chunk_fwd_kernel`, sequential over a sequence's chunks, parallel over sequences x value heads x
     dv blocks (the columns of S evolve independently, so splitting dv gives B = 1 enough programs).
     Holds S in registers and writes o directly: where fla writes w, u, v_new and every chunk's state to
     memory and reads them back, this writes nothing per chunk in inference. For training it also saves S
     at each chunk start, and d. (A variant that moved P, w = T (beta exp(c) k) and u = T (beta v) into
     kernel 1, leaving four products a chunk here, ran 1.5-2.5x slower on an H100: it reads more per chunk
     and its shared memory allows one program per multiprocessor. See BENCHMARKS.md.)
  3. `_chunk_bwd_state_kernel`, sequential in reverse: dS at every chunk end (and d initial state), and
     y (the gradient of beta * (v - exp(c) k S)) with dv = beta y:
        dd = P^T dO + (exp(c_C - c) * k) dS',  y = T^T dd,
        dS = exp(c_C) dS' + (exp(c) * q)^T dO - (beta exp(c) * k)^T y.
  4. `_chunk_bwd_kernel`, parallel over chunks x value heads: from the chunk's S, dS', dO, d and y it forms
     five products over dv (dO S^T, d dS'^T, y S^T, dO d^T, y d^T, accumulated over dv blocks of 64;
     nothing recomputed) and from them dq, dk, dbeta and dg (a reverse cumsum of the gradient of c). The
     row sums that need k S or k dS' (dbeta, dg) come from k . (y S^T) and k . (d dS'^T). dq/dk are
     written per value head in the input dtype; the L2-norm backward kernel sums them over the group when
     the norm is in-kernel, else torch does.

Decode: `_recurrent_kernel` runs the recurrence token by token with S in registers, one program per
(sequence, value head, dv block); `recurrent_gated_delta_rule_update` points it at rows of a state pool
and writes them back in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..gated_delta import check_gated_delta_inputs, check_pool_update_inputs, chunk_gated_delta_rule_ref
from . import blocks, cdiv, dot_precision, next_power_of_2, num_sms
from .norms import L2, norm_backward

CHUNK = 64
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:3] if x.isdigit())
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _tile_load(ptr, bos, L, head, stride, D: tl.constexpr, row0, col0, BR: tl.constexpr, BC: tl.constexpr):
    """Rows row0.. (< L) of the sequence starting at token `bos`, columns col0.. (< D), of a packed
    [tokens, H, D] tensor (`stride` elements from one token to the next, H * D when contiguous) at head
    `head`: a [BR, BC] tile in the tensor's dtype, zero outside."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    base = ptr + bos * stride + head * D
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=(rows < L)[:, None] & (cols < D)[None, :],
                   other=0.0)


@triton.jit
def _tile_store(ptr, bos, L, head, stride, D: tl.constexpr, row0, col0, BR: tl.constexpr,
                BC: tl.constexpr, val):
    """Store a [BR, BC] tile where `_tile_load` would read it (cast to the tensor's dtype)."""
    rows = row0 + tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    base = ptr + bos * stride + head * D
    tl.store(base + rows[:, None] * stride + cols[None, :], val.to(ptr.dtype.element_ty),
             mask=(rows < L)[:, None] & (cols < D)[None, :])


@triton.jit
def _state_load(ptr, row, hv, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, col0,
                BK: tl.constexpr, BV: tl.constexpr):
    """S[row, hv, :, col0:col0+BV] of a [rows, HV, DK, DV] state tensor as a [BK, BV] tile (zero outside)."""
    rk = tl.arange(0, BK)
    rv = col0 + tl.arange(0, BV)
    base = ptr + (row * HV + hv).to(tl.int64) * DK * DV
    return tl.load(base + rk[:, None] * DV + rv[None, :], mask=(rk < DK)[:, None] & (rv < DV)[None, :], other=0.0)


@triton.jit
def _state_store(ptr, row, hv, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, col0,
                 BK: tl.constexpr, BV: tl.constexpr, val):
    rk = tl.arange(0, BK)
    rv = col0 + tl.arange(0, BV)
    base = ptr + (row * HV + hv).to(tl.int64) * DK * DV
    tl.store(base + rk[:, None] * DV + rv[None, :], val.to(ptr.dtype.element_ty),
             mask=(rk < DK)[:, None] & (rv < DV)[None, :])


@triton.jit
def _state_or_zeros(ptr, HAS: tl.constexpr, row, hv, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, col0,
                    BK: tl.constexpr, BV: tl.constexpr):
    """`_state_load` in fp32 when the state is given (HAS), else zeros."""
    if HAS:
        s = _state_load(ptr, row, hv, HV, DK, DV, col0, BK, BV).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    return s


@triton.jit
def _row_factor(x, L2NORM: tl.constexpr):
    """Per-row factor that L2-normalises x (ones without the norm). The kernels keep q and k as loaded
    and fold these factors (and the scale) into the rows/columns of the products instead."""
    if L2NORM:
        xf = x.to(tl.float32)
        return tl.rsqrt(tl.sum(xf * xf, 1) + 1e-6)
    else:
        return tl.full([x.shape[0]], 1.0, tl.float32)


@triton.jit
def _load_gates(g, beta, t, tmask, hv, HV: tl.constexpr):
    """(c, c_C, beta) of a chunk: within-chunk cumulative log-decay [C], its last value, write strengths [C]."""
    gb = tl.load(g + t * HV + hv, mask=tmask, other=0.0).to(tl.float32)
    bb = tl.load(beta + t * HV + hv, mask=tmask, other=0.0).to(tl.float32)
    return tl.cumsum(gb, 0), tl.sum(gb, 0), bb


@triton.jit
def _decay_matrix(c, causal):
    """exp(c_i - c_j) where `causal` (j <= i or j < i), else 0."""
    return tl.where(causal, tl.exp(tl.where(causal, c[:, None] - c[None, :], 0.0)), 0.0)


@triton.jit
def _products(qd, kd, fq, fk, PREC: tl.constexpr):
    """(fq_i q_i).(fk_j k_j) of a chunk's rows [64, 64] fp32 (q k^T with the row factors)."""
    return tl.dot(qd, tl.trans(kd), input_precision=PREC) * (fq[:, None] * fk[None, :])


@triton.jit
def _scores(qk, c):
    """P of a chunk [64, 64] fp32 from its products qk (`_products`): P_ij = exp(c_i - c_j) qk_ij for j <= i."""
    rt = tl.arange(0, 64)
    return qk * _decay_matrix(c, rt[:, None] >= rt[None, :])


@triton.jit
def _sequence(cu, n):
    """(first token, end, length) of packed sequence n."""
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    return bos, eos, (eos - bos).to(tl.int32)


@triton.jit
def _chunk_inputs(q, k, g, beta, bos, eos, L, r0, hk, hv, scale, stride_q, stride_k,
                  HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr, L2NORM: tl.constexpr):
    """What every chunk kernel reads of the chunk at row r0 of a sequence: q, k tiles [64, BK] as stored, their
    row factors (q's times scale), and c, c_C, beta (`_load_gates`)."""
    t = bos + r0 + tl.arange(0, 64)
    qd = _tile_load(q, bos, L, hk, stride_q, DK, r0, 0, 64, BK)
    kd = _tile_load(k, bos, L, hk, stride_k, DK, r0, 0, 64, BK)
    c, c_last, bb = _load_gates(g, beta, t, t < eos, hv, HV)
    return qd, kd, _row_factor(qd, L2NORM) * scale, _row_factor(kd, L2NORM), c, c_last, bb


@triton.jit
def _chunk_scores(pmat, qd, kd, fq, fk, c, bos, L, r0, hv, HV: tl.constexpr, PRE_P: tl.constexpr,
                  PREC: tl.constexpr):
    """The chunk's P: read from the scores kernel's output (PRE_P) or formed here."""
    if PRE_P:
        p = _tile_load(pmat, bos, L, hv, HV * 64, 64, r0, 0, 64, 64)
    else:
        p = _scores(_products(qd, kd, fq, fk, PREC), c)
    return p


# ----------------------------------------------------------------------------------------------------
# 1. T = (I + A)^-1 per chunk
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _inv_unit_lower4(a0, a1, a2, a3):
    """(I + a)^-1 of four strictly lower-triangular [16, 16] blocks by forward substitution, row by row, the
    four stacked into one [4, 16, 16] tile so that each step is one pair of reductions for all of them:
    t_i = e_i - sum_{j<i} a_ij t_j (rows j < i of t are final)."""
    a = tl.reshape(tl.permute(tl.join(tl.join(a0, a1), tl.join(a2, a3)), (3, 2, 0, 1)), (4, 16, 16))
    r = tl.arange(0, 16)[None, :, None]
    c = tl.arange(0, 16)[None, None, :]
    t = tl.zeros([4, 16, 16], dtype=tl.float32) + (r == c).to(tl.float32)
    for i in range(1, 16):
        a_i = tl.sum(tl.where(r == i, a, 0.0), 1)                                     # [4, 16]: row i, by j
        t = tl.where(r == i, (c == i).to(tl.float32) - tl.sum(a_i[:, :, None] * t, 1)[:, None, :], t)
    lo, hi = tl.split(tl.permute(tl.reshape(t, (2, 2, 16, 16)), (2, 3, 1, 0)))
    t0, t1 = tl.split(lo)
    t2, t3 = tl.split(hi)
    return t0, t1, t2, t3


@triton.jit
def _scale_a(kk, fi, fj, ci, cj, DIAG: tl.constexpr):
    """Block (i, j) of A from its k_i.k_j products: fi_i fj_j exp(c_i - c_j) kk (fi = beta x norm factor,
    fj = norm factor), strictly lower on the diagonal."""
    a = kk * fi[:, None] * fj[None, :]
    if DIAG:
        a = a * _decay_matrix(ci, tl.arange(0, 16)[:, None] > tl.arange(0, 16)[None, :])
    else:
        a = a * tl.exp(ci[:, None] - cj[None, :])
    return a


@triton.jit
def _store_block(ptr, t0, eos, hv, HV: tl.constexpr, i: tl.constexpr, j: tl.constexpr, blk):
    rows = t0 + i * 16 + tl.arange(0, 16)
    tl.store(ptr + (rows[:, None] * HV + hv) * 64 + j * 16 + tl.arange(0, 16)[None, :],
             blk.to(ptr.dtype.element_ty), mask=(rows < eos)[:, None])


@triton.jit
def _chunk_inverse_kernel(k, g, beta, tinv, cu, chunk_seq, chunk_pos, stride_k,
                          HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, BKC: tl.constexpr,
                          L2NORM: tl.constexpr, PREC: tl.constexpr):
    cid, hv = tl.program_id(0), tl.program_id(1)
    hk = hv // (HV // HK)
    bos, eos, L = _sequence(cu, tl.load(chunk_seq + cid))
    r0 = tl.load(chunk_pos + cid) * 64
    t0 = bos + r0
    # the ten k_i.k_j products of the 16-row blocks (i >= j), accumulated over dk in BKC-wide slices
    z = tl.zeros([16, 16], dtype=tl.float32)
    a00, a11, a22, a33, a10, a21, a32, a20, a31, a30 = z, z, z, z, z, z, z, z, z, z
    s0 = tl.zeros([16], dtype=tl.float32)
    s1, s2, s3 = s0, s0, s0
    for kc in range(0, DK, BKC):
        k0 = _tile_load(k, bos, L, hk, stride_k, DK, r0, kc, 16, BKC)
        k1 = _tile_load(k, bos, L, hk, stride_k, DK, r0 + 16, kc, 16, BKC)
        k2 = _tile_load(k, bos, L, hk, stride_k, DK, r0 + 32, kc, 16, BKC)
        k3 = _tile_load(k, bos, L, hk, stride_k, DK, r0 + 48, kc, 16, BKC)
        if L2NORM:
            s0 += tl.sum(k0.to(tl.float32) * k0.to(tl.float32), 1)
            s1 += tl.sum(k1.to(tl.float32) * k1.to(tl.float32), 1)
            s2 += tl.sum(k2.to(tl.float32) * k2.to(tl.float32), 1)
            s3 += tl.sum(k3.to(tl.float32) * k3.to(tl.float32), 1)
        a00 = tl.dot(k0, tl.trans(k0), a00, input_precision=PREC)
        a11 = tl.dot(k1, tl.trans(k1), a11, input_precision=PREC)
        a22 = tl.dot(k2, tl.trans(k2), a22, input_precision=PREC)
        a33 = tl.dot(k3, tl.trans(k3), a33, input_precision=PREC)
        a10 = tl.dot(k1, tl.trans(k0), a10, input_precision=PREC)
        a21 = tl.dot(k2, tl.trans(k1), a21, input_precision=PREC)
        a32 = tl.dot(k3, tl.trans(k2), a32, input_precision=PREC)
        a20 = tl.dot(k2, tl.trans(k0), a20, input_precision=PREC)
        a31 = tl.dot(k3, tl.trans(k1), a31, input_precision=PREC)
        a30 = tl.dot(k3, tl.trans(k0), a30, input_precision=PREC)
    if L2NORM:
        r0_, r1, r2, r3 = tl.rsqrt(s0 + 1e-6), tl.rsqrt(s1 + 1e-6), tl.rsqrt(s2 + 1e-6), tl.rsqrt(s3 + 1e-6)
    else:
        r0_, r1, r2, r3 = s0 + 1.0, s1 + 1.0, s2 + 1.0, s3 + 1.0
    ts = t0 + tl.arange(0, 16)
    g0 = tl.load(g + ts * HV + hv, mask=ts < eos, other=0.0).to(tl.float32)
    g1 = tl.load(g + (ts + 16) * HV + hv, mask=ts + 16 < eos, other=0.0).to(tl.float32)
    g2 = tl.load(g + (ts + 32) * HV + hv, mask=ts + 32 < eos, other=0.0).to(tl.float32)
    g3 = tl.load(g + (ts + 48) * HV + hv, mask=ts + 48 < eos, other=0.0).to(tl.float32)
    f0 = r0_ * tl.load(beta + ts * HV + hv, mask=ts < eos, other=0.0).to(tl.float32)
    f1 = r1 * tl.load(beta + (ts + 16) * HV + hv, mask=ts + 16 < eos, other=0.0).to(tl.float32)
    f2 = r2 * tl.load(beta + (ts + 32) * HV + hv, mask=ts + 32 < eos, other=0.0).to(tl.float32)
    f3 = r3 * tl.load(beta + (ts + 48) * HV + hv, mask=ts + 48 < eos, other=0.0).to(tl.float32)
    c0 = tl.cumsum(g0, 0)
    c1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    c2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    c3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)
    t00, t11, t22, t33 = _inv_unit_lower4(_scale_a(a00, f0, r0_, c0, c0, True), _scale_a(a11, f1, r1, c1, c1, True),
                                          _scale_a(a22, f2, r2, c2, c2, True), _scale_a(a33, f3, r3, c3, c3, True))
    a10 = _scale_a(a10, f1, r0_, c1, c0, False)
    a21 = _scale_a(a21, f2, r1, c2, c1, False)
    a32 = _scale_a(a32, f3, r2, c3, c2, False)
    a20 = _scale_a(a20, f2, r0_, c2, c0, False)
    a31 = _scale_a(a31, f3, r1, c3, c1, False)
    a30 = _scale_a(a30, f3, r0_, c3, c0, False)
    # T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj  (i > j)
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=PREC), input_precision=PREC)
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=PREC), input_precision=PREC)
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=PREC), input_precision=PREC)
    t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision=PREC) + tl.dot(a21, t10, input_precision=PREC),
                  input_precision=PREC)
    t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision=PREC) + tl.dot(a32, t21, input_precision=PREC),
                  input_precision=PREC)
    t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision=PREC) + tl.dot(a31, t10, input_precision=PREC)
                  + tl.dot(a32, t20, input_precision=PREC), input_precision=PREC)
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_block(tinv, t0, eos, hv, HV, 0, 0, t00)
    _store_block(tinv, t0, eos, hv, HV, 0, 1, zero)
    _store_block(tinv, t0, eos, hv, HV, 0, 2, zero)
    _store_block(tinv, t0, eos, hv, HV, 0, 3, zero)
    _store_block(tinv, t0, eos, hv, HV, 1, 0, t10)
    _store_block(tinv, t0, eos, hv, HV, 1, 1, t11)
    _store_block(tinv, t0, eos, hv, HV, 1, 2, zero)
    _store_block(tinv, t0, eos, hv, HV, 1, 3, zero)
    _store_block(tinv, t0, eos, hv, HV, 2, 0, t20)
    _store_block(tinv, t0, eos, hv, HV, 2, 1, t21)
    _store_block(tinv, t0, eos, hv, HV, 2, 2, t22)
    _store_block(tinv, t0, eos, hv, HV, 2, 3, zero)
    _store_block(tinv, t0, eos, hv, HV, 3, 0, t30)
    _store_block(tinv, t0, eos, hv, HV, 3, 1, t31)
    _store_block(tinv, t0, eos, hv, HV, 3, 2, t32)
    _store_block(tinv, t0, eos, hv, HV, 3, 3, t33)


@triton.jit
def _chunk_scores_kernel(q, k, g, p, cu, chunk_seq, chunk_pos, scale, stride_q, stride_k,
                         HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr,
                         L2NORM: tl.constexpr, PREC: tl.constexpr):
    """P of every chunk (parallel over chunks x value heads): P_ij = exp(c_i - c_j) q_i.k_j for j <= i, with
    q, k normalised and q scaled; written [tokens, Hv, 64] in the input dtype, like T."""
    cid, hv = tl.program_id(0), tl.program_id(1)
    hk = hv // (HV // HK)
    bos, eos, L = _sequence(cu, tl.load(chunk_seq + cid))
    r0 = tl.load(chunk_pos + cid) * 64
    t = bos + r0 + tl.arange(0, 64)
    qd = _tile_load(q, bos, L, hk, stride_q, DK, r0, 0, 64, BK)
    kd = _tile_load(k, bos, L, hk, stride_k, DK, r0, 0, 64, BK)
    c = tl.cumsum(tl.load(g + t * HV + hv, mask=t < eos, other=0.0).to(tl.float32), 0)
    s = _scores(_products(qd, kd, _row_factor(qd, L2NORM) * scale, _row_factor(kd, L2NORM), PREC), c)
    _tile_store(p, bos, L, hv, HV * 64, 64, r0, 0, 64, 64, s)


# ----------------------------------------------------------------------------------------------------
# 2. forward: sequential over chunks, S in registers
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_fwd_kernel(q, k, v, g, beta, tinv, pmat, h0, o, ht, hs, wr, cu, chunk_off, scale,
                      stride_q, stride_k, stride_v,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, STORE_HS: tl.constexpr, PRE_P: tl.constexpr,
                      PREC: tl.constexpr):
    iv, hv, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hk = hv // (HV // HK)
    bos, eos, L = _sequence(cu, n)
    coff = tl.load(chunk_off + n).to(tl.int64)
    v0 = iv * BV
    dt = q.dtype.element_ty
    S = _state_or_zeros(h0, HAS_H0, n, hv, HV, DK, DV, v0, BK, BV)
    for ci in range(tl.cdiv(L, 64)):
        r0 = ci * 64
        if STORE_HS:
            _state_store(hs, coff + ci, hv, HV, DK, DV, v0, BK, BV, S.to(hs.dtype.element_ty))
        qd, kd, fq, fk, c, c_last, bb = _chunk_inputs(q, k, g, beta, bos, eos, L, r0, hk, hv, scale,
                                                      stride_q, stride_k, HK, HV, DK, BK, L2NORM)
        tb = _tile_load(tinv, bos, L, hv, HV * 64, 64, r0, 0, 64, 64)
        vb = _tile_load(v, bos, L, hv, stride_v, DV, r0, v0, 64, BV).to(tl.float32)
        gam = tl.exp(c)
        sd = S.to(dt)
        ks = tl.dot(kd, sd, input_precision=PREC)
        df = tl.dot(tb, (bb[:, None] * (vb - (gam * fk)[:, None] * ks)).to(dt), input_precision=PREC)
        if STORE_HS:
            _tile_store(wr, bos, L, hv, HV * DV, DV, r0, v0, 64, BV, df)
        p = _chunk_scores(pmat, qd, kd, fq, fk, c, bos, L, r0, hv, HV, PRE_P, PREC)
        ob = (gam * fq)[:, None] * tl.dot(qd, sd, input_precision=PREC) \
            + tl.dot(p.to(dt), df.to(dt), input_precision=PREC)
        _tile_store(o, bos, L, hv, HV * DV, DV, r0, v0, 64, BV, ob.to(o.dtype.element_ty))
        S = S * tl.exp(c_last) + tl.dot(tl.trans(kd), (df * (tl.exp(c_last - c) * fk)[:, None]).to(dt),
                                        input_precision=PREC)
    if STORE_HT:
        _state_store(ht, n, hv, HV, DK, DV, v0, BK, BV, S)


# ----------------------------------------------------------------------------------------------------
# 3. backward: dS at every chunk boundary, sequential in reverse
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_bwd_state_kernel(q, k, g, beta, tinv, pmat, do, dht, dh0, dhs, y_out, dv, cu, chunk_off, scale,
                            stride_q, stride_k,
                            HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, HAS_DHT: tl.constexpr,
                            STORE_DH0: tl.constexpr, PRE_P: tl.constexpr, PREC: tl.constexpr):
    iv, hv, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hk = hv // (HV // HK)
    bos, eos, L = _sequence(cu, n)
    coff = tl.load(chunk_off + n).to(tl.int64)
    v0 = iv * BV
    dt = q.dtype.element_ty
    dS = _state_or_zeros(dht, HAS_DHT, n, hv, HV, DK, DV, v0, BK, BV)
    nc = tl.cdiv(L, 64)
    for i in range(nc):
        ci = nc - 1 - i
        r0 = ci * 64
        _state_store(dhs, coff + ci, hv, HV, DK, DV, v0, BK, BV, dS.to(dhs.dtype.element_ty))
        qd, kd, fq, fk, c, c_last, bb = _chunk_inputs(q, k, g, beta, bos, eos, L, r0, hk, hv, scale,
                                                      stride_q, stride_k, HK, HV, DK, BK, L2NORM)
        tb = _tile_load(tinv, bos, L, hv, HV * 64, 64, r0, 0, 64, 64)
        dob = _tile_load(do, bos, L, hv, HV * DV, DV, r0, v0, 64, BV)
        gam = tl.exp(c)
        p = _chunk_scores(pmat, qd, kd, fq, fk, c, bos, L, r0, hv, HV, PRE_P, PREC)
        dd = tl.dot(tl.trans(p.to(dt)), dob, input_precision=PREC) \
            + (tl.exp(c_last - c) * fk)[:, None] * tl.dot(kd, dS.to(dt), input_precision=PREC)
        y = tl.dot(tl.trans(tb), dd.to(dt), input_precision=PREC)
        _tile_store(y_out, bos, L, hv, HV * DV, DV, r0, v0, 64, BV, y)
        _tile_store(dv, bos, L, hv, HV * DV, DV, r0, v0, 64, BV, bb[:, None] * y)
        dS = dS * tl.exp(c_last) \
            + tl.dot(tl.trans(qd), (dob.to(tl.float32) * (gam * fq)[:, None]).to(dt), input_precision=PREC) \
            - tl.dot(tl.trans(kd), (y * (bb * gam * fk)[:, None]).to(dt), input_precision=PREC)
    if STORE_DH0:
        _state_store(dh0, n, hv, HV, DK, DV, v0, BK, BV, dS)


# ----------------------------------------------------------------------------------------------------
# 4. backward: all input gradients, parallel over chunks
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_bwd_kernel(q, k, v, g, beta, hs, dhs, do, wr, y, dq, dk, dg, dbeta, cu, chunk_seq, chunk_pos, scale,
                      stride_q, stride_k, stride_v,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr):
    cid, hv = tl.program_id(0), tl.program_id(1)
    hk = hv // (HV // HK)
    bos, eos, L = _sequence(cu, tl.load(chunk_seq + cid))
    rt = tl.arange(0, 64)
    r0 = tl.load(chunk_pos + cid) * 64
    t = bos + r0 + rt
    tm = t < eos
    dt = q.dtype.element_ty
    # products over dv with the chunk's S, dS', dO, d (forward) and y (kernel 3); nothing is recomputed
    o_s = tl.zeros([64, BK], dtype=tl.float32)       # dO S^T
    d_ds = tl.zeros([64, BK], dtype=tl.float32)      # d dS'^T
    y_s = tl.zeros([64, BK], dtype=tl.float32)       # y S^T
    dp = tl.zeros([64, 64], dtype=tl.float32)        # dO d^T
    yd = tl.zeros([64, 64], dtype=tl.float32)        # y d^T
    yv = tl.zeros([64], dtype=tl.float32)            # sum_v y v
    s_ds = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        sd = _state_load(hs, cid, hv, HV, DK, DV, v0, BK, BV)
        dsd = _state_load(dhs, cid, hv, HV, DK, DV, v0, BK, BV)           # hs, dhs: stored in q's dtype
        dob = _tile_load(do, bos, L, hv, HV * DV, DV, r0, v0, 64, BV)
        wb = _tile_load(wr, bos, L, hv, HV * DV, DV, r0, v0, 64, BV)
        yb = _tile_load(y, bos, L, hv, HV * DV, DV, r0, v0, 64, BV)
        vb = _tile_load(v, bos, L, hv, stride_v, DV, r0, v0, 64, BV)
        o_s = tl.dot(dob, tl.trans(sd), o_s, input_precision=PREC)
        d_ds = tl.dot(wb, tl.trans(dsd), d_ds, input_precision=PREC)
        y_s = tl.dot(yb, tl.trans(sd), y_s, input_precision=PREC)
        dp = tl.dot(dob, tl.trans(wb), dp, input_precision=PREC)
        yd = tl.dot(yb, tl.trans(wb), yd, input_precision=PREC)
        yv += tl.sum(yb.to(tl.float32) * vb.to(tl.float32), 1)
        s_ds += tl.sum(sd.to(tl.float32) * dsd.to(tl.float32), 1)
    qd, kd, fq, fk, c, c_last, bb = _chunk_inputs(q, k, g, beta, bos, eos, L, r0, hk, hv, scale,
                                                  stride_q, stride_k, HK, HV, DK, BK, L2NORM)
    gam = tl.exp(c)
    e = tl.exp(c_last - c)
    kf = kd.to(tl.float32)
    y_ks = fk * tl.sum(kf * y_s, 1)                  # sum_v y (k S), k normalised
    z = e * fk * tl.sum(kf * d_ds, 1)                # sum_v d (e k dS')
    acc_q = gam[:, None] * o_s                       # exp(c) * (dO S^T)
    acc_k = e[:, None] * d_ds - (bb * gam)[:, None] * y_s
    db = yv - gam * y_ks                             # sum_v y (v - exp(c) k S)
    dc = -bb * gam * y_ks
    da = -yd
    decay = _decay_matrix(c, rt[:, None] >= rt[None, :])
    qk = _products(qd, kd, fq, fk, PREC)
    dpe = dp * decay                                  # masked to j <= i by decay
    dq_b = acc_q + tl.dot((dpe * fk[None, :]).to(dt), kd, input_precision=PREC)
    m1 = dpe * qk
    dc += fq * tl.sum(qd.to(tl.float32) * acc_q, 1) + tl.sum(m1, 1) - tl.sum(m1, 0) - z
    ga = da * _decay_matrix(c, rt[:, None] > rt[None, :])
    kk = _products(kd, kd, fk, fk, PREC)
    dk_b = tl.dot(tl.trans((dpe * fq[:, None]).to(dt)), qd, input_precision=PREC) + acc_k \
        + bb[:, None] * tl.dot((ga * fk[None, :]).to(dt), kd, input_precision=PREC) \
        + tl.dot(tl.trans((ga * (bb * fk)[:, None]).to(dt)), kd, input_precision=PREC)
    m2 = ga * kk
    db += tl.sum(m2, 1)
    m3 = m2 * bb[:, None]
    dc += tl.sum(m3, 1) - tl.sum(m3, 0)
    dc += tl.where(rt == 63, tl.exp(c_last) * tl.sum(s_ds, 0) + tl.sum(z, 0), 0.0)
    dgv = tl.sum(dc, 0) - tl.cumsum(dc, 0) + dc        # dg_m = sum_{i >= m} dc_i
    _tile_store(dq, bos, L, hv, HV * DK, DK, r0, 0, 64, BK, dq_b * scale)
    _tile_store(dk, bos, L, hv, HV * DK, DK, r0, 0, 64, BK, dk_b)
    tl.store(dg + t * HV + hv, dgv, mask=tm)
    tl.store(dbeta + t * HV + hv, db, mask=tm)


# ----------------------------------------------------------------------------------------------------
# decode: the recurrence, token by token
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _recurrent_kernel(q, k, v, g, beta, s_in, s_out, idx, o, cu, T, scale, stride_q, stride_k, stride_v,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, VARLEN: tl.constexpr,
                      HAS_S_IN: tl.constexpr, STORE_S: tl.constexpr, USE_IDX: tl.constexpr):
    iv, hv, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    hk = hv // (HV // HK)
    if VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
    else:
        bos = n * T
        eos = bos + T
    if USE_IDX:
        row = tl.load(idx + n).to(tl.int64)
    else:
        row = n
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    live = (tl.zeros([BV], dtype=tl.int64) + row) >= 0   # a negative pool index marks a padding entry
    row = tl.maximum(row, 0)
    kmask = rk < DK
    vmask = rv < DV
    smask = kmask[:, None] & (vmask & live)[None, :]
    soff = (row * HV + hv) * DK * DV + rk[:, None] * DV + rv[None, :]
    if HAS_S_IN:
        S = tl.load(s_in + soff, mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        qv = tl.load(q + t * stride_q + hk * DK + rk, mask=kmask, other=0.0).to(tl.float32)
        kv = tl.load(k + t * stride_k + hk * DK + rk, mask=kmask, other=0.0).to(tl.float32)
        if L2NORM:
            qv = qv * tl.rsqrt(tl.sum(qv * qv, 0) + 1e-6)
            kv = kv * tl.rsqrt(tl.sum(kv * kv, 0) + 1e-6)
        vv = tl.load(v + t * stride_v + hv * DV + rv, mask=vmask, other=0.0).to(tl.float32)
        gt = tl.load(g + t * HV + hv).to(tl.float32)
        bt = tl.load(beta + t * HV + hv).to(tl.float32)
        S = S * tl.exp(gt)
        delta = bt * (vv - tl.sum(S * kv[:, None], 0))
        S = S + kv[:, None] * delta[None, :]
        ov = tl.sum(S * (qv * scale)[:, None], 0)
        tl.store(o + (t * HV + hv) * DV + rv, tl.where(live, ov, 0.0).to(o.dtype.element_ty), mask=vmask)
    if STORE_S:
        tl.store(s_out + soff, S, mask=smask)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------

def _check_kernel_inputs(q, k, v) -> None:
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise ValueError(f"head dims above 256 are not supported (dk={q.shape[-1]}, dv={v.shape[-1]})")


def _block_v(programs_per_block: int, DV: int, device, choices=(64, 32, 16), waves: float = 0.9) -> int:
    """The widest dv block that gives at least `waves` x (multiprocessors) programs: these kernels
    parallelise only over sequences x heads x dv blocks. Measured on an H100 (BENCHMARKS.md): the chunked
    forward at 1 x 65536 runs 6.4 ms with dv blocks of 32 (128 programs), 7.0 with 16 and 7.5 with 64."""
    for bv in choices:
        if programs_per_block * cdiv(DV, bv) >= waves * num_sms(device):
            return min(bv, next_power_of_2(DV))
    return min(choices[-1], next_power_of_2(DV))


@dataclass(frozen=True)
class Tuning:
    """Launch choices of the chunked kernels; `benchmarks/gdn_gpu.py --sweep` times the alternatives.
    Defaults: the fastest on an H100 (the backward's on an H200; BENCHMARKS.md). Pipelining depth 1 faults
    the GPU (illegal memory access) with Triton 3.6 on an H100, so the sweep starts at 2."""
    block_v: int | None = None       # dv block of the sequential kernels (None: `_block_v`)
    warps: int = 4                   # warps of the sequential kernels
    stages: int = 3                  # Triton's software-pipelining depth for their chunk loops
    pre_scores: bool | None = None   # P by a parallel kernel, read by the sequential ones, instead of formed
    #                                  in every dv block's step. None: when the sequential kernels have fewer
    #                                  than two programs per multiprocessor (latency-bound, e.g. B = 1)
    train_pre_scores: bool | None = True  # the same choice when training, where P also serves the backward's
    #                                  state kernel (None: as pre_scores); on an H200 at 8 x 8192 the scores
    #                                  kernel's P took fwd+bwd 13.7 -> 11.7 ms
    inverse_warps: int = 1           # warps of the T kernel: with one, its 16x16 tiles' reductions stay within
    #                                  a warp (0.79 ms at 1 x 65536 on an H100, against 2.87 with four)
    scores_warps: int = 4            # warps of the P kernel
    bwd_block_v: int = 64            # dv block of the parallel backward kernel's loop (32, or 16 warps: slower
    #                                  on an H200)
    bwd_warps: int = 8


TUNING = Tuning()


def _chunk_forward(q, k, v, g, beta, scale, h0, output_final_state, l2norm, layout, save_states, tuning=None):
    """Kernels 1 and 2 on packed inputs q, k [tokens, Hk, dk], v [tokens, Hv, dv] (each token's heads
    contiguous, tokens strided: `_token_rows`), g, beta [tokens, Hv] fp32 contiguous. Returns (o, final
    state or None, T, P or None, and with save_states the chunk-start states [chunks, Hv, dk, dv] and the
    writes d [tokens, Hv, dv], both in q's dtype, else None, None)."""
    tuning = tuning or TUNING
    n_tok, HK, DK = q.shape
    HV, DV = v.shape[1:]
    BK = max(16, next_power_of_2(DK))
    prec = dot_precision(q.dtype)
    tinv = torch.empty(n_tok, HV, CHUNK, dtype=q.dtype, device=q.device)
    if layout.NB:
        _chunk_inverse_kernel[(layout.NB, HV)](k, g, beta, tinv, layout.cu, layout.seq, layout.pos, k.stride(0),
                                               HK=HK, HV=HV, DK=DK, BKC=min(BK, 64), L2NORM=l2norm, PREC=prec,
                                               num_warps=tuning.inverse_warps)
    BV = tuning.block_v or _block_v(layout.N * HV, DV, q.device)
    pre_scores = tuning.pre_scores
    if save_states and tuning.train_pre_scores is not None:
        pre_scores = tuning.train_pre_scores
    if pre_scores is None:
        pre_scores = layout.N * HV * cdiv(DV, BV) < 2 * num_sms(q.device)
    pmat = None
    if pre_scores:
        pmat = torch.empty_like(tinv)
        if layout.NB:
            _chunk_scores_kernel[(layout.NB, HV)](q, k, g, pmat, layout.cu, layout.seq, layout.pos, scale,
                                                  q.stride(0), k.stride(0),
                                                  HK=HK, HV=HV, DK=DK, BK=BK, L2NORM=l2norm, PREC=prec,
                                                  num_warps=tuning.scores_warps)
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    ht = torch.empty(layout.N, HV, DK, DV, dtype=torch.float32, device=q.device) if output_final_state else None
    hs = torch.empty(layout.NB, HV, DK, DV, dtype=q.dtype, device=q.device) if save_states else None
    wr = torch.empty(n_tok, HV, DV, dtype=q.dtype, device=q.device) if save_states else None
    _chunk_fwd_kernel[(cdiv(DV, BV), HV, layout.N)](
        q, k, v, g, beta, tinv, pmat if pmat is not None else tinv, h0 if h0 is not None else o, o,
        ht if ht is not None else o, hs if hs is not None else o, wr if wr is not None else o, layout.cu,
        layout.first, scale,
        q.stride(0), k.stride(0), v.stride(0), HK=HK, HV=HV, DK=DK, DV=DV, BK=BK, BV=BV, L2NORM=l2norm,
        HAS_H0=h0 is not None,
        STORE_HT=output_final_state, STORE_HS=save_states, PRE_P=pmat is not None, PREC=prec,
        num_warps=tuning.warps, num_stages=tuning.stages)
    return o, ht, tinv, pmat, hs, wr


def _chunk_backward(q, k, v, g, beta, tinv, pmat, hs, wr, do, dht, scale, l2norm, layout, want_dh0,
                    tuning=None):
    """Kernels 3 and 4 (hs, wr: the forward's chunk-start states and writes d). Returns (dq, dk per key head
    in q's dtype; dv; dg, dbeta fp32; dh0 or None)."""
    tuning = tuning or TUNING
    n_tok, HK, DK = q.shape
    HV, DV = v.shape[1:]
    BK = max(16, next_power_of_2(DK))
    prec = dot_precision(q.dtype)
    dhs = torch.empty_like(hs)
    dh0 = torch.empty(layout.N, HV, DK, DV, dtype=torch.float32, device=q.device) if want_dh0 else None
    y = torch.empty(n_tok, HV, DV, dtype=q.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    BV = tuning.block_v or _block_v(layout.N * HV, DV, q.device)
    _chunk_bwd_state_kernel[(cdiv(DV, BV), HV, layout.N)](
        q, k, g, beta, tinv, pmat if pmat is not None else tinv, do, dht if dht is not None else do,
        dh0 if dh0 is not None else do, dhs, y, dv, layout.cu, layout.first, scale, q.stride(0), k.stride(0),
        HK=HK, HV=HV, DK=DK, DV=DV, BK=BK,
        BV=BV, L2NORM=l2norm, HAS_DHT=dht is not None, STORE_DH0=want_dh0, PRE_P=pmat is not None,
        PREC=prec, num_warps=tuning.warps, num_stages=tuning.stages)
    dq = torch.empty(n_tok, HV, DK, dtype=q.dtype, device=q.device)  # per value head: half the bytes of fp32
    dk = torch.empty_like(dq)
    dg = torch.empty(n_tok, HV, dtype=torch.float32, device=q.device)
    dbeta = torch.empty_like(dg)
    if layout.NB:
        _chunk_bwd_kernel[(layout.NB, HV)](
            q, k, v, g, beta, hs, dhs, do, wr, y, dq, dk, dg, dbeta, layout.cu, layout.seq,
            layout.pos, scale, q.stride(0), k.stride(0), v.stride(0), HK=HK, HV=HV, DK=DK, DV=DV, BK=BK,
            BV=min(tuning.bwd_block_v, next_power_of_2(DV)), L2NORM=l2norm, PREC=prec,
            num_warps=tuning.bwd_warps)
    r = HV // HK  # value heads of a group share their key head: their dq/dk are summed
    if l2norm:  # the sum inside the norm's backward kernel, which writes q's dtype
        dq = norm_backward(L2, q, None, None, dq, 1e-6, group=r)[0]
        dk = norm_backward(L2, k, None, None, dk, 1e-6, group=r)[0]
    elif r > 1:
        dq, dk = dq.view(n_tok, HK, r, DK).sum(2), dk.view(n_tok, HK, r, DK).sum(2)
    return dq, dk, dv, dg, dbeta, dh0


def _backward_kernel_faults(q: torch.Tensor, dk: int, dv: int) -> bool:
    """Whether `_chunk_bwd_kernel` is known to fault here. Triton 3.4 to 3.7.0 miscompiles transposes of
    matrix-product results on Hopper (fla-org/flash-linear-attention #640, #826; fixed in 3.7.1), and on an
    H100 with Triton 3.6 this kernel hit an illegal memory access in bf16 at dk = dv = 32 (fp32, and bf16
    at dk = dv = 128, the model's head size, were checked there and are right). There the backward runs
    the reference instead, so training stays correct at the other head sizes, only slower."""
    if not q.is_cuda or q.dtype == torch.float32 or (dk, dv) == (128, 128):
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9 and (3, 4) <= TRITON_VERSION < (3, 7, 1)


def _reference_backward(ctx, do, dht):
    """Gradients by autograd through `chunk_gated_delta_rule_ref`, recomputed from the saved inputs."""
    q, k, v, g, beta, h0 = ctx.saved_tensors
    with torch.enable_grad():
        ins = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, g, beta, h0)]
        o, ht = chunk_gated_delta_rule_ref(*ins[:5], scale=ctx.scale, initial_state=ins[5],
                                           output_final_state=dht is not None, use_qk_l2norm_in_kernel=ctx.l2norm,
                                           cu_seqlens=ctx.cu_seqlens)
        outs, grads_out = [o], [do]
        if dht is not None:
            outs.append(ht)
            grads_out.append(dht)
        wanted = [t for t in ins if t is not None]
        grads = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in ins)


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, l2norm, cu_seqlens):
        B, T, HK, DK = q.shape
        HV, DV = v.shape[2:]
        layout = blocks(B, T, cu_seqlens, CHUNK, False, q.device)
        qp, kp, vp = _token_rows(q), _token_rows(k), _token_rows(v)  # views where the strides allow
        gp = g.float().contiguous().view(B * T, HV)
        bp = beta.float().contiguous().view(B * T, HV)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        training = any(ctx.needs_input_grad)
        ctx.reference = training and _backward_kernel_faults(q, DK, DV)
        o, ht, tinv, pmat, hs, wr = _chunk_forward(qp, kp, vp, gp, bp, scale, h0, output_final_state, l2norm,
                                                   layout, save_states=training and not ctx.reference)
        if ctx.reference:
            ctx.save_for_backward(q, k, v, g, beta, initial_state)
            ctx.scale, ctx.l2norm, ctx.cu_seqlens = scale, l2norm, cu_seqlens
        elif training:
            ctx.save_for_backward(qp, kp, vp, gp, bp, tinv, pmat, hs, wr)
            ctx.layout, ctx.scale, ctx.l2norm = layout, scale, l2norm
            ctx.shapes = (q.shape, v.shape, g.dtype, beta.dtype,
                          initial_state.dtype if initial_state is not None else None)
        return o.view(v.shape), ht

    @staticmethod
    def backward(ctx, do, dht):
        if ctx.reference:
            dq, dk, dv, dg, dbeta, dh0 = _reference_backward(ctx, do, dht)
            return dq, dk, dv, dg, dbeta, None, dh0, None, None, None
        qp, kp, vp, gp, bp, tinv, pmat, hs, wr = ctx.saved_tensors
        q_shape, v_shape, g_dtype, beta_dtype, h0_dtype = ctx.shapes
        dop = do.contiguous().view(vp.shape)
        dq, dk, dv, dg, dbeta, dh0 = _chunk_backward(
            qp, kp, vp, gp, bp, tinv, pmat, hs, wr, dop, dht.float().contiguous() if dht is not None else None,
            ctx.scale, ctx.l2norm, ctx.layout, want_dh0=h0_dtype is not None)
        return (dq.view(q_shape), dk.view(q_shape), dv.view(v_shape),
                dg.to(g_dtype).view(v_shape[:3]), dbeta.to(beta_dtype).view(v_shape[:3]),
                None, dh0.to(h0_dtype) if dh0 is not None else None, None, None, None)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """Triton `chunk_gated_delta_rule_ref` (differentiable in q, k, v, g, beta, initial_state).

    q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g (log decay), beta [B, T, Hv]; initial_state [N, Hv, dk, dv];
    cu_seqlens [N+1] packs N sequences into B = 1. Returns (o [B, T, Hv, dv] in v's dtype, final state
    [N, Hv, dk, dv] fp32 or None)."""
    check_gated_delta_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    _check_kernel_inputs(q, k, v)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return _ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state,
                                      use_qk_l2norm_in_kernel, cu_seqlens)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] as [B*T, H, D] with each token's [H, D] block contiguous: a view where the strides allow
    (e.g. q, k, v sliced out of one projection), else a contiguous copy."""
    rows = x.reshape(-1, *x.shape[2:])  # a view when B and T merge, else already a contiguous copy
    return rows if rows.stride()[1:] == (x.shape[3], 1) else rows.contiguous()


def _recurrent(q, k, v, g, beta, scale, s_in, s_out, idx, cu, l2norm, N):
    B, T, HK, DK = q.shape
    HV, DV = v.shape[2:]
    BK = max(16, next_power_of_2(DK))
    BV = _block_v(N * HV, DV, q.device, choices=(64, 32, 16, 8), waves=1.0)
    o = torch.empty(B, T, HV, DV, dtype=v.dtype, device=v.device)
    q, k, v = _token_rows(q), _token_rows(k), _token_rows(v)
    _recurrent_kernel[(cdiv(DV, BV), HV, N)](
        q, k, v, g.contiguous(), beta.contiguous(),
        s_in if s_in is not None else o, s_out if s_out is not None else o, idx if idx is not None else o,
        o, cu if cu is not None else o, T, scale, q.stride(0), k.stride(0), v.stride(0),
        HK=HK, HV=HV, DK=DK, DV=DV, BK=BK, BV=BV, L2NORM=l2norm,
        VARLEN=cu is not None, HAS_S_IN=s_in is not None, STORE_S=s_out is not None, USE_IDX=idx is not None,
        num_warps=4 if BV >= 32 else 2)
    return o


def _no_grad_check(*tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError("the Triton recurrent gated delta rule is inference-only (no autograd); "
                           "use chunk_gated_delta_rule for training")


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """Triton `recurrent_gated_delta_rule_ref` for decode (a few tokens a sequence), inference only.
    Returns (o [B, T, Hv, dv] in v's dtype, final state [N, Hv, dk, dv] fp32 or None)."""
    N = check_gated_delta_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    _check_kernel_inputs(q, k, v)
    _no_grad_check(q, k, v, g, beta, initial_state)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    HV, DK, DV = v.shape[2], q.shape[3], v.shape[3]
    s_in = initial_state.float().contiguous() if initial_state is not None else None
    s_out = torch.empty(N, HV, DK, DV, dtype=torch.float32, device=q.device) if output_final_state else None
    cu = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
    o = _recurrent(q, k, v, g, beta, scale, s_in, s_out, None, cu, use_qk_l2norm_in_kernel, N)
    return o, s_out


def recurrent_gated_delta_rule_update(q, k, v, g, beta, state_pool, state_indices, scale=None,
                                      use_qk_l2norm_in_kernel=False):
    """Triton `recurrent_gated_delta_rule_update_ref`: advance B sequences whose states live in rows
    `state_indices` [B] of `state_pool` [P, Hv, dk, dv] (fp32, contiguous), in place; returns o
    [B, T, Hv, dv]. A negative index marks a padding entry: its o is zero and no state is touched.
    No host synchronisation, so it can be captured in a CUDA graph."""
    check_pool_update_inputs(q, k, v, g, beta, state_pool, state_indices)
    _check_kernel_inputs(q, k, v)
    _no_grad_check(q, k, v, g, beta)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return _recurrent(q, k, v, g, beta, scale, state_pool, state_pool, state_indices, None,
                      use_qk_l2norm_in_kernel, q.shape[0])
