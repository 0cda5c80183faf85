"""Greedy generation of 64 tokens after a 64-token prompt on the CPU: qwen3next against transformers'
`generate` on the same weights, in one process, runs interleaved. Prints the ratio (lower is better).

    python benchmarks/cpu_generate.py [--prompt 64] [--new 64] [--repeats 5]
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
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    config, ours, hf = model_pair(args.preset)
    ids = torch.randint(0, config.vocab_size, (1, args.prompt))

    def run(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    ours_fn = lambda: ours.generate(ids, max_new_tokens=args.new, eos_token_id=[])
    hf_fn = lambda: hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    _, a = run(ours_fn)
    _, b = run(hf_fn)
    same = torch.equal(a, b)
    times = {"qwen3next": [], "transformers": []}
    for _ in range(args.repeats):
        times["qwen3next"].append(run(ours_fn)[0])
        times["transformers"].append(run(hf_fn)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"CPU greedy generation, preset {args.preset}, prompt {args.prompt} + {args.new} new tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}; identical tokens: {same}")
    print("| implementation | median ms | new tokens/s |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {args.new / v:,.0f} |")
    print(f"ratio qwen3next / transformers = {med['qwen3next'] / med['transformers']:.2f}")


if __name__ == "__main__":
    main()
