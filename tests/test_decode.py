"""Graph-safe decoding and chunked prefill: the static step (and its CUDA graphs) against the eager loop,
the chunked prompt against one forward over it."""

import pytest
import torch

from conftest import rel_err, tiny_config
from qwen3next.cache import HybridCache
from qwen3next.decode import StaticDecoder, buckets
from qwen3next.generate import generate, prefill
from qwen3next.model import Qwen3NextForCausalLM

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(1234)
    # a large init spreads the logits, so greedy choices are not decided by rounding
    return Qwen3NextForCausalLM(tiny_config(initializer_range=0.3)).eval().to(device=device, dtype=dtype)


def _prompts(batch, length, device="cpu", pad_rows=()):
    ids = torch.randint(1, 257, (batch, length), device=device)
    mask = torch.ones_like(ids)
    for i, row in enumerate(pad_rows):
        mask[row, : 1 + (1 + i) % (length - 1)] = 0  # 1 .. length - 1 padding tokens
    return ids, mask


def _eos_at_different_steps(model, ids, mask, n, decode="eager"):
    """eos ids that make rows stop at different steps (taken from a free run)."""
    free = generate(model, ids, attention_mask=mask, max_new_tokens=n, decode=decode)[:, ids.shape[1]:]
    picks = [(0, 1), (1 % len(free), 4), (len(free) - 1, 2)]
    return [int(free[row, min(step, n - 1)]) for row, step in picks]


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(6) == [6, 4, 2, 1]
    assert buckets(32) == [32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_static_decode_equals_eager(batch):
    model = _model()
    ids, mask = _prompts(batch, 9, pad_rows=range(1, batch, 2))
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=12, decode="eager")
    static = generate(model, ids, attention_mask=mask, max_new_tokens=12, decode="static")
    assert torch.equal(static, eager)


@pytest.mark.parametrize("stream", [False, True])
def test_static_decode_rows_finishing_at_different_steps(stream):
    """Rows stop at different steps; with a streamer the end is checked every step, so finished rows
    are dropped and the step moves to smaller batch buckets along the way."""
    model = _model()
    ids, mask = _prompts(6, 7, pad_rows=(2, 5))
    eos = _eos_at_different_steps(model, ids, mask, 14)
    seen = {"eager": [], "static": []}
    outs = {
        mode: generate(model, ids, attention_mask=mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=5,
                       decode=mode, streamer=(lambda t, m=mode: seen[m].append(t.clone())) if stream else None)
        for mode in ("eager", "static")
    }
    assert torch.equal(outs["static"], outs["eager"])
    assert (outs["eager"][:, 7:] == 5).any()  # some row did finish early
    if stream:
        assert torch.equal(torch.stack(seen["static"], 1), torch.stack(seen["eager"], 1))


def test_static_sampling_equals_eager_with_the_same_generator():
    model = _model()
    ids, _ = _prompts(3, 5)
    runs = [
        generate(model, ids, max_new_tokens=10, do_sample=True, top_k=40, top_p=0.9, temperature=0.8,
                 repetition_penalty=1.3, generator=torch.Generator().manual_seed(7), decode=mode)
        for mode in ("eager", "static")
    ]
    assert torch.equal(*runs)


def test_decode_mode_errors():
    model = _model()
    ids, _ = _prompts(1, 4)
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(model, ids, decode="fast")
    with pytest.raises(ValueError, match="needs CUDA"):
        generate(model, ids, decode="graph")
    with pytest.raises(ValueError, match="CUDA graphs need"):
        StaticDecoder(model, 1, 8, None, torch.tensor([]), 0, use_graphs=True)


def _prefill_both(model, ids, mask, chunk):
    """(last logits, cache) of the chunked prefill and of one forward over the whole prompt."""
    B, T = ids.shape
    results = []
    for size in (chunk, B * T):  # chunk_size counts the tokens of all rows together
        cache = HybridCache(model.config, B, T + 3, dtype=next(model.parameters()).dtype, device=ids.device)
        logits = prefill(model, ids, mask, cache, chunk_size=size)
        results.append((logits, cache))
    return results


def _assert_prefills_match(model, ids, mask, chunk, tol):
    (chunked, c1), (whole, c2) = _prefill_both(model, ids, mask, chunk)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits[:, -1]
    assert chunked.shape == (ids.shape[0], model.config.vocab_size)
    assert not chunked.isnan().any()
    assert rel_err(chunked, whole) <= tol and rel_err(whole, reference) <= tol
    assert c1.seq_length == c2.seq_length == ids.shape[1]
    for l1, l2 in zip(c1.layers, c2.layers):
        for t1, t2 in zip(l1.tensors(), l2.tensors()):
            assert rel_err(t1, t2) <= 10 * tol  # states: the recurrent and chunked forms round differently


@pytest.mark.parametrize("chunk,length", [(1, 20), (7, 50), (64, 83)])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_equals_one_shot(chunk, length, padded):
    model = _model()
    ids, mask = _prompts(2, length, pad_rows=(1,) if padded else ())
    _assert_prefills_match(model, ids, mask if padded else None, chunk, 1e-4)


def test_prefill_rejects_bad_chunk():
    model = _model()
    ids, _ = _prompts(1, 4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        prefill(model, ids, None, HybridCache(model.config, 1, 4), chunk_size=0)


# ------------------------------------------------------------------------------------------------ GPU
@cuda
@pytest.mark.parametrize("batch", [1, 5, 32])
def test_graph_decode_equals_eager_on_gpu(batch):
    model = _model(device="cuda")
    ids, mask = _prompts(batch, 11, device="cuda", pad_rows=range(1, batch, 3))
    eos = _eos_at_different_steps(model, ids, mask, 16)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    eager = generate(model, ids, decode="eager", **kwargs)
    static = generate(model, ids, decode="static", **kwargs)
    graph = generate(model, ids, decode="graph", **kwargs)
    assert torch.equal(graph, static)  # the same kernels, replayed
    assert torch.equal(graph, eager)
    seen = []
    streamed = generate(model, ids, decode="graph", streamer=lambda t: seen.append(t.clone()), **kwargs)
    assert torch.equal(streamed, eager) and torch.equal(torch.stack(seen, 1), eager[:, 11:])


@cuda
# fp32 tolerance measured on the H100 (2026-11-23) while the MoE kernels' fp32 products ran in TF32: both
# fp32 cases passed at 1e-3 and failed at 3e-4. Those products are fp32 now; not re-measured since.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_equals_one_shot_on_gpu(dtype, tol, padded):
    model = _model(dtype=dtype, device="cuda")
    ids, mask = _prompts(2, 300, device="cuda", pad_rows=(1,) if padded else ())
    _assert_prefills_match(model, ids, mask if padded else None, 128, tol)
