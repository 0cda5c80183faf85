"""How far bf16 logits move from fp32, for our model and for transformers' on the same weights.

The GPU end-to-end run found our bf16 logits 0.19 (relative L2) from transformers' bf16 logits while the
two agree to 2e-7 in fp32. This measures, per model, the distance of its bf16 logits from the fp32 ones
(same weights, same tokens), with the sparse MoE and with dense MLPs in every layer: if ours is no
farther from fp32 than transformers' is, the gap between the two bf16 runs is bf16 rounding amplified by
the model (router choices that flip), not an error in either.

    OMP_NUM_THREADS=1 python benchmarks/bf16_drift.py [--tokens 512] [--device cpu]
"""

import argparse
import copy

import torch

from peer import model_pair


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    shape = dict(hidden_size=256, num_hidden_layers=4)
    variants = {"sparse MoE (64 experts, top-8)": dict(num_experts=64, num_experts_per_tok=8),
                "dense MLP in every layer": dict(mlp_only_layers=[0, 1, 2, 3])}
    print(f"tiny preset with hidden 256, 4 layers (3 Gated DeltaNet + 1 attention), 1 x {args.tokens} tokens, "
          f"{args.device}, torch {torch.__version__}")
    print("| FFN | fp32: ours vs transformers | bf16 ours vs fp32 | bf16 transformers vs fp32 | bf16 ours vs bf16 transformers |")
    print("|---|---|---|---|---|")
    for name, kw in variants.items():
        config, ours, theirs = model_pair("tiny", **shape, **kw)
        ours, theirs = ours.to(args.device), theirs.to(args.device)
        ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
        ids = ids.to(args.device)
        with torch.no_grad():
            fp32, theirs32 = ours(ids).logits, theirs(ids).logits
            ours16 = copy.deepcopy(ours).to(torch.bfloat16)(ids).logits
            theirs16 = copy.deepcopy(theirs).to(torch.bfloat16)(ids).logits
        print(f"| {name} | {rel(theirs32, fp32):.1e} | {rel(ours16, fp32):.2e} | {rel(theirs16, fp32):.2e} | "
              f"{rel(ours16, theirs16):.2e} |", flush=True)


if __name__ == "__main__":
    main()
