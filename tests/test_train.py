"""Training: tokenizer, packing and its resume positions, the loop (loss falls, memorisation, exact
resume after Ctrl-C, load balancing, activation checkpointing), checkpoints (transformers loads them;
corrupt or partial ones are refused), and clear errors for bad input."""

import json
import os
import signal
import sys
import sysconfig
import types
import warnings

import numpy as np
import pytest
import torch

from conftest import rel_err, tiny_config
from qwen3next.checkpoint import CheckpointError, load_model
from qwen3next.cli import main
from qwen3next.config import ConfigError
from qwen3next.model import Qwen3NextForCausalLM
from qwen3next.train import ByteTokenizer, Corpus, DataError, PackedCorpus, Trainer, TrainSettings
from qwen3next.train.data import ShuffledRows, is_held_out, make_batch
from qwen3next.train.loop import load_ratio, lr_at, read_metrics, routing_counts
from qwen3next.train.state import MARKER, verify_checkpoint

STDLIB = sysconfig.get_paths()["stdlib"]
STDLIB_FILES = [os.path.join(STDLIB, f) for f in ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py")]


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny-model runs are latency-bound: one thread is as fast, and does not slow to a crawl when
    other processes share the cores (the demo also sets the thread count: restored here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(**overrides) -> TrainSettings:
    base = dict(steps=8, seq_len=64, batch_size=4, lr=3e-3, warmup=3, eval_every=0, save_every=0, log_every=1000)
    return TrainSettings(**{**base, **overrides})


def trainer(tmp_path, corpus=None, seed=0, config=None, name="run", **overrides) -> Trainer:
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config or tiny_config())
    return Trainer(model, ByteTokenizer(), corpus or Corpus(STDLIB_FILES), settings(seed=seed, **overrides),
                   str(tmp_path / name))


def write_docs(directory, docs: dict[str, str]) -> Corpus:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (directory / name).write_text(text, encoding="utf-8")
    return Corpus([str(directory)])


# --------------------------------------------------------------------------------------------- data
def test_byte_tokenizer_round_trip_and_its_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer

    tok = ByteTokenizer()
    text = "héllo wörld 🎉\n\tdef f(x):  return x  # ünïcode"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode([*ids, tok.eos_token_id]) == text + "<|endoftext|>"
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(text).ids == ids.tolist()
    assert hf.decode([*ids, 256], skip_special_tokens=False) == text + "<|endoftext|>"


def test_packing_keeps_documents_apart_and_shuffling_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    docs = {f"d{i}.txt": "".join(chr(c) for c in rng.integers(97, 123, int(n))) for i, n in
            enumerate(rng.integers(1, 150, 12))}
    corpus = write_docs(tmp_path / "c", docs)
    tok = ByteTokenizer()
    data = PackedCorpus(corpus.files(), tok, seq_len=32, seed=3)
    rows_iter = data.rows()
    rows = [next(rows_iter) for _ in range(40)]  # more than one epoch: wraps around
    stream = np.concatenate([r.ids for r in rows])
    expected = np.concatenate([np.append(tok.encode(docs[os.path.basename(f)]), 256)
                               for epoch in range(3) for f in data.file_order(epoch)])
    np.testing.assert_array_equal(stream, expected[:len(stream)])
    for r in rows:  # segments start exactly where a document starts (or at the row start)
        assert r.cu_seqlens[0] == 0 and r.cu_seqlens[-1] == 32
        starts = set(r.cu_seqlens[1:-1].tolist())
        eos_before = {i for i in range(1, 32) if r.ids[i - 1] == 256}
        assert starts == eos_before
    for k in (0, 5, 17, 30):
        again = data.rows(rows[k].next)
        for j in range(k + 1, 40):
            row = next(again)
            np.testing.assert_array_equal(row.ids, rows[j].ids)
            np.testing.assert_array_equal(row.cu_seqlens, rows[j].cu_seqlens)
    shuffled = ShuffledRows(data, 8, seed=0)
    drawn = [shuffled.next_row() for _ in range(20)]
    assert sorted(r.ids.tobytes() for r in drawn + shuffled.buffer) == sorted(r.ids.tobytes() for r in rows[:27])
    assert [r.ids.tobytes() for r in drawn] != [r.ids.tobytes() for r in rows[:20]]
    saved = shuffled.state()
    later = [shuffled.next_row() for _ in range(30)]
    again = ShuffledRows(data, 8, seed=0)
    again.restore(*saved)
    for a, b in zip(later, [again.next_row() for _ in range(30)]):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.cu_seqlens, b.cu_seqlens)
    batch = make_batch(rows[:6])
    whole = [r for r in rows[:6] if len(r.cu_seqlens) == 2]
    assert 0 < len(whole) < 6 and len(batch.parts) == 2 and batch.tokens == 6 * 32
    assert torch.equal(batch.parts[0].input_ids, torch.from_numpy(np.stack([r.ids for r in whole])))
    assert batch.parts[0].cu_seqlens is None and batch.parts[1].input_ids.shape == (1, (6 - len(whole)) * 32)
    assert batch.targets == sum(32 - (len(r.cu_seqlens) - 1) for r in rows[:6])


