"""Reference gated delta rule: chunked and recurrent forms against an independent float64 loop, with
initial/final state, GVA, odd lengths and varlen packing; plus the other reference ops' contracts."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from qwen3next import ops


def float64_loop(q, k, v, g, beta, scale, h0):
    """The recurrence written out step by step in float64, one (batch, value head) at a time."""
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    r = Hv // Hk
    o = torch.zeros(B, T, Hv, dv, dtype=torch.float64)
    S_all = torch.zeros(B, Hv, dk, dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hv):
            S = h0[b, h].double().clone() if h0 is not None else torch.zeros(dk, dv, dtype=torch.float64)
            for t in range(T):
                kt = F.normalize(k[b, t, h // r].double(), dim=0, eps=0) * 1  # l2norm (eps negligible)
                qt = F.normalize(q[b, t, h // r].double(), dim=0, eps=0) * scale
                S = torch.exp(g[b, t, h].double()) * S
                S = S + torch.outer(kt, beta[b, t, h].double() * (v[b, t, h].double() - S.T @ kt))
                o[b, t, h] = S.T @ qt
            S_all[b, h] = S
    return o, S_all


def _inputs(B, T, Hk, Hv, dk, dv, dtype=torch.float32):
    q, k = torch.randn(B, T, Hk, dk, dtype=dtype), torch.randn(B, T, Hk, dk, dtype=dtype)
    v = torch.randn(B, T, Hv, dv, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, Hv)).to(dtype)
    beta = torch.rand(B, T, Hv, dtype=dtype)
    h0 = torch.randn(B, Hv, dk, dv)
    return q, k, v, g, beta, h0


def leaves(*tensors):
    """Fresh leaf copies (None stays None), to compare gradients of two computations."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("Hk,Hv", [(2, 2), (2, 4)])
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_forms_match_float64_loop(T, Hk, Hv, form, seeded):
    dk, dv = 16, 8
    q, k, v, g, beta, h0 = _inputs(2, T, Hk, Hv, dk, dv)
    fn = ops.chunk_gated_delta_rule_ref if form == "chunk" else ops.recurrent_gated_delta_rule_ref
    o, S = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, S_ref = float64_loop(q, k, v, g, beta, dk**-0.5, h0)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5


