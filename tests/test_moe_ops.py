"""Mixture-of-experts fast paths against the references `route_ref` / `moe_experts_ref`: outputs and gradients.

The Triton kernels run in Triton's interpreter without CUDA (fp32, small shapes; conftest.py sets
TRITON_INTERPRET=1 before triton is first imported); the torch backend's sort-based path
(`moe_experts_grouped`) runs natively. Routing cases include experts that get no rows, every row on one
expert, top-k = 1 and top-k = E.
"""

import os

import pytest
import torch
from conftest import rel_err

from qwen3next import ops
from qwen3next.ops.moe import check_route_inputs, moe_experts_grouped, moe_experts_ref, route_ref, sort_by_expert

FP32_TOL = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU every case runs there (the kernels too)


def _triton_moe():
    pytest.importorskip("triton", reason="triton is not installed: the Triton MoE kernels cannot run")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    from qwen3next.ops.triton import moe

    return moe


def _inputs(N, D, I, E, k, dtype=torch.float32, ids=None, seed=0):
    """Random x, experts, and a routing: softmax-top-k of random logits unless `ids` is given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    gate_up = torch.randn(E, 2 * I, D, generator=g, dtype=dtype) / D**0.5
    down = torch.randn(E, D, I, generator=g, dtype=dtype) / I**0.5
    logits = torch.randn(N, E, generator=g, dtype=dtype)
    weights, routed = route_ref(logits, k, True)
    if ids is None:
        ids = routed
    else:
        weights = torch.rand(N, k, generator=g, dtype=dtype) + 0.1
    return tuple(t.to(DEVICE) for t in (x, gate_up, down, weights, ids, torch.randn(N, D, generator=g, dtype=dtype)))


# (N, D, I, E, k, ids or None): odd sizes, empty experts, one expert for everything, top-k = 1 and = E
CASES = {
    "random": (37, 32, 16, 8, 3, None),
    "odd_dims": (19, 24, 12, 5, 2, None),
    "empty_experts": (29, 16, 16, 16, 2, lambda N, k: (torch.arange(N * k).view(N, k) * 2) % 16),
    "one_expert": (40, 16, 16, 6, 1, lambda N, k: torch.full((N, k), 3)),
    "top1": (23, 16, 16, 7, 1, None),
    "topE": (11, 16, 8, 4, 4, None),
}


def _case(name, dtype=torch.float32):
    N, D, I, E, k, make_ids = CASES[name]
    return _inputs(N, D, I, E, k, dtype, None if make_ids is None else make_ids(N, k))


def _outputs_and_grads(fn, x, gate_up, down, weights, ids, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    out = fn(*leaves, ids)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _assert_matches_reference(fn, name, dtype=torch.float32, tol=FP32_TOL):
    _assert_close_to_reference(fn, _case(name, dtype), tol)


def _assert_close_to_reference(fn, args, tol=FP32_TOL):
    got = _outputs_and_grads(fn, *args)
    want = _outputs_and_grads(moe_experts_ref, *args)
    for label, a, b in zip(("out", "dx", "dgate_up", "ddown", "dweights"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, label
        assert not a.isnan().any(), label
        assert rel_err(a, b) < tol, (label, rel_err(a, b))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_grouped_matches_reference(name):
    _assert_matches_reference(moe_experts_grouped, name)


def test_torch_grouped_fp64_falls_back_exactly():
    _assert_matches_reference(moe_experts_grouped, "random", torch.float64, 1e-12)


def test_torch_backend_dispatches_to_grouped_path(monkeypatch):
    """QWEN3NEXT_BACKEND=torch runs the sort-based path and never a Triton kernel (on a GPU too, where
    Triton is the default; there index_add's atomics make two runs differ in the last bits)."""
    monkeypatch.setenv("QWEN3NEXT_BACKEND", "torch")

    def no_triton(name):
        raise AssertionError(f"the Triton kernel of {name} was called")

    monkeypatch.setattr(ops, "_triton_kernel", no_triton)
    args = _case("random")[:5]
    assert rel_err(ops.moe_experts(*args), moe_experts_grouped(*args)) < FP32_TOL


@pytest.mark.parametrize("name", list(CASES))
def test_triton_grouped_matches_reference(name):
    moe = _triton_moe()
    _assert_matches_reference(moe.moe_experts, name)


@pytest.mark.parametrize("b_desc", [False, True])
@pytest.mark.parametrize("short_tails", [0, 1, 2])
def test_triton_grouped_short_tail_tiles(monkeypatch, short_tails, b_desc):
    """64-row tiles over experts whose last tile is full, at most half full, at most a quarter full, or
    absent, with the short-tail paths off, to half height, and to quarter height, the weights read by
    pointers or through TMA descriptors: outputs and gradients."""
    moe = _triton_moe()
    counts = torch.tensor([64 + 10, 64 + 20, 40, 0, 5, 128])  # rows per expert
    g = torch.Generator().manual_seed(short_tails)
    ids = torch.repeat_interleave(torch.arange(len(counts)), counts)[torch.randperm(int(counts.sum()), generator=g)]
    args = _inputs(int(counts.sum()), 32, 16, len(counts), 1, ids=ids[:, None])
    config = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2, SHORT_TAILS=short_tails,
                  B_DESC=b_desc)
    monkeypatch.setattr(moe, "_gemm_config", lambda *_: config)
    _assert_close_to_reference(moe.moe_experts, args)