def test_held_out_split_is_disjoint_and_stable(tmp_path):
    docs = {f"d{i}.jsonl": [f"doc {i}-{j} " * 5 for j in range(20)] for i in range(3)}
    corpus = write_docs(tmp_path / "c", {k: "\n".join(json.dumps({"text": t}) for t in v) for k, v in docs.items()})
    every_doc = {t for v in docs.values() for t in v}
    tok = ByteTokenizer()

    def texts(split, seed, rows=200):
        data = PackedCorpus(corpus.files(), tok, 16, split, eval_fraction=0.2, seed=seed)
        stream = [r for _, r in zip(range(rows), data.rows())]
        return set(tok.decode(np.concatenate([r.ids for r in stream])).split("<|endoftext|>")) & every_doc

    chosen = {t for f in corpus.files() for j, t in enumerate(docs[os.path.basename(f)]) if is_held_out(f, j, 0.2)}
    assert 0 < len(chosen) < len(every_doc)
    held = texts("eval", 0)
    assert held <= chosen and len(held) >= len(chosen) - 1  # the last, partial eval row is dropped
    assert texts("train", 0) == texts("train", 7) == every_doc - chosen


def test_one_large_file_has_a_held_out_part_and_no_segment_spans_a_gap(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(f"{i} " + "".join(chr(c) for c in rng.integers(97, 123, 80)) + "\n" for i in range(30000))
    corpus = write_docs(tmp_path / "c", {"big.txt": text})
    tok = ByteTokenizer()
    seen = {}
    for split in ("train", "eval"):
        data = PackedCorpus(corpus.files(), tok, 512, split, eval_fraction=0.3)
        rows = [row for _, row in zip(range(3000), data.rows())]
        segments = [row.ids[s:e] for row in rows for s, e in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:])]
        pieces = [tok.decode(seg, skip_special_tokens=True) for seg in segments]
        assert all(p in text for p in pieces)  # a segment never runs across a held-out gap
        seen[split] = {line for p in pieces for line in p.split("\n")[1:-1]}
    assert seen["eval"] and seen["train"] and not seen["eval"] & seen["train"]


def test_packed_batch_loss_is_the_token_weighted_loss_of_its_documents(tmp_path):
    docs = {"a.txt": "first document, fairly short\n", "b.txt": "x" * 3, "c.txt": "the third one " * 6,
            "d.txt": "a long one that fills whole rows by itself. " * 6}
    t = trainer(tmp_path, write_docs(tmp_path / "c", docs), config=tiny_config(router_aux_loss_coef=0.0))
    t.model.eval()
    batch = make_batch([row for _, row in zip(range(6), t.train_data.rows())])  # rows of 64: one document or several
    assert [p.cu_seqlens is None for p in batch.parts] == [True, False]
    with torch.no_grad():
        packed, _, _ = t.batch_loss(batch)
        total, weight = 0.0, 0
        for part in batch.parts:
            for row in part.input_ids:
                cu = part.cu_seqlens.tolist() if part.cu_seqlens is not None else [0, len(row)]
                for s, e in zip(cu[:-1], cu[1:]):
                    if e - s > 1:
                        segment = row[s:e][None]
                        total += float(t.model(segment, labels=segment).loss) * (e - s - 1)
                        weight += e - s - 1
    assert weight == batch.targets
    assert abs(float(packed) - total / weight) <= 1e-5 * total / weight


# --------------------------------------------------------------------------------------------- loop
def test_lr_schedule_warms_up_then_follows_the_cosine():
    s = TrainSettings(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert [lr_at(i, s) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(109, s) == pytest.approx(0.1)
    assert lr_at(60, s) == pytest.approx(0.55, abs=0.01)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 109))


