"""Cache-continued forward, generation against transformers, cache size, and sampling filters."""

import pytest
import torch

from conftest import hf_twin, rel_err, tiny_config
from qwen3next.cache import HybridCache
from qwen3next.checkpoint import load_model
from qwen3next.generate import generate, process_logits
from qwen3next.model import Qwen3NextForCausalLM


@pytest.fixture
def model(seeded):
    # a large init spreads the logits, so greedy choices are not decided by rounding
    return Qwen3NextForCausalLM(tiny_config(initializer_range=0.3)).eval()


def _steps(model, ids, mask, splits):
    """Run ids through the cache in pieces of the given sizes; return the concatenated logits."""
    cache = HybridCache(model.config, ids.shape[0], ids.shape[1])
    outs, start = [], 0
    with torch.no_grad():
        for n in splits:
            m = None if mask is None else mask[:, : start + n]
            outs.append(model(ids[:, start : start + n], attention_mask=m, cache=cache).logits)
            start += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("splits", [[70, 1, 1, 1, 1], [5, 64, 3, 1, 7], [1] * 12])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_steps_equal_one_full_forward(model, splits, padded):
    T = sum(splits)
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    mask = None
    if padded:
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, : min(3, splits[0])] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    stepped = _steps(model, ids, mask, splits)
    real = torch.ones(2, T, dtype=torch.bool) if mask is None else mask.bool()
    assert rel_err(stepped[real], full[real]) <= 1e-4


def test_greedy_matches_transformers_and_rows_alone(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_twin(model).save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    V = model.config.vocab_size
    prompts = [torch.randint(1, V, (n,)) for n in (9, 4, 13)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    ours_out = generate(ours, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=None, min_new_tokens=12)
    assert torch.equal(ours_out, ref)
    for i, p in enumerate(prompts):
        alone = generate(ours, p[None], max_new_tokens=12)
        assert torch.equal(alone[0, len(p):], ours_out[i, T:])


def test_rows_stop_on_any_eos_and_are_padded(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 6))
    free = generate(model, ids, max_new_tokens=8)
    eos = [int(free[0, 6 + 1]), int(free[1, 6 + 3])]  # make row 0 stop at step 2 and row 1 by step 4
    out = generate(model, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=7)
    for row in range(3):
        new = out[row, 6:].tolist()
        hits = [i for i, t in enumerate(free[row, 6:].tolist()) if t in eos]
        if hits and hits[0] + 1 < len(new):
            assert all(t == 7 for t in new[hits[0] + 1:])
            assert new[: hits[0] + 1] == free[row, 6 : 6 + hits[0] + 1].tolist()
    assert out.shape[1] <= 6 + 8


def test_streamer_sees_every_new_token(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    seen = []
    out = generate(model, ids, max_new_tokens=6, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 5:])


def test_linear_cache_is_constant_attention_cache_grows(seeded):
    config = tiny_config(max_position_embeddings=9000)
    model = Qwen3NextForCausalLM(config).eval()
    sizes = {}
    for n in (1024, 8192):
        cache = HybridCache(config, 1, n + 1)
        with torch.no_grad():
            model(torch.randint(0, config.vocab_size, (1, n)), cache=cache, logits_to_keep=1)
        sizes[n] = cache.nbytes()
    assert sizes[1024]["linear"] == sizes[8192]["linear"] > 0
    assert sizes[8192]["attention"] == 8 * sizes[1024]["attention"]


def test_cache_select_and_snapshot(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 10))
    cache = HybridCache(model.config, 3, 12)
    with torch.no_grad():
        model(ids, cache=cache)
        saved = cache.snapshot()
        a = model(ids[:, :1], cache=cache).logits
        storage = [t.data_ptr() for layer in cache.layers for t in layer.tensors()]
        cache.restore(saved)
        assert [t.data_ptr() for layer in cache.layers for t in layer.tensors()] == storage  # restored in place
        b = model(ids[:, :1], cache=cache).logits
        cache.restore(saved)
        cache.select(torch.tensor([2, 0]))
        c = model(ids[[2, 0], :1], cache=cache).logits
        cache.restore(saved)  # three rows again after `select` kept two
        d = model(ids[:, :1], cache=cache).logits
    assert torch.equal(a, b) and torch.equal(a, d)
    assert rel_err(c, a[[2, 0]]) < 1e-6


def test_new_and_reset_caches_are_empty(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    cache = HybridCache(model.config, 2, 9)
    assert all(torch.count_nonzero(t) == 0 for layer in cache.layers for t in layer.tensors())
    with torch.no_grad():
        first = model(ids, cache=cache).logits
        assert any(torch.count_nonzero(t) > 0 for layer in cache.layers for t in layer.tensors())
        cache.reset()
        assert cache.seq_length == 0 and all(torch.count_nonzero(t) == 0 for layer in cache.layers for t in layer.tensors())
        again = model(ids, cache=cache).logits
    assert torch.equal(first, again)


def test_sampling_is_seeded_and_temperature_zero_is_greedy(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    runs = [generate(model, ids, max_new_tokens=8, do_sample=True, top_k=50, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(*runs)
    greedy = generate(model, ids, max_new_tokens=8)
    assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=True, temperature=0), greedy)


def test_filters_keep_exactly_the_right_tokens():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept(process_logits(logits, top_k=2)) == [0, 1]
    assert kept(process_logits(logits, top_p=0.7)) == [0, 1]        # 0.5 + 0.2 reaches 0.7
    assert kept(process_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert kept(process_logits(logits, top_p=0.1)) == [0]           # the top token always stays
    assert kept(process_logits(logits, min_p=0.3)) == [0, 1, 2]     # >= 0.3 * 0.5
    out = process_logits(logits, temperature=0.5)
    assert torch.allclose(out.softmax(-1), (probs**2) / (probs**2).sum())
    pen = process_logits(torch.tensor([[2.0, -2.0, 1.0]]), previous=torch.tensor([[0, 1]]), repetition_penalty=2.0)
    assert pen.tolist() == [[1.0, -4.0, 1.0]]


def test_bad_generation_inputs(model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        generate(model, ids, max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="token ids must lie"):
        generate(model, torch.tensor([[1, 99999]]))
