"""The whole model against transformers' Qwen3-Next on random tiny configs: logits, loss, aux loss and
every parameter's gradient (fp32, relative error <= 1e-4 on non-padded positions)."""

import itertools

import pytest
import torch

from conftest import hf_twin, rel_err, tiny_config
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.ops.packing import PaddedLayout

CONFIGS = {
    # GVA ratio 1, dk != dv, partial rotary 0.5, norm_topk_prob off, dense layer among MoE layers
    "gva1_dk_ne_dv": dict(linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=16,
                          linear_value_head_dim=24, partial_rotary_factor=0.5, norm_topk_prob=False,
                          mlp_only_layers=[1]),
    # GVA ratio 2, MoE every second layer (decoder_sparse_step), MQA attention, pad token set
    "gva2_sparse_step": dict(linear_num_key_heads=2, linear_num_value_heads=4, decoder_sparse_step=2,
                             num_key_value_heads=1, pad_token_id=0),
    # the tiny preset as is, 8 layers (two 3+1 groups), tied embeddings
    "preset_8_layers": dict(num_hidden_layers=8, tie_word_embeddings=True, num_experts=8, num_experts_per_tok=8),
}


def _inputs(vocab, B=3, T=77, pad=(0, 9, 0)):
    ids = torch.randint(1, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
        ids[row, :n] = 0
    labels = ids.masked_fill(mask == 0, -100)
    for row, n in enumerate(pad):
        if n:  # the first real token is predicted from a padding position: not a real prediction
            labels[row, n] = -100
    return ids, mask, labels


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_transformers(name, seeded):
    """fp32: logits (non-padded positions), loss and aux loss within 1e-4."""
    config = tiny_config(**CONFIGS[name])
    ours = Qwen3NextForCausalLM(config).train()
    hf = hf_twin(ours)
    ids, mask, labels = _inputs(config.vocab_size)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = ours(ids, attention_mask=mask, labels=labels)
    ref = hf(ids, attention_mask=mask, position_ids=position_ids, labels=labels, output_router_logits=True)
    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= 1e-4
    assert rel_err(out.loss, ref.loss) <= 1e-4
    assert rel_err(out.aux_loss, ref.aux_loss) <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_transformers(name, seeded):
    """Every parameter's gradient, fp32, relative error <= 1e-4 per tensor. At initialisation the
    A_log/dt_bias gradients are sums that cancel to ~1e-7 (a thousand times below the others), where
    fp32 rounding in either implementation dominates; a tensor's error is therefore measured against
    max(its own largest entry, 1% of the model's largest gradient entry)."""
    config = tiny_config(**CONFIGS[name])
    ours = Qwen3NextForCausalLM(config).train()
    hf = hf_twin(ours)
    ids, mask, labels = _inputs(config.vocab_size)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    hf(ids, attention_mask=mask, position_ids=position_ids, labels=labels, output_router_logits=True).loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    floor = 1e-2 * max(g.abs().max().item() for g in hf_grads.values() if g is not None)
    for pname, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        ref = hf_grads[pname]
        scale = max(ref.abs().max().item(), floor)
        assert (p.grad - ref).abs().max().item() <= 1e-4 * scale, pname


def test_left_padded_row_equals_row_alone(seeded):
    config = tiny_config()
    model = Qwen3NextForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :13] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 13:]).logits
    assert rel_err(batched[1, 13:], alone[0]) <= 1e-5


def test_labels_shift_and_ignore_index(seeded):
    config = tiny_config(num_experts=0, mlp_only_layers=[])
    model = Qwen3NextForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 10))
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logp = out.logits.log_softmax(-1)[0]
    picked = [logp[t, ids[0, t + 1]] for t in range(9) if t + 1 != 4]
    assert out.aux_loss is None
    assert torch.allclose(out.loss, -torch.stack(picked).mean(), rtol=1e-5)


@pytest.mark.parametrize("lengths,padded", [([5, 1, 0, 64, 31], False), ([20, 17, 0, 1, 19], True)])
def test_packed_documents_are_independent(seeded, lengths, padded):
    """Logits and parameter gradients of packed documents (one token, short, empty, two GDN chunks, odd)
    equal those of each document run alone: with attention over the documents as a padded batch, and
    with a dense block-diagonal mask where padding to the longest would cost more (N L^2 > T^2)."""
    config = tiny_config()
    model = Qwen3NextForCausalLM(config).double()  # float64 (the norms compute in float32)
    docs = [torch.randint(0, config.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    mask = model.model._positions_and_masks(1, sum(lengths), 0, None, None, cu, cu.device)[1]
    assert isinstance(mask, PaddedLayout) == padded
    probe = torch.randn(1, sum(lengths), config.vocab_size, dtype=torch.float64)  # a loss that reaches every logit
    packed = model(torch.cat(docs, 1), cu_seqlens=cu).logits
    (packed * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for doc, s, e in zip(docs, cu[:-1], cu[1:]):
        if s == e:
            continue
        alone = model(doc).logits
        assert rel_err(packed[0, s:e], alone[0]) <= 1e-6
        (alone * probe[:, s:e]).sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad) <= 1e-6, n


def test_fresh_model_is_initialised_like_transformers(seeded):
    config = tiny_config()
    model = Qwen3NextForCausalLM(config)
    layer = model.model.layers[0]
    assert torch.all(model.model.norm.weight == 0)
    assert torch.all(layer.linear_attn.norm.weight == 1)
    assert torch.all(layer.linear_attn.dt_bias == 1)
    a = layer.linear_attn.A_log.exp()
    assert torch.all((a >= 0.01 - 1e-6) & (a <= 16 + 1e-5))
    std = model.lm_head.weight.std().item()
    assert abs(std - config.initializer_range) < 0.1 * config.initializer_range
    assert abs(layer.mlp.experts.gate_up_proj.std().item() - config.initializer_range) < 0.1 * config.initializer_range
