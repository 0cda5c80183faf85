"""Fused element-wise epilogues (`qwen3next.ops.fused`): the references against per-element formulas, the
Triton kernels against the references (fp32 in Triton's interpreter on the CPU, bf16 on a GPU)."""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from qwen3next.ops.fused import (
    add_rms_norm_ref, gdn_gates_ref, qkvz_causal_conv1d_ref, rms_norm_rotary_ref, sigmoid_gate_ref, split_qkvz_ref,
)
from qwen3next.ops.norms import gated_rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    from qwen3next.ops.triton import fused

    return fused


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _gates_inputs(lead, Hk, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hv = Hk * r
    ba = (torch.randn(*lead, 2 * Hv, generator=g) * 4).to(DEVICE, dtype)  # wide: softplus' both branches
    A_log = torch.empty(Hv).uniform_(0.01, 16, generator=g).log().to(DEVICE)
    dt_bias = torch.randn(Hv, generator=g).to(DEVICE)
    return ba, A_log, dt_bias


@pytest.mark.parametrize("Hk,r,dk,dv", [(2, 2, 3, 5), (3, 1, 4, 4)])
def test_split_qkvz_reference_picks_each_heads_columns(Hk, r, dk, dv):
    W = 2 * dk + 2 * r * dv
    qkvz = torch.randn(2, 3, Hk * W, dtype=torch.float64)
    mixed, z = split_qkvz_ref(qkvz, Hk, Hk * r, dk, dv)
    key_dim = Hk * dk
    assert mixed.shape == (2, 3, 2 * key_dim + Hk * r * dv) and z.shape == (2, 3, Hk * r, dv)
    for h in range(Hk):
        grp = qkvz[..., h * W:(h + 1) * W]
        assert torch.equal(mixed[..., h * dk:(h + 1) * dk], grp[..., :dk])
        assert torch.equal(mixed[..., key_dim + h * dk:key_dim + (h + 1) * dk], grp[..., dk:2 * dk])
        v0 = 2 * key_dim + h * r * dv
        assert torch.equal(mixed[..., v0:v0 + r * dv], grp[..., 2 * dk:2 * dk + r * dv])
        assert torch.equal(z[..., h * r:(h + 1) * r, :].flatten(-2), grp[..., 2 * dk + r * dv:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,Hk,r,dk,dv,strided", [((1, 37), 2, 2, 16, 16, False), ((3, 5), 3, 1, 8, 24, True),
                                                     ((1,), 4, 2, 32, 16, False)])
def test_split_qkvz_kernel_and_gradient(dtype, lead, Hk, r, dk, dv, strided):
    """The split kernel (one read of each group, rows of a strided view too) and its backward against the
    reference and autograd through it: exact, as both only move elements."""
    fused = _triton()
    W = Hk * (2 * dk + 2 * r * dv)
    g = torch.Generator().manual_seed(W)
    full = torch.randn(*lead, 2 * W if strided else W, generator=g).to(DEVICE, dtype)
    qkvz = full[..., W:] if strided else full
    dmixed = torch.randn(*lead, Hk * (2 * dk + r * dv), generator=g).to(DEVICE, dtype)
    dz = torch.randn(*lead, Hk * r, dv, generator=g).to(DEVICE, dtype)
    with torch.no_grad():
        plain = fused.split_qkvz(qkvz, Hk, Hk * r, dk, dv)
    results = []
    for fn in (fused.split_qkvz, split_qkvz_ref):
        leaf = qkvz.detach().clone().requires_grad_(True)
        mixed, z = fn(leaf, Hk, Hk * r, dk, dv)
        results.append([mixed.detach(), z.detach(), *torch.autograd.grad((mixed, z), leaf, (dmixed, dz))])
    for got, ungraded, want in zip(results[0], plain + (None,), results[1]):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
        assert ungraded is None or torch.equal(ungraded, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hk,r,dk,dv,cu", [
    (1, 65, 2, 2, 16, 16, None), (2, 63, 3, 1, 8, 24, None), (1, 1, 2, 2, 32, 16, None), (2, 64, 1, 2, 16, 8, None),
    (1, 70, 2, 2, 16, 16, [0, 5, 5, 64, 70]),
])
@pytest.mark.parametrize("with_state", [False, True])
def test_qkvz_causal_conv1d_reads_the_projection_in_place(dtype, B, T, Hk, r, dk, dv, cu, with_state):
    """The conv over qkvz's q, k, v columns (read in place, z a view of qkvz) equals the split then the conv, in
    outputs, z and final state; under autograd (the split and the conv kernels) in gradients too."""
    fused = _triton()
    W, C = Hk * (2 * dk + 2 * r * dv), Hk * (2 * dk + r * dv)
    g = torch.Generator().manual_seed(T * W + with_state)
    qkvz = torch.randn(B, T, W, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(C, 4, generator=g) / 2).to(DEVICE, dtype)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=DEVICE) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    state = torch.randn(N, C, 3, generator=g).to(DEVICE, dtype) if with_state else None
    args = (qkvz, weight, Hk, Hk * r, dk, dv)
    kwargs = dict(initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    want = qkvz_causal_conv1d_ref(*args, **kwargs)
    got = fused.qkvz_causal_conv1d(*args, **kwargs)
    assert got[1].data_ptr() >= qkvz.data_ptr() and got[1].shape == (B, T, Hk, r, dv)  # a view, not a copy
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and not a.isnan().any()
        assert rel_err(a, b) < _tol(dtype)
    grads = []
    for fn in (fused.qkvz_causal_conv1d, qkvz_causal_conv1d_ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in (qkvz, weight)]
        y, z, final = fn(*leaves, Hk, Hk * r, dk, dv, **kwargs)
        gen = torch.Generator().manual_seed(1)
        loss = sum((t.float() * torch.randn(t.shape, generator=gen).to(DEVICE)).sum() for t in (y, z, final))
        grads.append(torch.autograd.grad(loss, leaves))
    for a, b in zip(*grads):
        assert rel_err(a, b) < _tol(dtype) and not a.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_reads_a_strided_gate(dtype):
    """The gated RMSNorm's gate as a view of the projection it comes from ([B, T, Hk, r, dv] inside rows of qkvz),
    and with its rows stepping in another order (batch inside time): the same as with a contiguous gate."""
    pytest.importorskip("triton", reason="triton is not installed")
    _triton()
    from qwen3next.ops.triton import norms

    g = torch.Generator().manual_seed(3)
    B, T, Hk, r, dv = 2, 37, 3, 2, 16
    qkvz = torch.randn(B, T, Hk, 4 * r * dv, generator=g).to(DEVICE, dtype)
    z = qkvz[..., 3 * r * dv:].unflatten(-1, (r, dv))
    x = torch.randn(B, T, Hk, r, dv, generator=g).to(DEVICE, dtype)
    w = torch.randn(dv, generator=g).to(DEVICE, dtype)
    want = gated_rms_norm_ref(x, z.contiguous(), w)
    assert rel_err(norms.gated_rms_norm(x, z, w), want) < _tol(dtype)
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)  # B and T in the wrong order: no 3-dim row view
    assert rel_err(norms.gated_rms_norm(x, zt, w), want) < _tol(dtype)


