"""Scale-out on torch.distributed, on the CPU with gloo: every parallel layout against one process.

Two spawned jobs do all the work (process start-up dominates on 2 cores, so checks share them): one
of 4 processes (2-dim meshes, and a DCP checkpoint saved at tp2 x dp_shard2) and one of 2 processes
(tp, ep, cp, dp_shard alone, the context-parallel gated delta rule, errors, resuming the 4-process
checkpoint at another mesh, Hugging Face export, models built on the meta device and filled shard by
shard). Each rank builds the same seeded model and its own one-process reference on the same global
batch, and records relative errors; the tests assert them.
Gradients: per tensor, max |a - b| / max(max |b|, 1% of the model's largest gradient entry), as in
test_model_parity (A_log/dt_bias gradients cancel to ~1e-7 at initialisation).
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import math
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

TOL = 1e-4
CURVE_DTYPE, CURVE_TOL = torch.float64, TOL
B, T = 4, 22  # cp=2 slices of 11 tokens: not a multiple of the chunk size (8)
STEPS, SAVE_AT = 10, 5
CONFIG = dict(
    vocab_size=257, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_attention_chunk_size=8, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, mlp_only_layers=[1], router_aux_loss_coef=0.05,
)
# one-dim layouts on 2 processes; "tp_mqa" has one KV head (replicated over tp) and an odd length (no SP)
# "ep_in_dp": the ep ranks are the dp_shard ranks (each its own rows)
LAYOUTS_2 = {"tp": dict(tp=2), "tp_mqa": dict(tp=2), "ep": dict(ep=2), "cp": dict(cp=2), "dp_shard": dict(dp_shard=2),
             "ep_in_dp": dict(dp_shard=2, ep=2, ep_in_dp=True)}
# with ep_in_dp on 4: experts replicated over cp (their gradients summed over it), and over dp_shard / ep
LAYOUTS_4 = {"tp2_dp2": dict(tp=2, dp_shard=2), "ep2_dp2": dict(ep=2, dp_shard=2), "cp2_tp2": dict(cp=2, tp=2),
             "ep2_in_dp2_cp2": dict(dp_shard=2, cp=2, ep=2, ep_in_dp=True),
             "ep2_in_dp4": dict(dp_shard=4, ep=2, ep_in_dp=True)}
# documents packed in one row of T = 22 (cu_seqlens); cp=2 splits it at 11: a document that crosses the
# split starting 2 tokens before it (the conv reads 3 back), and one that starts exactly at it
PACKED = {"cp_packed": (dict(cp=2), [0, 4, 9, 15, 22]), "cp_packed_at_split": (dict(cp=2), [0, 6, 11, 22]),
          "tp_packed": (dict(tp=2), [0, 4, 9, 15, 22])}


CURVES = ("tp", "ep", "cp", "dp_shard", "ep_in_dp")  # 10-step training curves against one process


# --------------------------------------------------------------------------------------------- helpers
def _config(name="", **overrides):
    from qwen3next.config import Qwen3NextConfig

    extra = dict(num_key_value_heads=1) if name == "tp_mqa" else {}
    return Qwen3NextConfig.preset("tiny", **{**CONFIG, **extra, **overrides})


def _model(config, seed=0, dtype=torch.float32):
    from qwen3next.model import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    return Qwen3NextForCausalLM(config).to(dtype)


def _batch(config, step, length=T):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, config.vocab_size, (B, length), generator=g)
    labels = ids.clone()
    labels[0, 5] = labels[2, -1] = -100
    return ids, labels


def _full(t, name=""):
    """The whole tensor of `t` (a DTensor gathered as `export_hf` gathers the parameter `name`)."""
    from qwen3next.distributed.checkpoint import whole_tensor

    return whole_tensor(name, t)


def _rel(a, b, floor=0.0):
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor, 1e-30)


def _train(model, config, dims=None, steps=range(STEPS), optimizer=None):
    """AdamW steps on the seeded batches; returns (losses, optimizer). Curves are run in fp64 (the loss
    itself is fp32 in both): Adam turns rounding in the near-zero A_log gradients into full-size steps of
    either sign, so in fp32 two exact implementations drift apart by ~1e-4 within ten steps (fp64: ~5e-6)."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for step in steps:
        ids, labels = _batch(config, step % 2)  # two batches in turn: the loss falls as they are learnt
        if dims is not None:
            ids, labels = dims.local_batch(ids), dims.local_batch(labels)
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def _parity(config, dims, length=T, cu_seqlens=None):
    """Worst relative errors of logits, loss, aux loss and gradients against one process (one row of
    packed documents when `cu_seqlens` is given)."""
    from qwen3next.distributed import parallelize

    ref = _model(config)
    model = parallelize(copy.deepcopy(ref), dims, param_dtype=None, reduce_dtype=None)
    ids, labels = _batch(config, 0, length)
    if cu_seqlens is not None:
        ids, labels, cu_seqlens = ids[:1], labels[:1], torch.tensor(cu_seqlens)
    want = ref(ids, labels=labels, cu_seqlens=cu_seqlens)
    want.loss.backward()
    got = model(dims.local_batch(ids), labels=dims.local_batch(labels), cu_seqlens=cu_seqlens)
    got.loss.backward()
    grads = dict(ref.named_parameters())
    top = max(p.grad.abs().max().item() for p in grads.values())
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names, "parameter names changed"
    return {
        "logits": _rel(_full(got.logits), dims.local_batch(want.logits)),
        "loss": _rel(got.loss, want.loss), "aux": _rel(got.aux_loss, want.aux_loss),
        "grads": max(_rel(_full(p.grad, n), grads[n].grad, 0.01 * top) for n, p in model.named_parameters()),
    }


