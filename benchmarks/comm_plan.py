"""Which layout for training Qwen3-Next-80B-A3B? Per-GPU memory and communication per step of three of
our layouts next to Megatron's recipe for this model (TP1 / PP4 / EP8), then the candidates on 16 and
8 H100s (80 GB). No GPU needed: the numbers come from the config and the formulas in
`qwen3next/distributed/plan.py` (Megatron's below).

Megatron TP1/PP4/EP8 (32 GPUs = PP4 x DP8; experts sharded over 8 data-parallel ranks, so expert-DP = 1):
  each pipeline stage holds 12 layers (and the embedding or the LM head); bf16 weights (2 B), fp32
  main gradients (4 B), distributed optimizer: fp32 master + AdamW m, v (12 B) sharded over DP for
  the dense part, unsharded for the experts (expert-DP 1); the first stage keeps PP = 4 micro-batches
  of activations in flight (1F1B), each as with per-layer recomputation (the layer inputs, plus one
  layer's full activations during its backward). Communication per GPU: EP all-to-all of its own tokens' pairs
  (forward and backward, out and back: 4 x 2 t k D (ep - 1) / ep per MoE layer), pipeline sends of
  t D bf16 activations (and their gradients) per micro-batch, dense gradient reduce-scatter (fp32)
  and weight all-gather (bf16) over DP8.

Usage: python benchmarks/comm_plan.py [--seq-len 4096]
"""

from __future__ import annotations

import argparse

from qwen3next.config import Qwen3NextConfig
from qwen3next.distributed.plan import Layout, _activations, _layer_params, plan

GiB = 2**30


def megatron_tp1_pp4_ep8(config: Qwen3NextConfig, seq_len: int) -> dict:
    c, ep, pp, dp = config, 8, 4, 8
    layers = range(c.num_hidden_layers // pp)  # one stage's layers (the pattern repeats every 4)
    experts = c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size
    dense = sum(_layer_params(c, i, Layout())[0] - experts for i in layers) + c.vocab_size * c.hidden_size
    expert_local = len(layers) * experts / ep
    t = seq_len
    memory = {
        "weights (bf16)": 2 * (dense + expert_local),
        "gradients (fp32)": 4 * (dense + expert_local),
        "master + AdamW (fp32)": 12 * (dense / dp + expert_local),
        # Megatron's EP spans data-parallel ranks: a GPU processes t k pairs of its own tokens (not t k / ep)
        "activations (4 in flight)": pp * len(layers) * 2 * t * c.hidden_size
                                     + max(_activations(c, i, Layout(), t) for i in layers),
    }
    a2a = 4 * 2 * t * c.num_experts_per_tok * c.hidden_size * (ep - 1) / ep
    comm = {"ep": len(layers) * a2a * pp, "pp": 2 * 2 * t * c.hidden_size * pp,
            "dp": (4 + 2) * dense * (dp - 1) / dp}
    return {"memory": memory, "comm": comm, "distinct_tokens": dp * pp * t, "gpus": pp * dp}


def ours(config, layout):
    p = plan(config, layout)
    distinct = layout.dp_shard * layout.batch * layout.seq_len
    return {"memory": p["memory"], "comm": p["comm_total"], "distinct_tokens": distinct, "gpus": layout.gpus}


def row(name, r, states):
    mem = sum(r["memory"].values()) / GiB
    comm = sum(r["comm"].values()) / GiB
    fits = "yes" if mem <= 76 else "no"
    return (f"| {name} | {r['gpus']} | {states} | {mem:.1f} | {fits} | {comm:.1f} | "
            f"{comm / (r['distinct_tokens'] / 1e3):.3f} | {r['distinct_tokens']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    config = Qwen3NextConfig.preset("80b-a3b")
    S = args.seq_len
    print(f"Qwen3-Next-80B-A3B, {S}-token sequences, one sequence per data-parallel rank and micro-batch, "
          "activation checkpointing per layer\n")
    print("| layout | GPUs | states | memory/GPU GiB | fits 80 GB | comm/GPU/step GiB | GiB per 1k distinct tokens | distinct tokens/step |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("Megatron TP1/PP4/EP8 (DP8)", megatron_tp1_pp4_ep8(config, S), "bf16 w, fp32 opt"))
    for lay in (Layout(dp_shard=32), Layout(dp_shard=4, ep=8), Layout(dp_shard=2, tp=2, ep=8),
                Layout(dp_shard=32, ep=32, ep_in_dp=True), Layout(dp_shard=32, ep=8, ep_in_dp=True),
                Layout(dp_shard=16), Layout(dp_shard=2, ep=8), Layout(dp_shard=8), Layout(ep=8)):
            print(row(str(lay), ours(config, Layout(**{**vars(lay), "seq_len": S, "recompute": True})), "fp32"))
    for lay in (Layout(dp_shard=16), Layout(dp_shard=2, ep=8), Layout(tp=2, ep=8),
                Layout(dp_shard=16, ep=16, ep_in_dp=True), Layout(dp_shard=8), Layout(ep=8),
                Layout(dp_shard=8, ep=8, ep_in_dp=True)):
        print(row(str(lay), ours(config, Layout(**{**vars(lay), "seq_len": S, "recompute": True, "states": "bf16"})),
                  "bf16"))


if __name__ == "__main__":
    main()