def test_chunk_equals_recurrent_with_gradients(seeded):
    q, k, v, g, beta, h0 = _inputs(1, 77, 2, 4, 16, 16, torch.float64)
    h0 = h0.double()
    grads = []
    for fn in (ops.chunk_gated_delta_rule_ref, ops.recurrent_gated_delta_rule_ref):
        xs = [t.clone().requires_grad_() for t in (q, k, v, g, beta, h0)]
        o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True, use_qk_l2norm_in_kernel=True, scale=0.3)
        (o.pow(2).sum() + S.sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_varlen_equals_each_sequence_alone(form, seeded):
    """Outputs, final states and gradients, with sequences of one token, empty, one chunk and odd lengths."""
    fn = ops.chunk_gated_delta_rule_ref if form == "chunk" else ops.recurrent_gated_delta_rule_ref
    lengths = [1, 64, 0, 70, 3]
    cu = torch.tensor([0, 1, 65, 65, 135, 138])
    inputs = [*_inputs(1, 138, 2, 4, 16, 8)[:5], torch.randn(len(lengths), 4, 16, 8)]
    packed = leaves(*inputs)
    o, S = fn(*packed[:5], initial_state=packed[5], output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    (o.pow(2).sum() + S.pow(2).sum()).backward()
    alone = leaves(*inputs)
    loss = 0
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if s == e:  # nothing to run: the state passes through
            assert torch.equal(S[n], inputs[5][n])
            loss = loss + alone[5][n].pow(2).sum()
            continue
        o1, S1 = fn(*(x[:, s:e] for x in alone[:5]), initial_state=alone[5][n : n + 1], output_final_state=True,
                    use_qk_l2norm_in_kernel=True)
        assert rel_err(o[:, s:e], o1) < 1e-5 and rel_err(S[n], S1[0]) < 1e-5
        loss = loss + o1.pow(2).sum() + S1.pow(2).sum()
    loss.backward()
    for a, b in zip(packed, alone):
        assert rel_err(a.grad, b.grad) < 1e-5


@pytest.mark.parametrize("lengths", [[3, 5, 4], [200, 3, 0, 5, 1, 4, 2]])
def test_varlen_pads_sequences_of_similar_length_together(lengths, seeded, monkeypatch):
    """One long sequence among short ones does not pad them all to its length: the padded batches hold at
    most twice the tokens (plus one slot per empty sequence), and the results equal each sequence alone."""
    from qwen3next.ops import gated_delta

    batches = []
    inner = ops.chunk_gated_delta_rule_ref
    monkeypatch.setattr(gated_delta, "chunk_gated_delta_rule_ref",
                        lambda q, *a, **kw: batches.append(q.shape[:2]) or inner(q, *a, **kw))
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    T = sum(lengths)
    inputs = _inputs(1, T, 1, 2, 8, 8)[:5]
    h0 = torch.randn(len(lengths), 2, 8, 8)
    o, S = gated_delta.chunk_gated_delta_rule_ref(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert sum(n * L for n, L in batches[1:]) <= 2 * T + lengths.count(0)    # batches[0]: the packed call
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o1, S1 = inner(*(x[:, s:e] for x in inputs), initial_state=h0[n : n + 1], output_final_state=True)
        assert (s == e or rel_err(o[:, s:e], o1) < 1e-5) and rel_err(S[n], S1[0]) < 1e-5


def test_output_dtype_follows_v(seeded):
    q, k, v, g, beta, _ = _inputs(1, 10, 2, 2, 8, 8)
    o, S = ops.chunk_gated_delta_rule_ref(q.half(), k.half(), v.bfloat16(), g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32


@pytest.mark.parametrize("bad,message", [
    (dict(v=torch.randn(1, 10, 3, 8)), "multiple of key heads"),
    (dict(g=torch.randn(1, 9, 4)), "g must be"),
    (dict(k=torch.randn(1, 10, 2, 4)), "q and k"),
    (dict(initial_state=torch.randn(2, 4, 8, 8)), "initial_state"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9])), "rise from 0 to T"),
    (dict(cu_seqlens=torch.tensor([0.0, 10.0])), "int32/int64"),
    (dict(q=torch.randint(0, 3, (1, 10, 2, 8)), k=torch.randint(0, 3, (1, 10, 2, 8))), "floating-point"),
])
def test_bad_inputs_are_explained(bad, message):
    args = dict(q=torch.randn(1, 10, 2, 8), k=torch.randn(1, 10, 2, 8), v=torch.randn(1, 10, 4, 8),
                g=-torch.rand(1, 10, 4), beta=torch.rand(1, 10, 4))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.chunk_gated_delta_rule_ref(**args)


def test_conv_state_continues_the_sequence(seeded):
    x, w = torch.randn(2, 9, 6), torch.randn(6, 4)
    y_full, _ = ops.causal_conv1d_ref(x, w)
    y1, state = ops.causal_conv1d_ref(x[:, :5], w, output_final_state=True)
    y2, state = ops.causal_conv1d_ref(x[:, 5:8], w, initial_state=state, output_final_state=True)
    y3 = ops.causal_conv1d_update_ref(x[:, 8], state, w)
    assert rel_err(torch.cat([y1, y2, y3[:, None]], 1), y_full) < 1e-6
    manual = F.silu(sum(w[:, i] * x[:, 8 - 3 + i] for i in range(4)))
    assert rel_err(y3, manual) < 1e-6


@pytest.mark.parametrize("with_state", [False, True])
def test_conv_varlen_equals_each_sequence_alone(with_state, seeded):
    """Packed: outputs, final states and gradients equal each sequence run alone, with sequences shorter
    than the window (K = 4), empty and of one token."""
    lengths = [5, 0, 1, 3, 2, 9, 0]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x, w = torch.randn(1, sum(lengths), 6), torch.randn(6, 4)
    h0 = torch.randn(len(lengths), 6, 3) if with_state else None
    xp, wp, hp = leaves(x, w, h0)
    y, state = ops.causal_conv1d_ref(xp, wp, initial_state=hp, output_final_state=True, cu_seqlens=cu)
    (y.pow(2).sum() + state.pow(3).sum()).backward()
    xs, ws, hs = leaves(x, w, h0)
    loss = 0
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y1, s1 = ops.causal_conv1d_ref(xs[:, s:e], ws, None if hs is None else hs[n : n + 1], True)
        assert (e == s or rel_err(y[:, s:e], y1) < 1e-6) and rel_err(state[n], s1[0]) < 1e-6
        loss = loss + y1.pow(2).sum() + s1.pow(3).sum()
    loss.backward()
    for a, b in zip((xp, wp, hp), (xs, ws, hs)):
        assert b is None or rel_err(a.grad, b.grad) < 1e-6


def test_padded_layout_round_trip():
    from qwen3next.ops.packing import PaddedLayout

    lengths = [3, 0, 1, 5, 0]
    layout = PaddedLayout.from_offsets(torch.tensor([0, 3, 3, 4, 9, 9]))
    x = torch.arange(9.0)[None, :, None] * torch.ones(1, 9, 2)
    padded = layout.pad(x)
    assert padded.shape == (5, 5, 2) and layout.valid.sum(1).tolist() == lengths
    starts = [0, 3, 3, 4, 9]
    for n, L in enumerate(lengths):
        assert padded[n, :L, 0].tolist() == list(range(starts[n], starts[n] + L))
    assert torch.equal(layout.unpad(padded), x)
    assert PaddedLayout.from_offsets(torch.tensor([0, 0])).pad(x[:, :0]).shape == (1, 1, 2)


def test_norms_follow_their_formulas(seeded):
    x, z, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    rms = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert rel_err(ops.rms_norm_ref(x, w), rms * (1 + w)) < 1e-6
    assert rel_err(ops.gated_rms_norm_ref(x, z, w), rms * w * F.silu(z)) < 1e-6
    assert rel_err(ops.l2_norm_ref(x), x / x.norm(dim=-1, keepdim=True)) < 1e-5