@pytest.mark.parametrize("Hk,r", [(2, 2), (3, 1), (1, 5)])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_gdn_gates_reference_picks_each_heads_columns(Hk, r, clip):
    ba, A_log, dt_bias = _gates_inputs((2, 3), Hk, r, torch.float64)
    beta, g = gdn_gates_ref(ba, A_log.double(), dt_bias.double(), Hk, clip)
    for h in range(Hk * r):
        j, i = divmod(h, r)
        b, a = ba[..., j * 2 * r + i], ba[..., j * 2 * r + r + i]
        if clip is not None:
            b = b.clamp(-clip, clip)
        assert torch.allclose(beta[..., h], torch.sigmoid(b))
        assert torch.allclose(g[..., h], -A_log[h].double().exp() * F.softplus(a + dt_bias[h].double()))
    assert beta.dtype == g.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,Hk,r", [((1, 1), 16, 2), ((3, 37), 2, 2), ((5,), 3, 1)])
@pytest.mark.parametrize("clip", [None, 2.0])
def test_gdn_gates_kernel(dtype, lead, Hk, r, clip):
    fused = _triton()
    ba, A_log, dt_bias = _gates_inputs(lead, Hk, r, dtype, seed=len(lead) + Hk)
    want = gdn_gates_ref(ba, A_log, dt_bias, Hk, clip)
    got = fused.gdn_gates(ba, A_log, dt_bias, Hk, clip)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == torch.float32 and not a.isnan().any()
        assert rel_err(a, b) <= 1e-5  # fp32 arithmetic on the same rounded inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 100), (2, 2048)])
