"""Host cost of issuing the model's eager forward (and forward+backward) through the Triton backend, without a
GPU: Triton's interpreter with every kernel launch stubbed out, so what is timed is our Python around the
launches (checks, allocations, grids, autograd nodes) and the torch ops between them, not the kernels nor
Triton's own launcher. Compare commits, don't quote: a GPU host is faster, and Triton's launcher adds its own
cost per launch there.

    python benchmarks/host_cost.py [--config tiny] [--tokens 64] [--reps 100] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["QWEN3NEXT_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from timing import host_ms, host_profile  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=100, help="timed calls (median)")
    parser.add_argument("--profile", action="store_true", help="then list where the forward's host time goes")
    args = parser.parse_args()
    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *a, **kw: None)  # every launch: nothing
    torch.manual_seed(0)
    config = Qwen3NextConfig.preset(args.config)
    model = Qwen3NextForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))

    def forward():
        with torch.no_grad():
            model.model(ids)

    def forward_backward():
        model(ids, labels=ids).loss.backward()

    print(f"{args.config}, 1 x {args.tokens} tokens, torch {torch.__version__}, launches stubbed")
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        print(f"{name}: {host_ms(fn, reps=args.reps + 3, warm=3):.2f} ms to issue (median of {args.reps} calls)")
    if args.profile:
        host_profile(forward, "forward", print)


if __name__ == "__main__":
    main()