def test_loss_goes_down(tmp_path):
    t = trainer(tmp_path, steps=20, eval_every=10, eval_rows=8, eval_fraction=0.3)
    result = t.fit(progress=False)
    losses = [r["loss"] for r in t.history if r["loss"] is not None]
    evals = [r["eval_loss"] for r in t.history if r["eval_loss"] is not None]
    assert len(losses) == 20 and len(evals) == 3
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert evals[-1] < 0.7 * evals[0] and result["eval_loss"] == evals[-1]
    out = tmp_path / "run"
    assert (out / "loss.png").stat().st_size > 1000
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,tokens,loss,aux_loss,lr,grad_norm") and len(csv_lines) == 22


def test_memorises_a_tiny_corpus(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog near the riverbank.",
             "def add(a, b):\n    return a + b  # the sum of two numbers, ok?",
             "Zebras graze; 42 lions nap under acacia trees in the hot sun!!"]
    corpus = write_docs(tmp_path / "c", {f"{i}.txt": s[:63].ljust(63, ".") for i, s in enumerate(texts)})
    t = trainer(tmp_path, corpus, steps=50, batch_size=3, lr=1e-2, warmup=5, weight_decay=0.0)
    t.fit(progress=False)
    assert t.history[0]["loss"] > 4 and t.history[-1]["loss"] < 0.05