def _curve(config, dims, steps=range(STEPS)):
    from qwen3next.distributed import parallelize

    model = parallelize(_model(config, dtype=CURVE_DTYPE), dims, param_dtype=None, reduce_dtype=None)
    return _train(model, config, dims, steps)


def _expect_error(fn, *fragments):
    """'ok' if fn() raises an error whose message holds every fragment; else what happened."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        message = str(e)
        return "ok" if all(f in message for f in fragments) else f"{type(e).__name__}: {message}"
    return "no error"


# --------------------------------------------------------------------------------------------- jobs
def _job_4(results, workdir):
    from qwen3next.distributed import ParallelDims, checkpoint, parallelize

    for name, layout in LAYOUTS_4.items():
        dims = ParallelDims(**layout)
        results[f"parity/{name}"] = _parity(_config(), dims)
    config = _config()
    results["curve/reference"] = _train(_model(config, dtype=CURVE_DTYPE), config)[0]
    dims = ParallelDims(tp=2, dp_shard=2)
    model = parallelize(_model(config, dtype=CURVE_DTYPE), dims, param_dtype=None, reduce_dtype=None)
    first, optimizer = _train(model, config, dims, range(SAVE_AT))
    checkpoint.save(os.path.join(workdir, "dcp_tp2_dp2"), model, optimizer, step=SAVE_AT)
    rest, _ = _train(model, config, dims, range(SAVE_AT, STEPS), optimizer)
    results["curve/tp2_dp2"] = first + rest


def _job_2(results, workdir):
    from qwen3next.distributed import ParallelConfigError, ParallelDims, checkpoint, parallelize

    for name, layout in LAYOUTS_2.items():
        results[f"parity/{name}"] = _parity(_config(name), ParallelDims(**layout), T - 1 if name == "tp_mqa" else T)
    for name, (layout, cu_seqlens) in PACKED.items():
        results[f"parity/{name}"] = _parity(_config(), ParallelDims(**layout), cu_seqlens=cu_seqlens)
    results["cp_rule"] = _cp_rule_check(ParallelDims(cp=2))
    config = _config()
    results["curve/reference"] = _train(_model(config, dtype=CURVE_DTYPE), config)[0]
    for name in CURVES:
        results[f"curve/{name}"] = _curve(config, ParallelDims(**LAYOUTS_2[name]))[0]
    # FSDP computing in bf16 (training's setting on a GPU): the root's weights must outlive its forward;
    # under ep_in_dp FSDP leaves the (fp32) experts, which meet bf16 activations
    for name in ("dp_shard", "ep_in_dp"):
        dims = ParallelDims(**LAYOUTS_2[name])
        bf16 = parallelize(_model(config), dims, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        results[f"curve/{name}_bf16"] = _train(bf16, config, dims, range(3))[0]

    # resume the 4-process checkpoint (tp2 x dp_shard2) on 2 processes with another layout, into a model
    # built on the meta device and materialised shard by shard
    dims = ParallelDims(ep=2)
    with torch.device("meta"):
        model = _model(config, dtype=CURVE_DTYPE)
    model = parallelize(model, dims, param_dtype=None, reduce_dtype=None).to_empty(device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    step = checkpoint.load(os.path.join(workdir, "dcp_tp2_dp2"), model, optimizer)
    results["resume/step"] = step
    results["resume/ep"] = _train(model, config, dims, range(step, STEPS), optimizer)[0]

    dims = ParallelDims(tp=2)
    model = parallelize(_model(config, seed=3), dims, param_dtype=None, reduce_dtype=None)
    checkpoint.export_hf(model, os.path.join(workdir, "hf_tp2"), max_shard_size="200KB")
    results["generate/tp"] = _generate_check(config, model)
    results["generate/cli"] = _cli_generate(os.path.join(workdir, "hf_tp2"), "--tp", "2")
    checkpoints = {"ours": os.path.join(workdir, "hf_tp2"), "transformers": os.path.join(workdir, "hf_transformers")}
    _meta_checks(results, {k: v for k, v in checkpoints.items() if os.path.isdir(v)})

    # clear errors, raised on every rank before any work
    bad_heads = _config(linear_num_key_heads=3, linear_num_value_heads=3)
    untouched = _model(bad_heads)
    results["error/tp_heads"] = _expect_error(lambda: parallelize(untouched, ParallelDims(tp=2)), "linear_num_key_heads=3")
    results["error/untouched"] = not any(type(p).__name__ == "DTensor" for p in untouched.parameters())
    bad_experts = _config(num_experts=3, num_experts_per_tok=1)
    results["error/ep_experts"] = _expect_error(lambda: parallelize(_model(bad_experts), ParallelDims(ep=2)),
                                                "ep=2 must divide num_experts=3")
    results["error/world"] = _expect_error(lambda: ParallelDims(tp=2, ep=2), "world has 2 processes")
    results["error/dims"] = _expect_error(lambda: ParallelDims(tp=0), "tp=0")
    results["error/ep_in_dp"] = _expect_error(lambda: ParallelDims(dp_shard=2, ep=4, ep_in_dp=True),
                                              "ep=4 must divide dp_shard=2")
    cp_dims = ParallelDims(cp=2)
    cp_model = parallelize(_model(config), cp_dims, param_dtype=None, reduce_dtype=None)
    short = torch.randint(0, config.vocab_size, (1, 3))  # slices of 2 and 1 tokens; the conv reads 3 back
    results["error/cp_short"] = _expect_error(lambda: cp_model(cp_dims.cp_slice(short)), "at least 3", "kernel 4")
    other = _config(hidden_size=32)
    other_model = parallelize(_model(other), ParallelDims(dp_shard=2), param_dtype=None, reduce_dtype=None)
    results["error/ckpt_config"] = _expect_error(
        lambda: checkpoint.load(os.path.join(workdir, "dcp_tp2_dp2"), other_model), "different model config", "hidden_size")
    results["error/class"] = isinstance(ParallelConfigError("x"), ValueError)
    _train_checks(results, workdir)


# --------------------------------------------------------------------------------------------- meta device
META_SEED = 5


def _meta_checks(results, checkpoints: dict):
    """Under tp, ep and dp_shard: a model built on the meta device holds only its shards (a share of
    the model's elements); seeded shard by shard it is, tensor for tensor, the model one process builds
    with that seed (and the generator is left where building leaves it); filled from each checkpoint
    ({label: directory}), it is the model one process loads, with its logits. A checkpoint of another
    config: a clear error."""
    from qwen3next.checkpoint import load_model
    from qwen3next.distributed import ParallelDims
    from qwen3next.distributed.materialize import build_sharded, fill_from_checkpoint, fill_random, fill_seeded
    from qwen3next.distributed.tensor_parallel import local

    config = _config()
    seeded = dict(_model(config, seed=META_SEED).named_parameters())
    after = torch.rand(4)  # the generator's next draws after building the model
    total = sum(p.numel() for p in seeded.values())
    ids, _ = _batch(config, 0)
    loaded = {label: load_model(path) for label, path in checkpoints.items()}
    with torch.no_grad():
        want = {label: m(ids).logits for label, m in loaded.items()}
    for name in ("tp", "ep", "dp_shard"):
        dims = ParallelDims(**LAYOUTS_2[name])
        model = build_sharded(config, dims, "cpu", param_dtype=None, reduce_dtype=None)
        out = {"held": sum(local(p).numel() for p in model.parameters()) / total,
               "meta": any(local(p).is_meta for p in model.parameters())}
        fill_seeded(model, META_SEED)
        out["generator"] = torch.equal(torch.rand(4), after)
        out["seeded_differ"] = [n for n, p in model.named_parameters() if not torch.equal(_full(p, n), seeded[n])]
        for label, path in checkpoints.items():
            fill_from_checkpoint(model, path)
            one = dict(loaded[label].named_parameters())
            out[f"{label}_differ"] = [n for n, p in model.named_parameters() if not torch.equal(_full(p, n), one[n])]
            with torch.no_grad():
                out[f"{label}_logits"] = _rel(_full(model(dims.local_batch(ids)).logits), dims.local_batch(want[label]))
        fill_random(model, META_SEED)
        out["random_unlike_init"] = [n for n, p in model.named_parameters() if not _like_init(n, local(p), seeded[n])]
        results[f"meta/{name}"] = out
    other = build_sharded(_config(hidden_size=32), ParallelDims(tp=2), "cpu", param_dtype=None, reduce_dtype=None)
    results["meta/error"] = _expect_error(lambda: fill_from_checkpoint(other, checkpoints["ours"]), "does not match",
                                          "model.embed_tokens.weight: file (257, 64), model (257, 32)")


def _like_init(name: str, shard: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether a shard drawn by `fill_random` follows the initialisation of the one-process tensor `whole`:
    finite; constant where `whole` is constant (norm weights, dt_bias); A_log = log(uniform(0.01, 16));
    the rest spread like `whole` (std within 30%). An empty shard (FSDP's of a one-row tensor) passes."""
    if shard.numel() == 0:
        return True
    if not bool(torch.isfinite(shard).all()):
        return False
    if bool((whole == whole.flatten()[0]).all()):
        return bool((shard == whole.flatten()[0]).all())
    if name.endswith("A_log"):
        return bool(((shard >= math.log(0.01)) & (shard <= math.log(16))).all()) and shard.unique().numel() > 1
    return abs(shard.std().item() / whole.std().item() - 1) < 0.3


# --------------------------------------------------------------------------------------------- trainer
TRAIN = dict(steps=STEPS, seq_len=24, batch_size=4, lr=3e-3, warmup=2, min_lr_ratio=1.0, eval_every=SAVE_AT,
             eval_rows=4, eval_fraction=0.3, save_every=0, log_every=SAVE_AT)  # constant lr: a shorter run is a prefix
# layout, settings: the tp run saves at SAVE_AT (resumed under dp_shard, and in one process), the ep_in_dp
# run ends there (resumed in one process); cp runs with activation checkpointing (layers recomputed in
# their own call's layout state)
TRAIN_LAYOUTS = {"tp": (dict(tp=2), dict(save_every=SAVE_AT)), "dp_shard": (dict(dp_shard=2), {}),
                 "cp_ac": (dict(cp=2), dict(steps=SAVE_AT, activation_checkpointing=True)),
                 "ep_in_dp": (LAYOUTS_2["ep_in_dp"], dict(steps=SAVE_AT))}
# the runs whose model is built on the meta device and seeded shard by shard, as `qwen3next train` does
# under torchrun (the cp run gets the whole seeded model and cuts its shards from it)
TRAIN_META = ("tp", "dp_shard", "ep_in_dp")


def _write_corpus(directory) -> str:
    """Documents of 5 to 60 words: rows of 24 bytes hold one document or several (two forward calls)."""
    import random

    rng = random.Random(0)
    words = "def class return import self value index the of and to in is for".split()
    os.makedirs(directory, exist_ok=True)
    for i in range(24):
        with open(os.path.join(directory, f"d{i:02d}.txt"), "w") as f:
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "\n")
    return str(directory)


