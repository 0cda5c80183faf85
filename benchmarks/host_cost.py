"""Host cost of issuing the model's eager forward (and forward+backward) through the Triton backend, without a
GPU: Triton's interpreter with every kernel launch stubbed out, so what is timed is our Python around the
launches (checks, allocations, grids, autograd nodes) and the torch ops between them, not the kernels nor
Triton's own launcher. Compare commits, don't quote: a GPU host is faster, and Triton's launcher adds its own
cost per launch there.

    python benchmarks/host_cost.py [--config tiny] [--tokens 64] [--rounds 15] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["QWEN3NEXT_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of 10 calls each (median)")
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
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(10):
                fn()
            times.append((time.perf_counter() - start) / 10 * 1e3)
        print(f"{name}: {statistics.median(times):.2f} ms to issue (median of {args.rounds} rounds of 10)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            forward()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())


if __name__ == "__main__":
    main()
