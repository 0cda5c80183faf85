"""Triton kernels of the Gated DeltaNet layer against their plain-PyTorch references, forward and gradients.

Runs on the CPU through Triton's interpreter (fp32: the interpreter's bf16 products are wrong), at small
sizes: chunk boundaries (T = 1, 63, 64, 65), packed sequences incl. an empty one, GVA ratios 1 and 2.
bf16 on the GPU is checked by benchmarks/gdn_gpu.py.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

import qwen3next.ops as ops  # noqa: E402
from qwen3next.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402
from qwen3next.ops.gated_delta import (  # noqa: E402
    chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref, recurrent_gated_delta_rule_update_ref,
)
from qwen3next.ops.norms import gated_rms_norm_ref, l2_norm_ref, rms_norm_ref  # noqa: E402
from qwen3next.ops.triton import conv as tconv  # noqa: E402
from qwen3next.ops.triton import gated_delta as tgd  # noqa: E402
from qwen3next.ops.triton import norms as tnorms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1: the kernels cannot run", allow_module_level=True)

FWD_TOL = 1e-5   # fp32, exact math
GRAD_TOL = 3e-5  # fp32 through chains of products (dq/dk collect ~10 product terms)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in the kernel's result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gdn_inputs(T, HK, r, DK, DV, N, l2norm, seed):
    """Fresh random inputs; without the in-kernel norm q and k arrive L2-normalised (as the model's are)."""
    gen = torch.Generator().manual_seed(seed)
    HV = HK * r
    B = 1 if N is None else N
    q = torch.randn(B, T, HK, DK, generator=gen)
    k = torch.randn(B, T, HK, DK, generator=gen)
    if not l2norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, DV, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2.0)
    beta = torch.rand(B, T, HV, generator=gen)
    return [x.to(DEVICE).requires_grad_() for x in (q, k, v, g, beta)]


def check_chunk(T, HK, r, l2norm, cu_seqlens=None, DK=32, DV=16, seed=0):
    N = 1 if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, beta = gdn_inputs(T, HK, r, DK, DV, None if cu_seqlens is not None else 2, l2norm, seed)
    if cu_seqlens is None:
        N = 2
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(N, HK * r, DK, DV, generator=gen).to(DEVICE).requires_grad_()
    inputs = (q, k, v, g, beta, h0)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm, cu_seqlens=cu_seqlens)
    o, s = tgd.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    o_ref, s_ref = chunk_gated_delta_rule_ref(q, k, v, g, beta, **kw)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and s.dtype == torch.float32
    assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), inputs)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_ref):
        assert rel(a, b) < GRAD_TOL, f"{name}: rel err {rel(a, b):.2e}"


@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("r", [1, 2])
def test_chunk_gated_delta_rule_matches_reference(T, r):
    check_chunk(T, HK=1, r=r, l2norm=(T % 2 == 1), seed=T + 10 * r)


@pytest.mark.parametrize("r", [1, 2])
def test_chunk_gated_delta_rule_varlen(r):
    cu = torch.tensor([0, 1, 64, 64, 129, 192], dtype=torch.int32, device=DEVICE)  # 1, 63, 0, 65, 63 steps
    check_chunk(192, HK=1, r=r, l2norm=True, cu_seqlens=cu, seed=r)


@pytest.mark.parametrize("tuning", [tgd.Tuning(pre_scores=True, stages=2, block_v=16, bwd_block_v=32, warps=8,
                                               inverse_warps=4, scores_warps=1),
                                    tgd.Tuning(pre_scores=False, train_pre_scores=None, stages=3,
                                               bwd_warps=4, inverse_warps=2)])
def test_chunk_launch_choices_give_the_same_results(monkeypatch, tuning):
    """Every launch choice that the GPU benchmark sweeps (benchmarks/gdn_gpu.py --sweep) is exact too."""
    monkeypatch.setattr(tgd, "TUNING", tuning)
    cu = torch.tensor([0, 65, 66, 130], dtype=torch.int32, device=DEVICE)
    check_chunk(130, HK=2, r=2, l2norm=True, cu_seqlens=cu, DV=32, seed=4)