@pytest.mark.parametrize("D,I", [(24, 12), (6, 10)])
def test_triton_grouped_weight_descriptors(monkeypatch, D, I):
    """TMA descriptor reads of the weights with reduction tails (24 and 12 are not multiples of the 16-wide
    steps), and weights whose rows break TMA's 16-byte alignment (D = 6 in fp32), which must fall back to
    pointer loads: outputs and gradients against the reference."""
    moe = _triton_moe()
    args = _inputs(53, D, I, 5, 2, seed=D)
    has_tma = moe.TensorDescriptor is not None and (DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9)
    assert moe._tma_loads(args[1]) == (has_tma and D * 4 % 16 == 0)
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2, SHORT_TAILS=1, B_DESC=True)
    monkeypatch.setattr(moe, "_gemm_config", lambda *_: config)
    _assert_close_to_reference(moe.moe_experts, args)


@pytest.mark.parametrize("gather", ["g", "a"])
def test_triton_weight_gradient_kernel(gather):
    """Our grouped weight-gradient kernel (on CUDA the backward prefers torch._grouped_mm, so it is called
    directly here) with a gathered G or A operand, output tails in both dims (24 and 40 against 16-wide
    tiles) and experts without rows (zeros): against the per-expert sums of outer products."""
    moe = _triton_moe()
    N, k, E, n_out, K = 23, 3, 6, 24, 40
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([0, 1, 2, 4, 5])[torch.randint(0, 5, (N, k), generator=g)].to(DEVICE)  # expert 3 gets none
    order, ends = sort_by_expert(ids, E)
    rows = N * k
    G = torch.randn(N if gather == "g" else rows, n_out, generator=g).to(DEVICE)
    A = torch.randn(N if gather == "a" else rows, K, generator=g).to(DEVICE)
    config = dict(BLOCK_N=16, BLOCK_K=16, BLOCK_R=16, num_warps=4, num_stages=2)
    got = moe._grouped_wgrad(G, A, order, ends, torch.full((E, n_out, K), float("nan"), device=DEVICE), top_k=k,
                             gather_g=gather == "g", gather_a=gather == "a", config=config)
    token = order // k
    Gs, As = (G[token], A) if gather == "g" else (G, A[token])
    want = torch.zeros(E, n_out, K, device=DEVICE)
    start = 0
    for e, end in enumerate(ends.tolist()):
        want[e] = Gs[start:end].t() @ As[start:end]
        start = end
    assert (ends.diff() == 0).any() and not got.isnan().any()
    assert rel_err(got, want) < FP32_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUTLASS weight-gradient path is CUDA bf16 only")
