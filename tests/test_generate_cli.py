"""`qwen3next generate` end to end on a tiny checkpoint with a BPE tokenizer trained in the test."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from conftest import tiny_config
from qwen3next.cli import main
from qwen3next.generate import generate
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.tokenizer import Tokenizer as OurTokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny model"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}))
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(tiny_config(vocab_size=tok.get_vocab_size(), initializer_range=0.3))
    model.save_pretrained(path)
    return path


def test_generate_text_matches_library_call(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "hello world", "--max-new-tokens", "10"]) == 0
    captured = capsys.readouterr()
    tok = OurTokenizer.from_pretrained(checkpoint)
    model = Qwen3NextForCausalLM.from_pretrained(checkpoint)
    ids = tok.encode("hello world")
    out = generate(model, torch.tensor([ids]), max_new_tokens=10, eos_token_id=tok.eos_token_id)
    assert captured.out.strip() == tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()
    assert "prefill" in captured.err and "decode" in captured.err and "peak memory" in captured.err


def test_chat_template_is_applied(checkpoint, capsys):
    tok = OurTokenizer.from_pretrained(checkpoint)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--chat", "--max-new-tokens", "3",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    assert "tok/s" in capsys.readouterr().err


def test_prompt_ids_without_tokenizer(tmp_path, capsys):
    torch.manual_seed(0)
    Qwen3NextForCausalLM(tiny_config()).save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1 2 3", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and all(p.isdigit() for p in printed)
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        main(["generate", "--model", str(tmp_path), "--prompt", "hello"])


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "100000"], "exceeds max_position_embeddings"),
    (["--prompt-ids", "1 99999"], "token ids must lie"),
    (["--prompt-ids", "1 x"], "must be integers"),
])
def test_bad_inputs(checkpoint, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", "--model", str(checkpoint), *args])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        main(["generate", "--model", str(tmp_path), "--prompt", "hi"])