def test_reference_backward_where_the_kernel_faults(monkeypatch):
    """Where `_chunk_bwd_kernel` is known to fault (Hopper, Triton 3.4-3.7.0, half precision, head dims other
    than 128) the backward recomputes through the reference: same gradients, initial state and varlen included."""
    monkeypatch.setattr(tgd, "_backward_kernel_faults", lambda q, dk, dv: True)
    monkeypatch.setattr(tgd, "_chunk_backward", lambda *a, **kw: pytest.fail("the backward kernels ran"))
    cu = torch.tensor([0, 65, 66, 130], dtype=torch.int32, device=DEVICE)
    check_chunk(130, HK=1, r=2, l2norm=True, cu_seqlens=cu, seed=6)
    check_chunk(65, HK=2, r=1, l2norm=False, seed=7)


def test_which_setups_take_the_reference_backward(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tgd, "TRITON_VERSION", (3, 6, 0))
    q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    assert tgd._backward_kernel_faults(q, 32, 32)
    assert not tgd._backward_kernel_faults(q, 128, 128)                                   # checked on an H100
    assert not tgd._backward_kernel_faults(SimpleNamespace(**{**vars(q), "dtype": torch.float32}), 32, 32)
    assert not tgd._backward_kernel_faults(SimpleNamespace(**{**vars(q), "is_cuda": False}), 32, 32)
    monkeypatch.setattr(tgd, "TRITON_VERSION", (3, 7, 1))                                # fixed upstream
    assert not tgd._backward_kernel_faults(q, 32, 32)
    monkeypatch.setattr(tgd, "TRITON_VERSION", (3, 6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # not Hopper
    assert not tgd._backward_kernel_faults(q, 32, 32)


def test_chunk_without_state_and_gradients_of_inputs_only():
    q, k, v, g, beta = gdn_inputs(70, 1, 1, 16, 16, 1, True, seed=3)
    o, s = tgd.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o_ref, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    assert s is None and rel(o, o_ref) < FWD_TOL
    grads = torch.autograd.grad(o.square().sum(), (q, k, v, g, beta))
    grads_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v, g, beta))
    assert all(rel(a, b) < GRAD_TOL for a, b in zip(grads, grads_ref))


@pytest.mark.parametrize("cu", [None, [0, 3, 3, 7]])
def test_fused_recurrent_matches_reference(cu):
    cu_t = torch.tensor(cu, device=DEVICE) if cu is not None else None
    q, k, v, g, beta = (x.detach() for x in gdn_inputs(7, 2, 2, 16, 16, 1 if cu else 2, True, seed=5))
    h0 = torch.randn(3 if cu else 2, 4, 16, 16, device=DEVICE)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_t)
    o, s = tgd.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, **kw)
    assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL


def test_pool_update_in_place_skips_padding():
    q, k, v, g, beta = (x.detach() for x in gdn_inputs(2, 1, 2, 16, 16, 3, False, seed=7))
    pool = torch.randn(5, 2, 16, 16, device=DEVICE)
    pool_ref, pool_before = pool.clone(), pool.clone()
    idx = torch.tensor([3, -1, 0], dtype=torch.int32, device=DEVICE)
    o = tgd.recurrent_gated_delta_rule_update(q, k, v, g, beta, pool, idx)
    o_ref = recurrent_gated_delta_rule_update_ref(q, k, v, g, beta, pool_ref, idx)
    assert rel(o, o_ref) < FWD_TOL and rel(pool, pool_ref) < FWD_TOL
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert not torch.equal(pool[[0, 3]], pool_before[[0, 3]])         # updated in place
    assert torch.equal(pool[[1, 2, 4]], pool_before[[1, 2, 4]])       # other rows untouched


def sliced_inputs(B, T, requires_grad=False, HK=2, r=2, D=16):
    """(packed [B, T, channels]; q, k, v as views of it, with 5 spare channels leaving a gap after each token;
    g; beta): the layout in which the model hands its conv output to the kernels."""
    packed = torch.randn(B, T, HK * D * 2 + HK * r * D + 5, device=DEVICE, requires_grad=requires_grad)
    q, k, v = (t.unflatten(-1, (-1, D)) for t in packed[..., :-5].split([HK * D, HK * D, HK * r * D], dim=-1))
    assert not q.is_contiguous() and not v.is_contiguous()
    g = F.logsigmoid(torch.randn(B, T, HK * r, device=DEVICE))
    return packed, q, k, v, g, torch.rand(B, T, HK * r, device=DEVICE)