def test_triton_bf16_backward_is_close_and_reproducible():
    """bf16 on CUDA, where the weight gradients go to torch._grouped_mm on gathered rows: outputs and gradients
    close to the fp32 reference on the same rounded inputs, and the same bits on every run (where a kernel
    that races shows first)."""
    moe = _triton_moe()
    x, gate_up, down, weights, ids, dout = _inputs(1000, 256, 128, 16, 4, torch.bfloat16, seed=3)
    assert moe._grouped_mm_takes(dout, x)
    runs = [_outputs_and_grads(moe.moe_experts, x, gate_up, down, weights, ids, dout) for _ in range(3)]
    labels = ("out", "dx", "dgate_up", "ddown", "dweights")
    for run in runs[1:]:
        assert [label for label, a, b in zip(labels, run, runs[0]) if not torch.equal(a, b)] == []
    want = _outputs_and_grads(moe_experts_ref, *(t.float() if t.is_floating_point() else t
                                                 for t in (x, gate_up, down, weights, ids, dout)))
    for label, a, b in zip(labels, runs[0], want):
        assert not a.isnan().any() and rel_err(a.float(), b) < 1e-2, (label, rel_err(a.float(), b))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_autocast_runs_the_experts_in_its_dtype(path):
    """Under autocast fp32 x and experts are multiplied in autocast's dtype (as its matmuls are), the result
    comes in that dtype and the weights' gradients in fp32. (The interpreter's bf16 tl.dot is wrong: on
    the CPU the Triton kernels run under fp16 autocast.)"""
    fn = moe_experts_grouped if path == "torch" else _triton_moe().moe_experts
    dtype = torch.float16 if path == "triton" and DEVICE == "cpu" else torch.bfloat16
    x, gate_up, down, weights, ids, dout = _case("random")
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down)]
    with torch.autocast(x.device.type, dtype=dtype):
        out = fn(*leaves, weights, ids)
    want = moe_experts_ref(*(t.to(dtype).float() for t in (x, gate_up, down)), weights, ids)
    assert out.dtype == dtype and rel_err(out.float(), want) < 1e-2, (out.dtype, rel_err(out.float(), want))
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    assert [g.dtype for g in grads] == [torch.float32] * 3 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["random", "empty_experts", "one_expert"])
def test_triton_inference_path_matches_reference(name):
    """Without gradients routing and the grouped experts run without autograd nodes (more tokens than the
    decode path takes): the same routing and outputs as the reference, and nothing to differentiate."""
    moe = _triton_moe()
    x, gate_up, down, weights, ids, _ = _case(name)
    assert x.shape[0] > moe.DECODE_MAX_TOKENS
    logits = torch.randn(x.shape[0], gate_up.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        w_got, ids_got = moe.route(logits.requires_grad_(True), 2, True)
        out = moe.moe_experts(x.requires_grad_(True), gate_up, down, weights, ids)
    w_want, ids_want = route_ref(logits.detach(), 2, True)
    assert torch.equal(ids_got, ids_want) and rel_err(w_got, w_want) < FP32_TOL
    assert rel_err(out, moe_experts_ref(x.detach(), gate_up, down, weights, ids)) < FP32_TOL
    assert out.grad_fn is None and w_got.grad_fn is None


@pytest.mark.parametrize("name", ["random", "empty_experts", "topE"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_triton_decode_matches_reference(name, tokens):
    moe = _triton_moe()
    x, gate_up, down, weights, ids, _ = _case(name)
    x, weights, ids = x[:tokens], weights[:tokens], ids[:tokens]
    assert tokens <= moe.DECODE_MAX_TOKENS
    with torch.no_grad():
        got = moe.moe_experts(x, gate_up, down, weights, ids)
    assert rel_err(got, moe_experts_ref(x, gate_up, down, weights, ids)) < FP32_TOL


@pytest.mark.parametrize("N,E,k,norm", [(7, 8, 2, True), (33, 20, 5, False), (5, 6, 6, True), (4, 3, 1, False),
                                        (9, 512, 10, True)])
def test_triton_route_matches_reference(N, E, k, norm):
    moe = _triton_moe()
    g = torch.Generator().manual_seed(N * E + k)
    logits = (torch.randn(N, E, generator=g) * 3).to(DEVICE)
    expert_grad = torch.randn(N, E, generator=g).to(DEVICE)  # d loss / d weight of (token, expert), slot-free

    def dense(route):
        """Slot-order-free view of a routing: dense [N, E] weights, and the logits' gradient."""
        lg = logits.clone().requires_grad_(True)
        weights, ids = route(lg, k, norm)
        assert ids.dtype == torch.int64 and weights.dtype == logits.dtype and ids.shape == (N, k)
        (grad,) = torch.autograd.grad(weights, lg, expert_grad.gather(1, ids))
        return torch.zeros(N, E, device=DEVICE).scatter(1, ids, weights.detach()), grad

    (w_got, g_got), (w_want, g_want) = dense(moe.route), dense(route_ref)
    assert rel_err(w_got, w_want) < FP32_TOL
    assert rel_err(g_got, g_want) < FP32_TOL


def test_bad_inputs_raise_clear_errors():
    x, gate_up, down, weights, ids, _ = _case("random")
    with pytest.raises(ValueError, match="top_k"):
        check_route_inputs(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="inconsistent expert shapes"):
        moe_experts_grouped(x, gate_up[:, :-1], down, weights, ids)
    with pytest.raises(ValueError, match=r"\[N=37, k\]"):
        moe_experts_grouped(x, gate_up, down, weights[:-1], ids[:-1])
    with pytest.raises(ValueError, match="int32/int64"):
        moe_experts_grouped(x, gate_up, down, weights, ids.float())
    moe = _triton_moe()
    with pytest.raises(ValueError, match="top_k"):
        moe.route(torch.randn(3, 4), 0, True)
    with pytest.raises(ValueError, match="share a dtype"):
        moe.moe_experts(x.double(), gate_up, down, weights, ids)


@pytest.mark.parametrize("N,k,E", [(37, 3, 8), (29, 2, 16), (5, 4, 4), (1, 1, 3), (2100, 4, 40), (90, 3, 700)])
def test_triton_sort_matches_torch_sort(monkeypatch, N, k, E):
    moe = _triton_moe()
    monkeypatch.setattr(moe, "SORT_BLOCK", 256)  # several blocks at every size but the smallest
    ids = torch.randint(0, E, (N, k), generator=torch.Generator().manual_seed(N)).to(DEVICE)
    ids[:, 0] = ids[:, 0] // 2 * 2  # leave some experts with few or no rows
    order, ends = moe._sort_by_expert(ids, E)
    want_order, want_ends = sort_by_expert(ids, E)
    assert torch.equal(order, want_order) and torch.equal(ends, want_ends)
