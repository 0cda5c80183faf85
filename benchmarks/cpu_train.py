"""Training throughput of the tiny preset on the CPU: our trainer against a plain training loop over
transformers' model, on the same token rows, in one process, timed in interleaved rounds.

Both start from the same weights and take AdamW steps (fused, same hyper-parameters) with gradient
clipping and the load-balancing loss on the same rows of the Python standard library's source packed
into rows of `--seq-len` bytes:
  * qwen3next trainer: `Trainer.train_step`, the path `qwen3next train` runs: documents are kept apart
    (rows that hold one document's text as a plain batch, the rest packed with cu_seqlens), plus
    routing statistics;
  * qwen3next model, plain loop: our model in the same loop as transformers' (rows as [B, T], no
    document boundaries), to separate the model from the trainer;
  * transformers, plain loop: `Qwen3NextForCausalLM(input_ids [B, T], labels, output_router_logits=True)`;
    it cannot keep packed documents apart on the CPU (that needs flash-attention varlen), so it does
    a little less work than our trainer: documents attend across their boundaries.
Prints tokens/s (median over rounds of wall time) and tokens per second of this process's CPU time
(steadier than wall time on a machine shared with other work), each with its ratio to transformers
(higher is better).

    python benchmarks/cpu_train.py [--steps 3] [--rounds 5] [--seq-len 256] [--batch-size 8] [--threads N]
"""

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import transformers

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next.train import ByteTokenizer, Trainer, TrainSettings
from qwen3next.train.cli import stdlib_source
from qwen3next.train.data import make_batch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads [torch's default]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Qwen3NextConfig.preset("tiny")
    settings = TrainSettings(steps=10**6, seq_len=args.seq_len, batch_size=args.batch_size, warmup=0,
                             eval_every=0, save_every=0)
    run_dir = tempfile.mkdtemp(prefix="cpu_train_")
    trainer = Trainer(Qwen3NextForCausalLM(config), ByteTokenizer(), stdlib_source(), settings, run_dir)
    rows = trainer.train_data.rows()
    groups = [[next(rows) for _ in range(args.batch_size)] for _ in range(args.steps)]
    batches = [(make_batch(g), torch.from_numpy(np.stack([r.ids for r in g]))) for g in groups]
    tokens_per_round = args.steps * args.batch_size * args.seq_len
    segments = sum(len(r.cu_seqlens) - 1 for g in groups for r in g)
    single = sum(len(r.cu_seqlens) == 2 for g in groups for r in g)

    d = config.to_dict()
    d.pop("architectures"), d.pop("model_type")
    hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**d)).train()
    hf.load_state_dict(trainer.model.state_dict(), strict=True)
    plain = Qwen3NextForCausalLM(config).train()
    plain.load_state_dict(trainer.model.state_dict(), strict=True)

    def plain_loop(model, hf_style: bool):
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                weight_decay=settings.weight_decay, fused=True)

        def step(batch):
            rows = batch[1]
            kwargs = {"output_router_logits": True} if hf_style else {}
            model(rows, labels=rows, **kwargs).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    contenders = {
        "qwen3next trainer (packed, documents kept apart)": lambda b: trainer.train_step([b[0]]),
        "qwen3next model, plain loop": plain_loop(plain, False),
        "transformers, plain loop": plain_loop(hf, True),
    }
    for step in contenders.values():  # warm-up
        step(batches[0])
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            t, c = time.perf_counter(), time.process_time()
            for b in batches:
                step(b)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    tok_s = {name: tokens_per_round / statistics.median(v) for name, v in wall.items()}
    tok_cpu_s = {name: tokens_per_round / statistics.median(v) for name, v in cpu.items()}
    reference, reference_cpu = tok_s["transformers, plain loop"], tok_cpu_s["transformers, plain loop"]
    print(f"{datetime.date.today()}; CPU training, preset tiny ({trainer.model.num_parameters() / 1e6:.2f}M parameters), "
          f"{args.batch_size} x {args.seq_len} tokens per step, {args.steps} steps x {args.rounds} interleaved rounds; "
          f"{torch.get_num_threads()} threads; {cpu_name()} ({os.cpu_count()} cores); torch {torch.__version__}, "
          f"transformers {transformers.__version__} (experts: {hf.config._experts_implementation or 'default'}, "
          f"attention: {hf.config._attn_implementation}); the rows hold {segments} document segments, "
          f"{single} of {args.steps * args.batch_size} rows a single one")
    print("| implementation | tokens/s (median) | min .. max | vs transformers | tokens per CPU-second | vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, v in wall.items():
        print(f"| {name} | {tok_s[name]:,.0f} | {tokens_per_round / max(v):,.0f} .. {tokens_per_round / min(v):,.0f} "
              f"| {tok_s[name] / reference:.2f}x | {tok_cpu_s[name]:,.0f} | {tok_cpu_s[name] / reference_cpu:.2f}x |")


if __name__ == "__main__":
    main()