def test_chunk_reads_q_k_v_sliced_from_one_projection():
    """The model passes q, k, v as views of its conv output [B, T, channels]: same outputs and gradients."""
    packed, q, k, v, g, beta = sliced_inputs(2, 70, requires_grad=True)
    o = tgd.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]
    o_ref = chunk_gated_delta_rule_ref(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]
    do = torch.randn_like(o_ref)
    grad = torch.autograd.grad((o * do).sum(), packed)[0]
    grad_ref = torch.autograd.grad((o_ref * do).sum(), packed)[0]
    assert rel(o, o_ref) < FWD_TOL and rel(grad, grad_ref) < GRAD_TOL


@pytest.mark.parametrize("T", [1, 3])
def test_recurrent_reads_q_k_v_sliced_from_one_projection(T):
    """The decode step passes q, k, v as views of one [B, T, channels] tensor (no copies): same results."""
    _, q, k, v, g, beta = sliced_inputs(3, T)
    pool = torch.randn(4, 4, 16, 16, device=DEVICE)
    pool_ref = pool.clone()
    idx = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEVICE)
    o = tgd.recurrent_gated_delta_rule_update(q, k, v, g, beta, pool, idx, use_qk_l2norm_in_kernel=True)
    o_ref = recurrent_gated_delta_rule_update_ref(q, k, v, g, beta, pool_ref, idx, use_qk_l2norm_in_kernel=True)
    assert rel(o, o_ref) < FWD_TOL and rel(pool, pool_ref) < FWD_TOL


@pytest.mark.parametrize("B,T,block,at_least_one", [(2, 130, 64, False), (3, 64, 64, True), (1, 0, 64, True),
                                                   (2, 0, 64, False)])
def test_batch_block_layout_is_the_packed_one_and_kept(B, T, block, at_least_one):
    """A [B, T] batch's block layout equals that of B packed sequences of T tokens, and the same shape on
    the same device (and stream) gets the same layout back: built once for every layer of a forward."""
    from qwen3next.ops.triton import blocks

    device = torch.device(DEVICE)
    batch = blocks(B, T, None, block, at_least_one, device)
    packed = blocks(1, B * T, torch.arange(B + 1) * T, block, at_least_one, device)
    assert batch.offsets == packed.offsets and (batch.N, batch.NB) == (packed.N, packed.NB)
    for name in ("cu", "seq", "pos", "first"):
        assert torch.equal(getattr(batch, name), getattr(packed, name)), name
    assert blocks(B, T, None, block, at_least_one, device) is batch


def test_bad_inputs_get_clear_errors():
    q, k, v, g, beta = gdn_inputs(4, 1, 1, 16, 16, 1, False, seed=0)
    with pytest.raises(TypeError, match="share one dtype"):
        tgd.chunk_gated_delta_rule(q, k, v.detach().double(), g, beta)
    with pytest.raises(RuntimeError, match="inference-only"):
        tgd.fused_recurrent_gated_delta_rule(q, k, v, g, beta)
    with pytest.raises(ValueError, match="state_pool"):
        tgd.recurrent_gated_delta_rule_update(*(x.detach() for x in (q, k, v, g, beta)),
                                              torch.zeros(2, 1, 16, 8), torch.zeros(1, dtype=torch.int32))


def test_dispatch_uses_the_kernels(monkeypatch):
    monkeypatch.setenv("QWEN3NEXT_BACKEND", "triton")
    called = []
    real = tgd.chunk_gated_delta_rule
    monkeypatch.setattr(tgd, "chunk_gated_delta_rule", lambda *a, **kw: called.append(1) or real(*a, **kw))
    ops._triton_kernel.cache_clear()  # the dispatcher keeps the kernel it resolved: resolve the stand-in
    q, k, v, g, beta = (x.detach() for x in gdn_inputs(5, 1, 1, 16, 16, 1, False, seed=1))
    o, _ = ops.chunk_gated_delta_rule(q, k, v, g, beta)
    ops._triton_kernel.cache_clear()
    assert called and rel(o, chunk_gated_delta_rule_ref(q, k, v, g, beta)[0]) < FWD_TOL


