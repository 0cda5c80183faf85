"""Prefill of 1024 tokens with a tiny model on the CPU: qwen3next against transformers on the same
weights, in one process, runs interleaved. Prints the ratio ours / transformers (lower is better).

    python benchmarks/cpu_forward.py [--tokens 1024] [--repeats 5]
"""

import argparse
import platform
import statistics
import time

import torch
import transformers

from peer import model_pair


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    config, ours, hf = model_pair(args.preset)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))

    def run(model, **kw):
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids, **kw)
        return time.perf_counter() - t

    run(ours), run(hf, use_cache=False)  # warm-up
    times = {"qwen3next": [], "transformers": []}
    for _ in range(args.repeats):
        times["qwen3next"].append(run(ours))
        times["transformers"].append(run(hf, use_cache=False))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"CPU prefill, preset {args.preset}, 1 x {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    print(f"| implementation | median ms | tokens/s |")
    print(f"|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {args.tokens / v:,.0f} |")
    print(f"ratio qwen3next / transformers = {med['qwen3next'] / med['transformers']:.2f}")


if __name__ == "__main__":
    main()