def test_interrupt_and_resume_gives_the_same_losses(tmp_path):
    """Ctrl-C (a real SIGINT) after step 4 saves; resuming runs steps 5-10 exactly as an uninterrupted run.
    Small corpus (epochs wrap), gradient accumulation, evaluation and routing statistics all included."""
    corpus = Corpus(STDLIB_FILES[3:])
    common = dict(steps=10, grad_accum=2, batch_size=2, eval_every=4, eval_rows=4, eval_fraction=0.3, save_every=3)
    full = trainer(tmp_path, corpus, name="full", **common)
    full.fit(progress=False)

    def interrupt(t, row):
        if row["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    first = trainer(tmp_path, corpus, name="cut", **common)
    result = first.fit(callback=interrupt, progress=False)
    assert result["status"] == "interrupted" and result["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = Trainer.resume(str(tmp_path / "cut"))
    assert resumed.step == 4 and resumed.stream.state()[0] == first.stream.state()[0]
    resumed.fit(progress=False)
    keys = ("loss", "aux_loss", "grad_norm", "eval_loss")
    a = [[r[k] for k in keys] for r in full.history]
    b = [[r[k] for k in keys] for r in resumed.history]
    assert [r["step"] for r in full.history] == [r["step"] for r in resumed.history] == list(range(11))
    np.testing.assert_allclose(np.array(b, dtype=float), np.array(a, dtype=float), rtol=0, atol=1e-6)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["latest", "step-000009", "step-000010"]


def test_mid_run_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    t = trainer(tmp_path, steps=4, save_every=2, keep_checkpoints=0)
    snapshot = {}
    t.fit(callback=lambda t, row: row["step"] == 2 and snapshot.update(
        {k: v.clone() for k, v in t.model.state_dict().items()}), progress=False)
    directory = tmp_path / "run" / "checkpoints" / "step-000002"
    ours = load_model(directory)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= 1e-5


def test_aux_loss_pulls_routing_towards_balance(tmp_path):
    rows = PackedCorpus(STDLIB_FILES, ByteTokenizer(), 64, seed=1).rows()
    probe = torch.from_numpy(np.stack([next(rows).ids for _ in range(16)]))
    ratios = {}
    for coef in (0.0, 5.0):
        t = trainer(tmp_path, name=f"coef{coef}", steps=20, config=tiny_config(router_aux_loss_coef=coef))
        t.fit(progress=False)
        with torch.no_grad():
            out = t.model.eval()(probe)
        ratios[coef] = load_ratio(routing_counts(out.router_logits, t.model.config.num_experts_per_tok))
    assert ratios[5.0] < 0.85 * ratios[0.0], ratios


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    plain = trainer(tmp_path, name="plain", steps=2)
    recomputed = trainer(tmp_path, name="ac", steps=2, activation_checkpointing=True)
    plain.fit(progress=False)
    recomputed.fit(progress=False)
    assert [r["loss"] for r in plain.history] == pytest.approx([r["loss"] for r in recomputed.history], abs=1e-6)
    for p, q in zip(plain.model.parameters(), recomputed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


class FakeSummaryWriter:
    """Records what the trainer hands to `torch.utils.tensorboard.SummaryWriter`."""

    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, {}, False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def close(self):
        self.closed = True


METRICS = ("loss", "aux_loss", "lr", "grad_norm", "eval_loss")


def test_tensorboard_gets_every_metric_at_its_step(tmp_path, monkeypatch):
    """With tensorboard present (a stand-in module here), the CSV's metrics reach the SummaryWriter at their
    steps; a resumed run gets a writer that hides what an earlier attempt logged after the checkpoint."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    monkeypatch.setattr(FakeSummaryWriter, "made", [])
    t = trainer(tmp_path, steps=3, eval_every=2, eval_rows=4, eval_fraction=0.3)
    t.fit(progress=False)
    Trainer.resume(str(tmp_path / "run"), overrides={"steps": 5}).fit(progress=False)
    first, second = FakeSummaryWriter.made
    assert first.log_dir == second.log_dir == str(tmp_path / "run" / "tensorboard") and first.closed and second.closed
    assert (first.purge_step, second.purge_step) == (None, 4)
    rows = read_metrics(str(tmp_path / "run"))
    expected = {(key, row["step"]): row[key] for row in rows for key in METRICS if row[key] is not None}
    logged = {k: v for w in (first, second) for k, v in w.scalars.items() if k[0] in METRICS}
    assert logged == pytest.approx(expected, rel=1e-12)
    assert {step for key, step in expected if key == "eval_loss"} == {0, 2, 3, 4, 5}  # every 2 steps and each run's end
    assert {step for key, step in expected if key == "aux_loss"} == {1, 2, 3, 4, 5}


def test_without_tensorboard_no_error_and_no_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    t = trainer(tmp_path, steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(progress=False)
    assert [str(w.message) for w in caught] == []
    assert not (tmp_path / "run" / "tensorboard").exists() and len(read_metrics(str(tmp_path / "run"))) == 2


def test_real_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer(tmp_path, steps=3, eval_every=2, eval_rows=4, eval_fraction=0.3)
    t.fit(progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = read_metrics(str(tmp_path / "run"))
    for key in METRICS:
        expected = {row["step"]: row[key] for row in rows if row[key] is not None}
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(expected, rel=1e-6), key  # float32


def test_warmup_longer_than_the_run_and_evaluation_interval_beyond_it(tmp_path):
    """warmup >= steps is allowed (the lr rises all run long; resuming may add steps) and said in the log;
    eval_every > steps evaluates at the start and the end only."""
    lines = []
    t = trainer(tmp_path, steps=3, warmup=10, eval_every=50, eval_rows=4, eval_fraction=0.3)
    t._log = lines.append
    t.fit(progress=False)
    assert [r["lr"] for r in t.history if r["lr"] is not None] == pytest.approx([3e-4, 6e-4, 9e-4])
    assert any("warm-up (10 steps) lasts the whole run (3 steps)" in line and "9.00e-04" in line for line in lines)
    assert [r["step"] for r in t.history if r["eval_loss"] is not None] == [0, 3]


# --------------------------------------------------------------------------------------------- commands
def test_train_command_writes_a_run_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", *STDLIB_FILES[:2], "--out", out, "--steps", "3", "--seq-len", "32", "--batch-size", "2",
            "--eval-every", "2", "--eval-rows", "2", "--eval-fraction", "0.5", "--log-every", "1", "--no-progress"]
    assert main(args) == 0
    log = open(os.path.join(out, "train.log")).read()
    assert "routing layer 3: max/mean" in log and "held-out loss" in log and "step 3/3" in log
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", out, "--steps", "5", "--no-progress"]) == 0
    assert "step 5/5" in open(os.path.join(out, "train.log")).read()
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-000003", "step-000005"]
    assert main(["train", "--resume", out, "--lr", "1", "--no-progress"]) == 2
    assert "lr cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", out, "--steps", "4", "--no-progress"]) == 2
    assert "is at step 5 of a run of 4 steps: nothing to train" in capsys.readouterr().err


def test_fine_tuning_and_a_bpe_tokenizer(tmp_path):
    """Start from a checkpoint (its tokenizer comes along), and train with a tokenizers BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train(STDLIB_FILES[:2], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    bpe.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    common = ["--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    assert main(["train", *STDLIB_FILES[:2], "--tokenizer", str(tok_dir), "--out", str(tmp_path / "a"),
                 "--steps", "2", *common]) == 0
    first = tmp_path / "a" / "checkpoints" / "step-000002"
    assert Tokenizer.from_file(str(first / "tokenizer.json")).encode("def f(x):").ids == bpe.encode("def f(x):").ids
    assert main(["train", STDLIB_FILES[2], "--config", str(first), "--out", str(tmp_path / "b"), "--steps", "1",
                 *common]) == 0
    tuned = load_model(tmp_path / "b" / "checkpoints" / "step-000001")
    assert tuned.config.eos_token_id == bpe.token_to_id("<|endoftext|>")
    assert not torch.equal(tuned.lm_head.weight, load_model(first).lm_head.weight)


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "held-out loss after 2 steps" in text and "sample (temperature 0.8)" in text
    assert "checkpoints/step-000002" in text and "loss.png" in text
    verify_checkpoint(os.path.join(out, "checkpoints", "step-000002"))
    assert main(["demo", "--out", str(tmp_path), "--steps", "1", "--no-progress"]) == 2  # not a demo directory


# --------------------------------------------------------------------------------------------- bad input
def test_empty_corpus_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty corpus: no files matching"):
        trainer(tmp_path, Corpus([str(tmp_path / "empty")]))
    corpus = write_docs(tmp_path / "blank", {"a.txt": "", "b.txt": ""})
    with pytest.raises(DataError, match="empty corpus: the train split of 2 file"):
        trainer(tmp_path, corpus).fit(progress=False)
    with pytest.raises(DataError, match="does not exist"):
        trainer(tmp_path, Corpus([str(tmp_path / "nowhere")]))
    corpus = write_docs(tmp_path / "short", {"a.txt": "tiny"})
    with pytest.raises(DataError, match="held-out split has no complete row"):
        trainer(tmp_path, corpus, eval_every=1, eval_fraction=0.99).fit(progress=False)


def test_bad_settings_are_reported(tmp_path, capsys):
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings"):
        trainer(tmp_path, config=tiny_config(max_position_embeddings=32))
    with pytest.raises(ConfigError, match="tokenizer has 257 tokens but the model's vocab_size is 100"):
        trainer(tmp_path, config=tiny_config(vocab_size=100))
    for bad, message in [(dict(batch_size=0), "batch_size must be >= 1, got 0"),
                         (dict(grad_accum=-1), "grad_accum must be >= 1, got -1"),
                         (dict(seq_len=1), "seq_len must be >= 2, got 1"),
                         (dict(steps=0), "steps must be >= 1, got 0"),
                         (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
                         (dict(weight_decay=float("nan")), "weight_decay must be >= 0"),
                         (dict(betas=(0.9, 1.0)), "betas must be two numbers in"),
                         (dict(eval_fraction=1.0), "eval_fraction must be in"),
                         (dict(max_time=0.0), "max_time must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            trainer(tmp_path, **bad)
    with pytest.raises(ConfigError, match="(?s)batch_size must be >= 1.*seq_len must be >= 2"):  # all at once
        trainer(tmp_path, seq_len=0, batch_size=0)
    with pytest.raises(ConfigError, match="needs eval_fraction > 0"):
        trainer(tmp_path, eval_every=5, eval_fraction=0.0)
    assert main(["train", *STDLIB_FILES, "--out", str(tmp_path / "x"), "--seq-len", "100000"]) == 2
    assert main(["train", *STDLIB_FILES, "--out", str(tmp_path / "x"), "--grad-accum", "0"]) == 2
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2 and not (tmp_path / "d").exists()
    assert "grad_accum must be >= 1" in capsys.readouterr().err


def test_partial_and_corrupt_checkpoints_are_refused(tmp_path, capsys):
    t = trainer(tmp_path, steps=1)
    path = t.fit(progress=False)["checkpoint"]
    verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such directory"):
        Trainer.resume(str(tmp_path / "missing"))
    weights = os.path.join(path, "model.safetensors")
    blob = bytearray(open(weights, "rb").read())
    blob[-100] ^= 0xFF
    open(weights, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        Trainer.resume(str(tmp_path / "run"))
    open(weights, "wb").write(bytes(blob[:-10]))
    with pytest.raises(CheckpointError, match="bytes, .* were written"):
        Trainer.resume(path)
    os.remove(os.path.join(path, MARKER))
    with pytest.raises(CheckpointError, match="incomplete training checkpoint"):
        Trainer.resume(path)
    assert main(["train", "--resume", path, "--no-progress"]) == 2
    assert "refusing to load it" in capsys.readouterr().err