# ---------------------------------------------------------------------------------------------------- conv


@pytest.mark.parametrize("cu", [None, [0, 1, 5, 70, 75]])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("final", [True, False])
def test_causal_conv1d_matches_reference(cu, with_state, activation, final):
    """Outputs and gradients (x, weight, initial state), with the final state's gradient added or without a
    final state (the backward then writes dx in x's dtype directly)."""
    torch.manual_seed(len(cu or []) + 2 * with_state)
    B, T, C, K = (2, 67, 48, 4) if cu is None else (1, 75, 48, 4)
    cu_t = torch.tensor(cu, device=DEVICE) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    x = torch.randn(B, T, C, device=DEVICE, requires_grad=True)
    w = torch.randn(C, K, device=DEVICE, requires_grad=True)
    h0 = torch.randn(N, C, K - 1, device=DEVICE, requires_grad=True) if with_state else None
    y, f = tconv.causal_conv1d(x, w, h0, final, cu_t, activation)
    y_ref, f_ref = causal_conv1d_ref(x, w, h0, final, cu_t, activation)
    assert rel(y, y_ref) < FWD_TOL and (f is f_ref is None or torch.equal(f, f_ref))
    dy = torch.randn_like(y)
    df = torch.randn_like(f) if final else None
    inputs = [x, w] + ([h0] if with_state else [])
    grads = torch.autograd.grad((y * dy).sum() + ((f * df).sum() if final else 0), inputs)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + ((f_ref * df).sum() if final else 0), inputs)
    assert all(rel(a, b) < FWD_TOL for a, b in zip(grads, grads_ref))


def test_causal_conv1d_update_matches_reference():
    torch.manual_seed(0)
    state = torch.randn(3, 40, 3, device=DEVICE)
    state_ref = state.clone()
    x, w = torch.randn(3, 40, device=DEVICE), torch.randn(40, 4, device=DEVICE)
    y = tconv.causal_conv1d_update(x, state, w)
    assert rel(y, causal_conv1d_update_ref(x, state_ref, w)) < FWD_TOL and torch.equal(state, state_ref)


# ---------------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("D", [40, 130])
def test_norms_match_reference(D):
    torch.manual_seed(D)
    x = torch.randn(3, 7, D, device=DEVICE, requires_grad=True)
    z = torch.randn(3, 7, D, device=DEVICE, requires_grad=True)
    w = torch.randn(D, device=DEVICE, requires_grad=True)
    for ours, ref, args in ((tnorms.rms_norm, rms_norm_ref, (x, w)), (tnorms.gated_rms_norm, gated_rms_norm_ref, (x, z, w)),
                            (tnorms.l2_norm, l2_norm_ref, (x,))):
        y, y_ref = ours(*args), ref(*args)
        assert rel(y, y_ref) < FWD_TOL
        dy = torch.randn_like(y)
        grads, grads_ref = torch.autograd.grad(y, args, dy), torch.autograd.grad(y_ref, args, dy)
        assert all(rel(a, b) < FWD_TOL for a, b in zip(grads, grads_ref)), ours.__name__


def test_l2_norm_backward_sums_a_group_of_gradients():
    """A key head shared by r value heads: the norm's backward takes their r gradients and sums them; a dy
    of the wrong row count is refused."""
    x = torch.randn(5, 2, 24, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 2, 3, 24, device=DEVICE)
    got = tnorms.norm_backward(tnorms.L2, x.detach(), None, None, dy, 1e-6, group=3)[0]
    want = torch.autograd.grad(l2_norm_ref(x), x, dy.sum(2))[0]
    assert rel(got, want) < FWD_TOL
    with pytest.raises(ValueError, match="dy must have 3 rows of 24"):
        tnorms.norm_backward(tnorms.L2, x.detach(), None, None, dy[:, :, :2], 1e-6, group=3)