def test_add_rms_norm_kernel(dtype, shape):
    fused = _triton()
    g = torch.Generator().manual_seed(shape[-1])
    x, res = (torch.randn(*shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (torch.randn(shape[-1], generator=g) * 0.1).to(DEVICE, dtype)
    s, y = fused.add_rms_norm(x, res, w, 1e-6)
    s_ref, y_ref = add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(s, s_ref)  # one rounding of an exact fp32 sum, as torch's add
    assert rel_err(y, y_ref) <= _tol(dtype) and not y.isnan().any()
    assert torch.allclose(y_ref.double(), (s.double() / s.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
                          * (1 + w.double()), rtol=_tol(dtype), atol=_tol(dtype))


def test_add_rms_norm_mixed_dtypes_promote_like_torch():
    """Under autocast a bf16 mixer output meets the fp32 residual stream: the sum stays fp32, as x + h does."""
    fused = _triton()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(DEVICE)
    h = torch.randn(5, 96, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(96, generator=g) * 0.1).to(DEVICE)
    for a, b in ((x, h), (h, x)):
        s, y = fused.add_rms_norm(a, b, w, 1e-6)
        s_ref, y_ref = add_rms_norm_ref(a, b, w, 1e-6)
        assert s.dtype == y.dtype == torch.float32 and torch.equal(s, s_ref) and torch.equal(s, a + b)
        assert rel_err(y, y_ref) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bcast,residual", [((2, 3, 96), False, False), ((5, 2048), True, True),
                                                  ((1, 1, 33), False, True), ((7, 1), True, False)])
def test_sigmoid_gate_kernel(dtype, shape, bcast, residual):
    fused = _triton()
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    gate = torch.randn(*shape[:-1], 1 if bcast else shape[-1], generator=g).to(DEVICE, dtype)
    res = torch.randn(*shape, generator=g).to(DEVICE, dtype) if residual else None
    got = fused.sigmoid_gate(x, gate, res)
    want = sigmoid_gate_ref(x, gate, res)
    assert rel_err(got, want) <= _tol(dtype) and not got.isnan().any()
    plain = x.double() * torch.sigmoid(gate.double()) + (0 if res is None else res.double())
    assert rel_err(want, plain) <= _tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_gate_reads_strided_gate_rows(dtype):
    """Attention's gate: the second half of each head's q_proj columns, a view with evenly strided rows."""
    fused = _triton()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 16, generator=g).to(DEVICE, dtype)
    gate = torch.randn(2, 3, 4, 32, generator=g).to(DEVICE, dtype)[..., 16:]
    assert not gate.is_contiguous()
    got = fused.sigmoid_gate(x, gate)
    assert rel_err(got, sigmoid_gate_ref(x, gate)) <= _tol(dtype) and got.shape == x.shape


