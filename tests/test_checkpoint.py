"""Checkpoint I/O: transformers-written checkpoints load with identical logits (single file and
sharded), ours load in transformers, and every malformed checkpoint gets an error that names the problem."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_twin, rel_err, tiny_config
from qwen3next.checkpoint import CheckpointError, load_model
from qwen3next.model import Qwen3NextForCausalLM

transformers = pytest.importorskip("transformers")


@pytest.fixture
def model(seeded):
    return Qwen3NextForCausalLM(tiny_config(num_experts=8)).eval()


def _logits(m, ids):
    with torch.no_grad():
        out = m(ids)
    return out.logits


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_transformers_checkpoint_loads_with_identical_logits(model, tmp_path, shard):
    hf = hf_twin(model).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    files = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    keys = set()
    for f in files:
        if f.endswith(".safetensors"):
            keys |= set(load_file(tmp_path / f))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in keys  # transformers writes per-expert keys
    loaded = load_model(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("shard", ["5GB", "150KB"])
def test_our_checkpoint_loads_in_transformers(model, tmp_path, shard):
    model.save_pretrained(tmp_path, max_shard_size=shard)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(_logits(model, ids), ref) <= 1e-5
    assert torch.equal(_logits(load_model(tmp_path), ids), _logits(model, ids))


def test_resave_removes_stale_shards(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="150KB")
    model.save_pretrained(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


def test_stacked_experts_and_mtp_and_dtype(model, tmp_path):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["mtp.fc.weight"] = torch.zeros(2, 2)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="mtp"):
        loaded = load_model(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj.bfloat16())


def _edit(tmp_path, fn):
    file = tmp_path / "model.safetensors"
    sd = load_file(file)
    fn(sd)
    save_file(sd, file, metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)

    def damage(sd):
        del sd["model.norm.weight"]
        del sd["model.layers.0.mlp.experts.5.up_proj.weight"]
        sd["model.layers.0.bogus.weight"] = torch.zeros(3)
        sd["lm_head.weight"] = torch.zeros(3, 3)

    _edit(tmp_path, damage)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    text = str(err.value)
    for name in ["model.norm.weight", "experts.5.up_proj.weight", "model.layers.0.bogus.weight", "lm_head.weight: file (3, 3)"]:
        assert name in text


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path)


def test_index_naming_absent_shard(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="150KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[-1])
    with pytest.raises(CheckpointError, match="not there"):
        load_model(tmp_path)