def _trainer(workdir, name, dims=None, meta=False, **settings):
    import functools

    from qwen3next.distributed.materialize import fill_seeded
    from qwen3next.model import Qwen3NextForCausalLM
    from qwen3next.train import ByteTokenizer, Corpus, Trainer, TrainSettings

    config = _config()
    if meta:
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(config)
        fill = functools.partial(fill_seeded, seed=0)  # _model's seed
    else:
        model, fill = _model(config), None
    return Trainer(model, ByteTokenizer(), Corpus([os.path.join(workdir, "corpus")]),
                   TrainSettings(**{**TRAIN, **settings}), os.path.join(workdir, name), dims=dims, fill=fill)


def _train_checks(results, workdir):
    """`Trainer` under each layout on the same global batches as one process, a resume on another
    layout, and `qwen3next train` with the layout flags."""
    import contextlib
    import io

    from qwen3next.cli import main
    from qwen3next.distributed import ParallelDims
    from qwen3next.train import Trainer

    def fit(trainer):
        rows = []  # every rank's metrics (only rank 0 writes them to its run directory)
        result = trainer.fit(callback=lambda t, row: rows.append(row), progress=False)
        return {"rows": rows, "history": trainer.history, "plot": result["plot"]}

    rank = torch.distributed.get_rank()
    results["train/one"] = fit(_trainer(workdir, f"train_one_rank{rank}"))
    for name, (layout, settings) in TRAIN_LAYOUTS.items():
        results[f"train/{name}"] = fit(_trainer(workdir, f"train_{name}", ParallelDims(**layout), name in TRAIN_META,
                                                **settings))
    resumed = Trainer.resume(os.path.join(workdir, "train_tp", "checkpoints", f"step-{SAVE_AT:06d}"),
                             out_dir=os.path.join(workdir, "train_resumed"), dims=ParallelDims(dp_shard=2))
    results["train/resumed_step"] = resumed.step
    results["train/resumed"] = fit(resumed)

    corpus = os.path.join(workdir, "corpus")
    flags = _cli_flags(workdir)

    def cli(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", *args])
        return code, err.getvalue()

    results["cli/run"] = cli(corpus, *flags, "--out", os.path.join(workdir, "cli_run"), "--ep", "2")
    results["cli/resume"] = cli("--resume", os.path.join(workdir, "cli_run"), "--steps", "3", "--no-progress", "--tp", "2")
    results["cli/world"] = cli(corpus, *flags, "--out", os.path.join(workdir, "cli_bad"), "--tp", "2", "--dp-shard", "2")
    results["cli/batch"] = cli(corpus, *flags, "--out", os.path.join(workdir, "cli_bad"), "--dp-shard", "2",
                               "--batch-size", "3")
    results["cli/ep_in_dp"] = cli(corpus, *flags, "--out", os.path.join(workdir, "cli_bad"), "--dp-shard", "2",
                                  "--ep", "4", "--ep-in-dp")
    results["cli/cp_short"] = cli(corpus, *flags, "--out", os.path.join(workdir, "cli_bad"), "--cp", "2",
                                  "--seq-len", "4")


def _cli_flags(workdir) -> list[str]:
    """`qwen3next train` settings of a 2-step fine-tune of the exported tp=2 checkpoint."""
    return ["--steps", "2", "--seq-len", "24", "--batch-size", "4", "--eval-every", "1", "--eval-fraction", "0.3",
            "--eval-rows", "4", "--no-progress", "--config", os.path.join(workdir, "hf_tp2"), "--tokenizer", "byte"]


def _generate_check(config, model):
    """Greedy generation under tp=2 (sequence-parallel prefill of a left-padded batch, then one-token
    steps without SP) against one process: the same tokens."""
    from qwen3next.generate import generate

    ids = torch.randint(1, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = generate(_model(config, seed=3).eval(), ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    got = generate(model.eval(), ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    return {"equal": torch.equal(got, want), "new_tokens": got.shape[1] - ids.shape[1]}


def _cli_generate(path, *flags):
    """What `qwen3next generate` prints to stdout (greedy, prompt given as ids)."""
    import contextlib
    import io

    from qwen3next.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["generate", "--model", path, "--prompt-ids", "5 17 3 99", "--max-new-tokens", "6", *flags])
    return out.getvalue()


def _cp_rule_check(dims):
    """The context-parallel gated delta rule on its own (fp64, T=25 split 13 + 12, chunk 8), with an
    initial state: outputs, the final state (last rank) and every input's gradient against one process."""
    from qwen3next import ops
    from qwen3next.distributed.context_parallel import CPRuntime, cp_gated_delta_rule

    g = torch.Generator().manual_seed(5)
    Bq, Tq, Hk, Hv, dk, dv = 2, 25, 2, 4, 8, 12
    q, k = torch.randn(Bq, Tq, Hk, dk, generator=g, dtype=torch.float64), torch.randn(Bq, Tq, Hk, dk, generator=g, dtype=torch.float64)
    v = torch.randn(Bq, Tq, Hv, dv, generator=g, dtype=torch.float64)
    gate = -torch.rand(Bq, Tq, Hv, generator=g, dtype=torch.float64)
    beta = torch.rand(Bq, Tq, Hv, generator=g, dtype=torch.float64)
    s0 = torch.randn(Bq, Hv, dk, dv, generator=g, dtype=torch.float64)
    weights = torch.randn(Bq, Tq, Hv, dv, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, gate, beta, s0)]
    rule = lambda *a, **kw: ops.chunk_gated_delta_rule(*a, chunk_size=8, **kw)  # noqa: E731
    o, final = rule(q, k, v, gate, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ((o * weights).sum() + final.square().sum()).backward()
    want = [t.grad.clone() for t in inputs]
    cp = CPRuntime(dims.group("cp"))
    local = [dims.cp_slice(t.detach()).requires_grad_() for t in (q, k, v, gate, beta)]
    mine = s0.detach().clone().requires_grad_()
    o_r, final_r = cp_gated_delta_rule(rule, cp, *local, initial_state=mine, output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
    last = cp.rank == cp.size - 1
    ((o_r * dims.cp_slice(weights)).sum() + (final_r.square().sum() if last else 0)).backward()
    out = {"o": _rel(o_r, dims.cp_slice(o.detach())), "lengths": [int(o_r.shape[1])]}
    if last:
        out["final"] = _rel(final_r, final.detach())
    for name, t, w in zip("q k v g beta".split(), local, want):
        out[f"grad_{name}"] = _rel(t.grad, dims.cp_slice(w))
    s0_grad = torch.zeros_like(mine) if mine.grad is None else mine.grad.clone()
    torch.distributed.all_reduce(s0_grad, group=cp.group)  # read on rank 0 only: its gradient is there
    out["grad_initial_state"] = _rel(s0_grad, want[5])
    return out


JOBS = {"2": (2, _job_2), "4": (4, _job_4)}


def _worker(rank, world, port, job, workdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        JOBS[job][1](results, workdir)
    except Exception:
        results["crash"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(workdir, f"job{job}_rank{rank}.json"), "w") as f:
            json.dump(results, f)
        torch.distributed.destroy_process_group()


def _run_job(job, workdir) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = JOBS[job][0]
    mp.start_processes(_worker, args=(world, port, job, str(workdir)), nprocs=world, start_method="spawn")
    ranks = []
    for rank in range(world):
        with open(os.path.join(workdir, f"job{job}_rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def four(workdir):
    return _run_job("4", workdir)


@pytest.fixture(scope="module")
def two(workdir, four):  # resumes the checkpoint the 4-process job saved
    _write_corpus(os.path.join(workdir, "corpus"))
    _write_transformers_checkpoint(os.path.join(workdir, "hf_transformers"))
    return _run_job("2", workdir)


def _write_transformers_checkpoint(directory) -> None:
    """A checkpoint that transformers writes (per-expert keys, several shards), when it is installed."""
    if importlib.util.find_spec("transformers") is None:
        return
    from conftest import hf_twin

    hf_twin(_model(_config(), seed=4)).save_pretrained(directory, max_shard_size="200KB")


def _worst(ranks, key):
    """The largest value of each metric over the ranks."""
    merged = {}
    for r in ranks:
        for name, value in r[key].items():
            if isinstance(value, float):
                merged[name] = max(merged.get(name, 0.0), value)
    return merged


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", [*LAYOUTS_2, *PACKED])
def test_one_dim_layout_matches_one_process(two, name):
    """Logits, loss, aux loss and every gradient under tp / ep / cp / dp_shard equal one process (also
    on documents packed in a row, split by cp inside and at the start of a document)."""
    worst = _worst(two, f"parity/{name}")
    assert set(worst) == {"logits", "loss", "aux", "grads"}
    assert all(v <= TOL for v in worst.values()), worst


@pytest.mark.parametrize("name", LAYOUTS_4)
def test_two_dim_mesh_matches_one_process(four, name):
    worst = _worst(four, f"parity/{name}")
    assert set(worst) == {"logits", "loss", "aux", "grads"}
    assert all(v <= TOL for v in worst.values()), worst


def test_context_parallel_rule_with_states(two):
    """Uneven split (13 + 12 tokens, chunk 8), initial state in, final state out, all gradients (fp64)."""
    assert sorted(r["cp_rule"]["lengths"][0] for r in two) == [12, 13]
    worst = _worst(two, "cp_rule")
    assert {"o", "final", "grad_q", "grad_k", "grad_v", "grad_g", "grad_beta", "grad_initial_state"} <= set(worst)
    assert all(v <= 1e-10 for v in worst.values()), worst


@pytest.mark.parametrize("name", CURVES)
def test_training_follows_one_process(two, name):
    reference = two[0]["curve/reference"]
    assert reference[-1] < reference[0] - 0.1  # it learns: the comparison is not between flat lines
    for r in two:
        assert max(_rel(torch.tensor(a), torch.tensor(b)) for a, b in zip(r[f"curve/{name}"], reference)) <= CURVE_TOL


@pytest.mark.parametrize("name", ["dp_shard", "ep_in_dp"])
def test_fsdp_in_bf16_trains_like_fp32(two, name):
    """FSDP with bf16 compute (fp32 weights and gradient sums) runs forward, backward and steps (the root's
    all-gathered weights serve its backward: torch 2.11 freed them after the forward, failing the backward)
    and its losses follow the fp32 run's within bf16 rounding; also with the experts outside FSDP."""
    for r in two:
        got, want = r[f"curve/{name}_bf16"], r["curve/reference"][:3]
        assert all(math.isfinite(x) for x in got), got
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 2e-2, (got, want)


def test_training_on_two_dim_mesh_follows_one_process(four):
    reference = four[0]["curve/reference"]
    for r in four:
        assert len(r["curve/tp2_dp2"]) == STEPS
        assert max(_rel(torch.tensor(a), torch.tensor(b)) for a, b in zip(r["curve/tp2_dp2"], reference)) <= CURVE_TOL


def test_checkpoint_saved_on_4_resumes_on_2(two, four):
    """DCP save at tp2 x dp_shard2 after 5 steps; resumed under ep2 (into a meta-device model materialised
    shard by shard) the next 5 losses are one process's."""
    reference = four[0]["curve/reference"]
    for r in two:
        assert r["resume/step"] == SAVE_AT
        resumed = r["resume/ep"]
        assert len(resumed) == STEPS - SAVE_AT
        assert max(_rel(torch.tensor(a), torch.tensor(b)) for a, b in zip(resumed, reference[SAVE_AT:])) <= CURVE_TOL


def test_hf_export_loads_in_transformers(two, workdir):
    """The export of a tp=2 model, gathered tensor by tensor into several shards, loads in transformers
    and in qwen3next with the one-process model's logits."""
    transformers = pytest.importorskip("transformers")
    from qwen3next.checkpoint import load_model

    path = os.path.join(workdir, "hf_tp2")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    config = _config()
    ours = _model(config, seed=3).eval()
    ids, _ = _batch(config, 0)
    with torch.no_grad():
        want = ours(ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert _rel(hf(ids).logits, want) <= TOL
        assert _rel(load_model(path)(ids).logits, want) <= 1e-6


def test_greedy_generate_under_tp_matches_one_process(two, workdir):
    for r in two:
        assert r["generate/tp"] == {"equal": True, "new_tokens": 8}
    # `torchrun --nproc-per-node 2 -m qwen3next generate ... --tp 2`: rank 0 prints one process's tokens
    alone = _cli_generate(os.path.join(workdir, "hf_tp2"))
    assert len(alone.split()) == 6
    assert two[0]["generate/cli"] == alone and two[1]["generate/cli"] == ""


def test_meta_device_model_is_one_process_model(two):
    """Under tp, ep and dp_shard a model built on the meta device and filled shard by shard holds a
    share of the model only; seeded, every tensor is the one-process model's and the generator goes on
    as after building it; filled from our and transformers' checkpoints (several shards, per-expert
    keys), every tensor is what one process loads and the logits are its logits. Filled at random
    (`fill_random`), every shard follows the initialisation's distributions."""
    labels = ["ours"] + (["transformers"] if importlib.util.find_spec("transformers") else [])
    for r in two:
        for name in ("tp", "ep", "dp_shard"):
            out = r[f"meta/{name}"]
            assert not out["meta"] and out["held"] < 0.75, (name, out["held"])  # the whole model: 1
            assert out["generator"] and out["seeded_differ"] == [], (name, out)
            assert out["random_unlike_init"] == [], (name, out["random_unlike_init"])
            for label in labels:
                assert out[f"{label}_differ"] == [] and out[f"{label}_logits"] <= TOL, (name, label, out)
        assert r["meta/error"] == "ok", r["meta/error"]


def test_bad_inputs_get_clear_errors(two):
    for r in two:
        for name in ("tp_heads", "ep_experts", "world", "dims", "ep_in_dp", "cp_short", "ckpt_config"):
            assert r[f"error/{name}"] == "ok", (name, r[f"error/{name}"])
        assert r["error/untouched"] and r["error/class"]


TRAIN_METRICS = ("loss", "aux_loss", "grad_norm", "eval_loss")


def _curve_error(got: list[dict], want: list[dict]) -> float:
    """Worst relative difference of the metrics of the same steps (rows of `Trainer.fit`'s callback)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst = 0.0
    for a, b in zip(got, want):
        for key in TRAIN_METRICS:  # a row without eval_loss: no evaluation at that step
            assert (a.get(key) is None) == (b.get(key) is None), (a["step"], key)
            if b.get(key) is not None:
                worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    return worst


@pytest.mark.parametrize("name", TRAIN_LAYOUTS)
def test_trainer_follows_one_process(two, name):
    """`Trainer` under tp=2, dp_shard=2 (FSDP), cp=2 (with activation checkpointing) and ep=2 inside
    dp_shard=2, on the same global batches of packed documents (rows of one document and rows of
    several): every rank sees one process's loss, aux loss, gradient norm (clipping over the shards)
    and held-out loss. The tp, dp_shard and ep_in_dp runs start from a model built on the meta device
    and seeded shard by shard."""
    one = two[0]["train/one"]["rows"]
    assert one[-1]["loss"] < one[0]["loss"] - 1.0  # it learns: the curves are not flat lines
    steps = TRAIN_LAYOUTS[name][1].get("steps", STEPS)
    for r in two:
        assert _curve_error(r[f"train/{name}"]["rows"], one[:steps]) <= 1e-5


@pytest.mark.parametrize("run", ["tp", "ep_in_dp"])
def test_trainer_resumes_on_another_layout_and_in_one_process(two, workdir, tmp_path, run):
    """The tp=2 run's checkpoint of step 5 (DCP shards) resumed under dp_shard=2 continues with one
    process's losses; so does it, and the checkpoint of the run with ep inside dp_shard (experts outside
    FSDP), resumed in this process, without torch.distributed."""
    from qwen3next.train import Trainer

    one = two[0]["train/one"]["rows"]
    for r in two:
        assert r["train/resumed_step"] == SAVE_AT
        assert _curve_error(r["train/resumed"]["rows"], one[SAVE_AT:]) <= 1e-5
    trainer = Trainer.resume(os.path.join(workdir, f"train_{run}", "checkpoints", f"step-{SAVE_AT:06d}"),
                             out_dir=str(tmp_path / "resumed"), overrides={"steps": STEPS})
    rows = []
    trainer.fit(callback=lambda t, row: rows.append(row), progress=False)
    assert _curve_error(rows, one[SAVE_AT:]) <= 1e-5


def test_rank0_alone_writes_the_run_files(two, workdir):
    """The run directory of a parallel run holds one metrics.csv (every step once), the plot and the
    checkpoints; rank 1 writes none of them. The final checkpoint is a Hugging Face checkpoint of the
    same weights as the one-process run's."""
    from qwen3next.checkpoint import load_model
    from qwen3next.train.loop import read_metrics

    run = os.path.join(workdir, "train_dp_shard")
    expected = {"checkpoints", "metrics.csv", "loss.png"}
    assert expected <= set(os.listdir(run)) <= expected | {"tensorboard"}
    assert [row["step"] for row in read_metrics(run)] == list(range(STEPS + 1))
    assert two[0]["train/dp_shard"]["plot"] == os.path.join(run, "loss.png")
    assert two[1]["train/dp_shard"]["history"] == [] and two[1]["train/dp_shard"]["plot"] is None
    final = os.path.join(run, "checkpoints", f"step-{STEPS:06d}")
    assert os.path.isdir(os.path.join(final, "dcp"))
    ids, _ = _batch(_config(), 0)
    with torch.no_grad():
        got = load_model(final)(ids).logits
        want = load_model(os.path.join(workdir, "train_one_rank0", "checkpoints", f"step-{STEPS:06d}"))(ids).logits
    assert _rel(got, want) <= 1e-4


def test_train_command_with_layout_flags(two, workdir, capsys):
    """`qwen3next train ... --ep 2` (as under torchrun: fine-tuning the exported checkpoint, each rank
    reading its shards into a model built on the meta device) has one process's losses; then
    `--resume ... --tp 2`; rank 0 alone logs. Clear errors for a layout that does not fit the world,
    the batch or the rows, and for flags without torchrun."""
    from qwen3next.cli import main
    from qwen3next.train.loop import read_metrics

    for r in two:
        assert r["cli/run"] == [0, ""] and r["cli/resume"] == [0, ""]
        assert r["cli/world"][0] == 2 and "the world has 2 processes" in r["cli/world"][1]
        assert r["cli/batch"][0] == 2 and "--batch-size 3 must divide by --dp-shard 2" in r["cli/batch"][1]
        assert r["cli/cp_short"][0] == 2 and "slices of 2 tokens" in r["cli/cp_short"][1]
        assert r["cli/ep_in_dp"][0] == 2 and "ep=4 must divide dp_shard=2" in r["cli/ep_in_dp"][1]
    run = os.path.join(workdir, "cli_run")
    assert [row["step"] for row in read_metrics(run)] == [0, 1, 2, 3]
    one = os.path.join(workdir, "cli_one")
    assert main(["train", os.path.join(workdir, "corpus"), *_cli_flags(workdir), "--out", one]) == 0
    assert _curve_error(read_metrics(run)[:3], read_metrics(one)) <= 1e-5
    with open(os.path.join(run, "train.log")) as f:
        lines = f.read().splitlines()
    assert sum(line.startswith("training ") for line in lines) == 2  # the run and its resumption, once each
    assert sum(line.startswith("resuming from step 2") for line in lines) == 1
    assert main(["train", os.path.join(workdir, "corpus"), "--out", os.path.join(workdir, "cli_alone"), "--tp", "2"]) == 2
    assert "launch with torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_train_command_builds_on_the_meta_device(tmp_path):
    """Under torchrun `qwen3next train` builds its model on the meta device (no parameter storage) and
    fills it once it is placed: the same weights as the one-process build, for a preset (seeded) and
    for a checkpoint directory."""
    from qwen3next.distributed.training import place_model
    from qwen3next.train.cli import build_model

    _model(_config(), seed=2).save_pretrained(tmp_path)
    for spec in ("tiny", str(tmp_path)):
        whole, _, _, none = build_model(spec, "byte", 3, None)
        meta, _, _, fill = build_model(spec, "byte", 3, None, meta=True)
        assert none is None and all(p.is_meta for p in meta.parameters())
        placed = place_model(meta, torch.device("cpu"), None, None, fill)
        want = whole.state_dict()
        assert [k for k, t in placed.state_dict().items() if not torch.equal(t, want[k])] == []


def test_batches_are_dealt_out_in_the_same_number_of_calls():
    """Each data-parallel rank takes its rows; a rank whose rows are all of one kind (one document per
    row, or packed) still makes as many forward calls as a rank with both kinds."""
    import types

    import numpy as np

    from qwen3next.distributed.training import shard_batch
    from qwen3next.train.data import Row

    S = 8
    whole = lambda i: Row(np.full(S, i), np.array([0, S]), None)  # noqa: E731
    mixed = lambda i: Row(np.full(S, i), np.array([0, 3, S]), None)  # noqa: E731
    rows = [whole(0), mixed(1), whole(2), whole(3)]
    shares = [shard_batch(rows, types.SimpleNamespace(dp_shard=2, rank=lambda name, r=r: r, cp_slice=lambda x: x))
              for r in range(2)]
    assert [len(b.parts) for b in shares] == [2, 2]
    assert [[int(row[0]) for p in b.parts for row in p.input_ids.view(-1, S)] for b in shares] == [[0, 1], [2, 3]]
    assert all(b.tokens == 4 * S and b.targets == 4 * (S - 1) - 1 for b in shares)


def test_single_process_dims_change_nothing():
    """All dims 1: no process group, no wrapper, the same module back."""
    from qwen3next.distributed import ParallelConfigError, ParallelDims, parallelize

    model = _model(_config())
    dims = ParallelDims()
    assert not dims.enabled and dims.mesh is None
    assert parallelize(model, dims) is model and "forward" not in vars(model)
    with pytest.raises(ParallelConfigError, match="world has 1 processes"):
        ParallelDims(tp=2)
    with pytest.raises(ParallelConfigError, match="integers >= 1"):
        ParallelDims(dp_shard=-1)


def test_plan_counts_every_parameter_once():
    """Under FSDP alone the GPUs' shares add up to the model; tp and ep shrink them as the docstring says."""
    from qwen3next.config import Qwen3NextConfig
    from qwen3next.distributed.plan import Layout, plan
    from qwen3next.model import count_parameters

    config = Qwen3NextConfig.preset("80b-a3b")
    total = count_parameters(config)["total"]
    assert plan(config, Layout(dp_shard=8))["local_parameters"] * 8 == pytest.approx(total, rel=1e-12)
    experts = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    ep8 = plan(config, Layout(ep=8))["local_parameters"]
    assert ep8 == pytest.approx(total - experts + experts / 8, rel=1e-12)
    tp2 = plan(config, Layout(tp=2))
    assert tp2["local_parameters"] < total / 2 + 1e8 and tp2["comm_total"]["tp"] > 0
    # ep inside dp_shard: FSDP shards the rest 8 ways and leaves the experts, which ep splits 4 ways
    in_dp = plan(config, Layout(dp_shard=8, ep=4, ep_in_dp=True))
    assert in_dp["layout"].gpus == 8
    assert in_dp["local_parameters"] == pytest.approx((total - experts) / 8 + experts / 4, rel=1e-12)


def test_inspect_prints_the_plan(capsys):
    from qwen3next.cli import main

    assert main(["inspect", "80b-a3b", "--tp", "2", "--ep", "8", "--dp-shard", "4", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "dp_shard4 x tp2 x ep8 x cp1 = 64 GPUs" in out
    for row in ("parameters (fp32)", "gradients (fp32)", "AdamW m, v (fp32)", "activations", "GDN+MoE", "attention+MoE"):
        assert row in out
    with pytest.raises(SystemExit, match="tp=3 must divide linear_num_key_heads=16"):
        main(["inspect", "80b-a3b", "--tp", "3"])
    assert main(["inspect", "80b-a3b", "--ep", "4", "--dp-shard", "8", "--ep-in-dp"]) == 0
    assert "dp_shard8 x tp1 x ep4 (in dp) x cp1 = 8 GPUs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ep=3 must divide dp_shard=8"):
        main(["inspect", "80b-a3b", "--ep", "3", "--dp-shard", "8", "--ep-in-dp"])