def _rotary_inputs(B, T, H, hd, r, dtype, seed=0):
    """x as the query half of a [B, T, H, 2 hd] projection (a strided view), weight, and rope tables."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, 2 * hd, generator=g).to(DEVICE, dtype)[..., :hd]
    w = (torch.randn(hd, generator=g) * 0.1).to(DEVICE, dtype)
    angle = torch.rand(B, T, r // 2, generator=g) * 6.3
    angle = torch.cat([angle, angle], -1)
    return x, w, angle.cos().to(DEVICE, dtype), angle.sin().to(DEVICE, dtype)


def test_rms_norm_rotary_reference_is_norm_then_rotation():
    x, w, cos, sin = _rotary_inputs(2, 3, 2, 16, 8, torch.float64)
    y = rms_norm_rotary_ref(x, w, cos, sin, 1e-6)
    n = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + w)
    c, s = cos[:, :, None], sin[:, :, None]
    assert torch.allclose(y[..., :4], n[..., :4] * c[..., :4] - n[..., 4:8] * s[..., :4])
    assert torch.allclose(y[..., 4:8], n[..., 4:8] * c[..., 4:8] + n[..., :4] * s[..., 4:8])
    assert torch.allclose(y[..., 8:], n[..., 8:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,hd,r", [(1, 1, 2, 32, 8), (2, 5, 3, 64, 64), (1, 7, 1, 48, 16), (3, 2, 16, 256, 64)])
def test_rms_norm_rotary_kernel(dtype, B, T, H, hd, r):
    fused = _triton()
    x, w, cos, sin = _rotary_inputs(B, T, H, hd, r, dtype, seed=hd + r)
    got = fused.rms_norm_rotary(x, w, cos, sin, 1e-6)
    want = rms_norm_rotary_ref(x, w, cos, sin, 1e-6)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous() and not got.isnan().any()
    assert rel_err(got, want) <= _tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bcast,residual,strided", [((2, 3, 96), False, False, True),
                                                          ((5, 2100), True, True, False),
                                                          ((1, 1, 33), False, True, False), ((7, 1), True, False, False)])
def test_sigmoid_gate_gradients(dtype, shape, bcast, residual, strided):
    """The backward kernel against autograd through the reference: x, the gate (one per row, summed over a
    row longer than one block, or one per element, a strided view like attention's) and the residual."""
    fused = _triton()
    g = torch.Generator().manual_seed(shape[-1])
    width = 1 if bcast else shape[-1]
    gate = torch.randn(*shape[:-1], 2 * width if strided else width, generator=g).to(DEVICE, dtype)
    gate = gate[..., width:] if strided else gate
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    res = torch.randn(*shape, generator=g).to(DEVICE, dtype) if residual else None
    dout = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    results = []
    for fn in (fused.sigmoid_gate, sigmoid_gate_ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate, res) if t is not None]
        out = fn(*leaves) if residual else fn(*leaves, None)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, dout)])
    for got, want in zip(*results):
        assert got.shape == want.shape and got.dtype == want.dtype and not got.isnan().any()
        assert rel_err(got.float(), want.float()) <= _tol(dtype)


def test_kernels_defer_to_the_reference_under_autograd():
    fused = _triton()
    x, w, cos, sin = _rotary_inputs(1, 3, 2, 16, 8, torch.float32)
    dy = torch.randn(x.shape, device=DEVICE)
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    grads = [torch.autograd.grad(fn(t, w, cos, sin), t, dy)[0]
             for fn, t in zip((fused.rms_norm_rotary, rms_norm_rotary_ref), leaves)]
    assert rel_err(*grads) <= 1e-5


def test_bad_inputs():
    fused = _triton()
    with pytest.raises(ValueError, match="qkvz must be"):
        fused.split_qkvz(torch.randn(2, 23, device=DEVICE), 2, 4, 2, 2)
    with pytest.raises(ValueError, match="multiple of key heads"):
        fused.split_qkvz(torch.randn(2, 24, device=DEVICE), 2, 3, 2, 2)
    ba, A_log, dt_bias = _gates_inputs((2,), 2, 2, torch.float32)
    with pytest.raises(ValueError, match="multiple of key heads"):
        fused.gdn_gates(ba, A_log, dt_bias, 3)
    with pytest.raises(ValueError, match="ba must be"):
        fused.gdn_gates(ba[..., :-1], A_log, dt_bias, 2)
    x = torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        fused.add_rms_norm(x, x[:1], torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="gate must be like x"):
        fused.sigmoid_gate(x, torch.randn(2, 3, device=DEVICE))
    x, w, cos, sin = _rotary_inputs(1, 3, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="even r"):
        fused.rms_norm_rotary(x, w, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm_rotary(x, w[:-1], cos, sin)
