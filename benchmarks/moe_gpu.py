"""Sparse-MoE block on the GPU: ours (Triton) against transformers' `Qwen3NextSparseMoeBlock`, one run.

1. Checks: bf16 routing and experts (outputs and gradients of x, gate_up, down, routing weights, logits)
   against the fp32 references `route_ref` / `moe_experts_ref` on the same (bf16-rounded) values,
   by ||ours - ref|| / ||ref||, on the grouped path (8192, 300 and 16 tokens) and the decode path (1, 3 tokens).
2. Ceilings measured here: dense bf16 matmul rate and device-to-device copy bandwidth.
3. Times (median of CUDA-event timings, in interleaved rounds) of the whole block (router, routed experts,
   gated shared expert) for ours and transformers' experts implementations eager / grouped_mm / batched_mm,
   at 1, 64, 1024, 8192 tokens, forward (no grad) and forward+backward, with the floor beside each:
   floor = max(FLOPs / matmul rate, bytes / copy bandwidth), bytes = the expected distinct experts'
   weights (uniform routing) + shared expert + router + activations; forward+backward reads the weights
   twice and writes every weight gradient once, and does 3x the FLOPs.
   "ours torch" is the torch backend's sort-based `_grouped_mm` path run on the GPU, for comparison.
4. Extras: CUDA-graph replay of our 1-token forward; the host time of each stage of our 8192-token
   forward against its GPU time (graph replay), where the GPU waits, and the Python functions that take the
   host's time (cProfile) in the forward and the forward+backward; a few tile configurations of our
   grouped kernels at 8192 tokens; a kernel-time breakdown of ours at 8192 tokens (torch profiler).

    PYTHONUNBUFFERED=1 python benchmarks/moe_gpu.py [--out DIR] [--small]
--small runs tiny shapes (also on the CPU under TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

from qwen3next import ops
from qwen3next.ops.moe import moe_experts_grouped, moe_experts_ref, route_ref
from timing import capture_graph, gpu_idle, host_ms, host_profile, time_once

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timer(fn, device, budget_s=1.0, max_reps=30) -> float:
    """Median milliseconds of fn() after two warm-up calls; stops after max_reps or budget_s."""
    for _ in range(2):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        times.append(time_once(fn, device))
    return statistics.median(times)


def make_block(shape, device, dtype):
    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    D, E, k, I, Is = shape
    config = transformers.Qwen3NextConfig(hidden_size=D, num_experts=E, num_experts_per_tok=k,
                                          moe_intermediate_size=I, shared_expert_intermediate_size=Is,
                                          norm_topk_prob=True, hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    block = Qwen3NextSparseMoeBlock(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, p.shape[-1] ** -0.5)  # fan-in scale; never zeros (router ties, unwritten outputs)
    return block, config


def our_block(block, experts_fn, shared_first=False):
    """The block's computation with our ops, in the model's SparseMoE order (transformers' shared-expert MLP;
    shared_first: its matmuls before the routing, the order before session 9)."""
    k, norm = block.gate.top_k, block.gate.norm_topk_prob

    def run(x):
        flat = x.view(-1, x.shape[-1])
        shared = block.shared_expert(flat) if shared_first else None
        weights, ids = ops.route(F.linear(flat, block.gate.weight), k, norm)
        routed = experts_fn(flat, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
        shared = block.shared_expert(flat) if shared is None else shared
        return ops.sigmoid_gate(shared, block.shared_expert_gate(flat), routed).view_as(x)

    return run


def check(shape, device, log):
    """bf16 ours vs fp32 references on the same rounded values."""
    D, E, k, I, _ = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    gate_up32, down32 = rnd(E, 2 * I, D, scale=D**-0.5), rnd(E, D, I, scale=I**-0.5)
    gate_up, down = gate_up32.bfloat16(), down32.bfloat16()
    gate_up32, down32 = gate_up.float(), down.float()
    worst = 0.0
    for n in (8192, 300, 16, 3, 1):  # 8192: 128-row tiles (short tails); 16: most of the 512 experts get no rows
        logits = rnd(n, E, scale=2.0).bfloat16()
        x = rnd(n, D).bfloat16()
        dout = rnd(n, D).bfloat16()
        # routing, judged on our own choice of experts (bf16 logits tie often; any tie order is right):
        # the chosen set must be a top-k of the fp32 softmax, and weights and logit gradients must match
        # the reference formula (softmax, gather, renormalise) on that set
        expert_grad = rnd(n, E)
        lg = logits.clone().requires_grad_(True)
        w, ids = ops.route(lg, k, True)
        (dlg,) = torch.autograd.grad(w, lg, expert_grad.gather(1, ids).bfloat16())
        lg32 = logits.float().requires_grad_(True)
        p32 = F.softmax(lg32, dim=-1)
        chosen = p32.gather(1, ids)
        w_ref = chosen / chosen.sum(1, keepdim=True)
        (dlg32,) = torch.autograd.grad(w_ref, lg32, expert_grad.gather(1, ids))
        top_k_ok = (chosen.min(1).values >= p32.scatter(1, ids, -1.0).max(1).values).float().mean().item() \
            if k < E else 1.0
        errs = {"route w": rel(w, w_ref), "route dlogits": rel(dlg, dlg32), "route top-k valid": 1 - top_k_ok}
        w32, ids32 = route_ref(logits.float(), k, True)
        # experts on the reference's routing
        weights32 = w32.detach()
        weights = weights32.bfloat16()
        if n > 3:
            leaves32 = [t.float().requires_grad_(True) for t in (x, gate_up32, down32, weights)]
            out32 = moe_experts_ref(*leaves32, ids32)
            want = (out32, *torch.autograd.grad(out32, leaves32, dout.float()))
            for label, fn in (("triton", ops.moe_experts), ("torch grouped", moe_experts_grouped)):
                try:
                    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
                    out = fn(*leaves, ids32)
                    got = (out, *torch.autograd.grad(out, leaves, dout))
                except Exception as exc:  # report and go on to the timings
                    log(f"check {label} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    errs[label] = float("inf")
                    continue
                for name, a, b in zip(("out", "dx", "dgate_up", "ddown", "dweights"), got, want):
                    errs[f"{label} {name}"] = rel(a, b)
                    if a.isnan().any():
                        errs[f"{label} {name}"] = float("inf")
        else:
            with torch.no_grad():
                out = ops.moe_experts(x, gate_up, down, weights, ids32)
                errs["decode out"] = rel(out, moe_experts_ref(x.float(), gate_up32, down32, weights32, ids32))
        log(f"check N={n}: " + ", ".join(f"{a} {b:.1e}" for a, b in errs.items()))
        worst = max(worst, *errs.values())
    log(f"check: worst relative error {worst:.2e} ({'PASS' if worst < 1e-2 else 'FAIL'} at 1e-2)")
    return worst


def ceilings(device, log):
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timer(lambda: a @ b, device, budget_s=0.5)
    flops = 2 * n**3 / ms / 1e9
    src = torch.randn(512 * 2**20, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), device, budget_s=0.5)
    bw = 2 * src.numel() * 2 / ms / 1e9
    log(f"ceilings: bf16 matmul {flops:.0f} TFLOP/s, copy {bw:.2f} TB/s (read + write)")
    return flops * 1e12, bw * 1e12


def floor_ms(n, shape, peak, bw, backward):
    D, E, k, I, Is = shape
    used = E * (1 - (1 - k / E) ** n)
    expert_bytes, dense_bytes = 3 * D * I * 2, (3 * D * Is + D * E + D) * 2
    flops = 2 * n * (k * 3 * D * I + 3 * D * Is + D * E + D)
    weights_read = used * expert_bytes + dense_bytes
    act = n * D * 2 * 2
    if backward:
        flops, bytes_ = 3 * flops, 2 * weights_read + E * expert_bytes + dense_bytes + 3 * act
    else:
        bytes_ = weights_read + act
    return max(flops / peak, bytes_ / bw) * 1e3


ROUNDS = 3  # interleaved timing rounds per table cell


def bench(shape, device, tokens, peak, bw, log):
    block, config = make_block(shape, device, torch.bfloat16)
    ours = our_block(block, ops.moe_experts)
    ours_torch = our_block(block, moe_experts_grouped)

    def theirs(impl):
        def run(x):
            config._experts_implementation = impl
            return block(x)
        return run

    impls = [("ours", ours), ("ours torch", ours_torch)] + [(f"hf {i}", theirs(i)) for i in HF_IMPLS]
    params = list(block.parameters())
    rows = []
    for n in tokens:
        x = torch.randn(1, n, shape[0], device=device, dtype=torch.bfloat16)
        dout = torch.randn_like(x)
        for backward in (False, True):
            steps, cells = {}, {}
            for label, fn in impls:
                if label == "hf eager" and n >= 1024 and backward:
                    cells[label] = None  # seconds per call: left out to save device time
                    continue
                if backward:
                    xg = x.clone().requires_grad_(True)

                    def step(fn=fn, xg=xg):
                        fn(xg).backward(dout)
                        for p in params + [xg]:
                            p.grad = None
                else:
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(x)
                steps[label] = step
            # interleaved rounds, the median of each implementation's round medians: a slow peer's calls (up
            # to 185 ms each) may leave the GPU (clocks, allocator) in another state for what runs right after
            # them (session 9: ours read 0.3 ms slower there than minutes later), so no one always follows them
            samples = {label: [] for label in steps}
            for rnd in range(ROUNDS):
                for label, step in steps.items():
                    slow = label == "hf eager" and n > 1
                    if isinstance(cells.get(label), str) or (slow and rnd > 0):
                        continue
                    try:
                        samples[label].append(timer(step, device, budget_s=0.2 if slow else 0.25,
                                                    max_reps=3 if slow else 10))
                    except torch.cuda.OutOfMemoryError:
                        cells[label] = "OOM"
                    except Exception as exc:  # keep the run going: one failing implementation is a result too
                        cells[label] = "error"
                        log(f"  {label} at {n} tokens failed: {type(exc).__name__}: {str(exc)[:300]}")
                    torch.cuda.empty_cache() if device.type == "cuda" else None
            for label in steps:
                if label not in cells:
                    cells[label] = statistics.median(samples[label])
            cells = {label: cells[label] for label, _ in impls}
            floor = floor_ms(n, shape, peak, bw, backward)
            rows.append((n, "fwd+bwd" if backward else "fwd", cells, floor))
            log(f"  {n} {'fwd+bwd' if backward else 'fwd'}: " + ", ".join(
                f"{a} {b if isinstance(b, str) or b is None else f'{b:.3f}'}" for a, b in cells.items())
                + f"; floor {floor:.3f} ms")
    labels = [label for label, _ in impls]
    table = ["| tokens | pass | " + " | ".join(f"{l} (ms)" for l in labels) + " | floor (ms) | ours / floor |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    fmt = lambda v: "n/a" if v is None else v if isinstance(v, str) else f"{v:.3f}"  # noqa: E731
    for n, p, cells, floor in rows:
        ours_ms = cells["ours"]
        table.append(f"| {n} | {p} | " + " | ".join(fmt(cells[l]) for l in labels)
                     + f" | {floor:.3f} | {ours_ms / floor:.1f}x |")
    return block, config, "\n".join(table)


def graph_replay(block, config, shape, device, log):
    """1-token forward captured in a CUDA graph (what a generation loop replays): GPU time, no launch cost."""
    x = torch.randn(1, 1, shape[0], device=device, dtype=torch.bfloat16)

    def theirs(impl):
        def run(x):
            config._experts_implementation = impl
            return block(x)
        return run

    for label, fn in (("ours", our_block(block, ops.moe_experts)), ("hf batched_mm", theirs("batched_mm")),
                      ("hf grouped_mm", theirs("grouped_mm"))):
        try:
            with torch.no_grad():
                graph = capture_graph(lambda fn=fn: fn(x))
            log(f"1 token fwd, CUDA graph replay: {label} {timer(graph.replay, device):.4f} ms")
        except Exception as exc:
            log(f"1 token fwd, CUDA graph: {label} failed: {type(exc).__name__}: {str(exc)[:200]}")


def sweep(shape, device, log, n=8192):
    """Tile configurations of our grouped kernels at 8192 tokens (TMA weights or pointers), the expert sort's
    block and warps, and torch._grouped_mm for the same GEMMs."""
    from triton.testing import do_bench

    from qwen3next.ops.moe import sort_by_expert
    from qwen3next.ops.triton import moe

    D, E, k, I, _ = shape
    M = n * k
    x = torch.randn(n, D, device=device, dtype=torch.bfloat16)
    gate_up = torch.randn(E, 2 * I, D, device=device, dtype=torch.bfloat16) * D**-0.5
    down = torch.randn(E, D, I, device=device, dtype=torch.bfloat16) * I**-0.5
    weights, ids = ops.route(torch.randn(n, E, device=device, dtype=torch.bfloat16), k, True)
    w_flat = weights.reshape(-1)
    order, ends = moe._sort_by_expert(ids, E)
    act, h, rows = x.new_empty(M, I), x.new_empty(M, 2 * I), x.new_empty(M, D)
    gu, dn = gate_up.stride(), down.stride()
    as_run = moe.SORT_BLOCK
    for block in (1024, 2048, 4096, 8192):
        moe.SORT_BLOCK = block
        log(f"expert sort, {M} pairs, blocks of {block}: {do_bench(lambda: moe._sort_by_expert(ids, E)):.3f} ms GPU "
            "(back-to-back launches)")
    moe.SORT_BLOCK = as_run
    log(f"torch.sort path {do_bench(lambda: sort_by_expert(ids, E)):.3f} ms GPU (back-to-back)")
    log(f"k-sum torch {timer(lambda: rows.view(n, k, D).sum(1), device):.3f} ms, "
        f"ours {timer(lambda: moe._slot_sum(rows, k), device):.3f} ms")
    cfg = lambda bm, bn, bk, w, s, tails=0, desc=True: dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,  # noqa: E731
                                                             num_warps=w, num_stages=s, SHORT_TAILS=tails, B_DESC=desc)
    # 256-row tiles (an expert's 160 mean rows in one tile) measured slower for all four GEMMs (BENCHMARKS.md,
    # session 13) and are no longer swept
    for c in [cfg(128, 128, 64, 8, 4, 2), cfg(128, 128, 64, 8, 4, 2, False), cfg(64, 128, 64, 4, 4)]:
        try:
            t = timer(lambda: moe._grouped_gemm(x, gate_up, order, ends, I, D, gu, act, top_k=k, gather_a=True,
                                                swiglu_up_offset=I * gu[1], config=c), device)
            th = timer(lambda: moe._grouped_gemm(x, gate_up, order, ends, I, D, gu, act, top_k=k, gather_a=True,
                                                 swiglu_up_offset=I * gu[1], h=h, config=c), device)
            log(f"gate_up {c}: {t:.3f} ms (+h {th:.3f}), {2 * M * D * 2 * I / t / 1e9:.0f} TFLOP/s")
        except Exception as exc:
            log(f"gate_up {c}: {type(exc).__name__}: {str(exc)[:300]}")
    for c in [cfg(128, 256, 64, 8, 4, 1), cfg(128, 256, 64, 8, 4, 1, False), cfg(128, 128, 64, 8, 4, 1)]:
        try:
            t_dn = timer(lambda: moe._grouped_gemm(act, down, order, ends, D, I, dn, rows, top_k=k, scatter=True,
                                                   scale=w_flat, config=c), device)
            t_dx = timer(lambda: moe._grouped_gemm(h, gate_up, order, ends, D, 2 * I, (gu[0], gu[2], gu[1]), rows,
                                                   top_k=k, scatter=True, config=c), device)
            t_da = timer(lambda: moe._grouped_gemm(x, down, order, ends, I, D, (dn[0], dn[2], dn[1]), act, top_k=k,
                                                   gather_a=True, config=c), device)
            log(f"gemm {c}: down {t_dn:.3f}, dx {t_dx:.3f}, dact {t_da:.3f} ms")
        except Exception as exc:
            log(f"gemm {c}: {type(exc).__name__}: {str(exc)[:300]}")
    # tile efficiency: routings (8 slots a token) that give every expert exactly 128 rows (full tiles, no
    # tails) or exactly 160 (one full tile and a quarter-height tail each), against the random routing above
    for rows_per in (128, 160):
        k8, m_e = 8, E * rows_per
        ids_even = (torch.arange(m_e, device=device) % E).view(m_e // k8, k8)
        o_e, e_e = moe._sort_by_expert(ids_even, E)
        x_e = x.new_empty(m_e // k8, D).normal_()
        act_e, rows_e, ones = x.new_empty(m_e, I), x.new_empty(m_e, D), torch.ones(m_e, device=device)
        t_gu = timer(lambda: moe._grouped_gemm(x_e, gate_up, o_e, e_e, I, D, gu, act_e, top_k=k8, gather_a=True,
                                               swiglu_up_offset=I * gu[1]), device)
        t_dn = timer(lambda: moe._grouped_gemm(act_e, down, o_e, e_e, D, I, dn, rows_e, top_k=k8, scatter=True,
                                               scale=ones), device)
        log(f"tiles, {rows_per} rows per expert ({m_e} rows): gate/up {t_gu:.3f} ms "
            f"({2 * m_e * D * 2 * I / t_gu / 1e9:.0f} TFLOP/s), down {t_dn:.3f} ms "
            f"({2 * m_e * D * I / t_dn / 1e9:.0f} TFLOP/s)")
    dgu, ddn = torch.empty_like(gate_up), torch.empty_like(down)
    wc = lambda bn, bk, br, w, s: dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=w, num_stages=s)  # noqa
    for c in [wc(128, 128, 32, 4, 3), wc(128, 128, 32, 4, 4), wc(64, 256, 32, 4, 3)]:
        t1 = timer(lambda: moe._grouped_wgrad(h, x, order, ends, dgu, top_k=k, gather_a=True, config=c), device)
        t2 = timer(lambda: moe._grouped_wgrad(x, act, order, ends, ddn, top_k=k, gather_g=True, config=c), device)
        log(f"wgrad {c}: dgate_up {t1:.3f}, ddown {t2:.3f} ms")
    if hasattr(torch, "_grouped_mm"):
        try:
            token = order // k
            xg = x[token]
            log(f"torch: gather x rows {timer(lambda: x[token], device):.3f}, "
                f"gate_up {timer(lambda: torch._grouped_mm(xg, gate_up.transpose(1, 2), offs=ends), device):.3f}, "
                f"down {timer(lambda: torch._grouped_mm(act, down.transpose(1, 2), offs=ends), device):.3f}, "
                f"dx {timer(lambda: torch._grouped_mm(h, gate_up, offs=ends), device):.3f}, "
                f"dgate_up {timer(lambda: torch._grouped_mm(h.t(), xg, offs=ends), device):.3f}, "
                f"ddown {timer(lambda: torch._grouped_mm(rows.t(), act, offs=ends), device):.3f} ms")
            dgu_run = timer(lambda: moe._weight_grad(h, x, order, ends, gate_up, top_k=k, gather_a=True), device)
            ddn_run = timer(lambda: moe._weight_grad(x, act, order, ends, down, top_k=k, gather_g=True), device)
            log(f"weight gradients as run (gathers included): dgate_up {dgu_run:.3f}, ddown {ddn_run:.3f} ms")
        except Exception as exc:
            log(f"torch._grouped_mm sweep failed: {type(exc).__name__}: {str(exc)[:300]}")


def profile(block, shape, device, log, out_dir):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn = our_block(block, ops.moe_experts)
    x = torch.randn(1, 8192, shape[0], device=device, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(x)
    for _ in range(2):
        fn(x).backward(dout)
        for p in list(block.parameters()) + [x]:
            p.grad = None  # else the first profiled backward adds into them: 3 GB of accumulation kernels
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn(x).backward(dout)
            for p in list(block.parameters()) + [x]:
                p.grad = None
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    log("profile of ours, 8192 tokens fwd+bwd, 3 iterations:\n" + table)
    for p in list(block.parameters()) + [x]:
        p.grad = None


def host_costs(block, shape, device, log, n=8192):
    """Where the eager forward's time goes at n tokens: host milliseconds to issue each stage (the queue is
    drained before each call, so nothing waits), the whole forward's GPU time replayed from a CUDA graph, the
    eager forward and fwd+bwd under the alternatives of the block's order and expert sort, and where the GPU
    waits for the host in them (`timing.gpu_idle`)."""
    from qwen3next.ops.triton import moe

    D, E, k, I, _ = shape
    x = torch.randn(1, n, D, device=device, dtype=torch.bfloat16)
    flat = x.view(n, D)
    gu, dn = block.experts.gate_up_proj, block.experts.down_proj
    fwd = our_block(block, ops.moe_experts)
    with torch.no_grad():
        shared = block.shared_expert(flat)
        logits = F.linear(flat, block.gate.weight)
        weights, ids = ops.route(logits, k, True)
        order, ends = moe._sort_by_expert(ids, E)
        routed = ops.moe_experts(flat, gu, dn, weights, ids)
        act, tiny = flat.new_empty(n * k, I), torch.zeros(8, device=device)
        stages = {
            "tiny torch op": lambda: tiny.add_(1),
            "shared expert": lambda: block.shared_expert(flat),
            "router linear": lambda: F.linear(flat, block.gate.weight),
            "route": lambda: ops.route(logits, k, True),
            "sort": lambda: moe._sort_by_expert(ids, E),
            "gate/up GEMM launch": lambda: moe._grouped_gemm(flat, gu, order, ends, I, D, gu.stride(), act, top_k=k,
                                                             gather_a=True, swiglu_up_offset=I * gu.stride(1)),
            "routed experts": lambda: ops.moe_experts(flat, gu, dn, weights, ids),
            "shared gate + combine": lambda: ops.sigmoid_gate(shared, block.shared_expert_gate(flat), routed),
            "whole forward": lambda: fwd(x),
        }
        for name, fn in stages.items():
            log(f"host: {name}: {host_ms(fn):.3f} ms to issue")
        host_profile(lambda: fwd(x), f"{n} tokens fwd", log)
        graph = capture_graph(lambda: fwd(x))
        log(f"{n} tokens fwd: eager {timer(lambda: fwd(x), device):.3f} ms, "
            f"CUDA graph replay {timer(graph.replay, device):.3f} ms (GPU time)")
    xg, dout = x.clone().requires_grad_(True), torch.randn_like(x)
    params = list(block.parameters()) + [xg]
    as_run_step = None
    for label, variant in (("as run", fwd), ("shared expert first", our_block(block, ops.moe_experts, True))):
        with torch.no_grad():
            t_fwd = timer(lambda: variant(x), device)

        def step(variant=variant):
            variant(xg).backward(dout)
            for p in params:
                p.grad = None

        as_run_step = as_run_step or step

        log(f"{n} tokens, {label}: fwd {t_fwd:.3f} ms, fwd+bwd {timer(step, device):.3f} ms")
    log(f"host: {n} tokens fwd+bwd: {host_ms(as_run_step):.3f} ms to issue")
    try:  # the same work's GPU time: gradients by autograd.grad (no .grad state), replayed from a graph
        graph = capture_graph(lambda: torch.autograd.grad(fwd(xg), params, dout))
        log(f"{n} tokens fwd+bwd: CUDA graph replay {timer(graph.replay, device):.3f} ms (GPU time)")
    except Exception as exc:
        log(f"{n} tokens fwd+bwd: no CUDA graph ({type(exc).__name__}: {str(exc)[:200]})")
    with torch.no_grad():
        gpu_idle(lambda: fwd(x), device, f"{n} tokens fwd", log)
    gpu_idle(as_run_step, device, f"{n} tokens fwd+bwd", log)
    host_profile(as_run_step, f"{n} tokens fwd+bwd", log)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--small", action="store_true", help="tiny shapes: check the script, not the speed")
    parser.add_argument("--skip", nargs="*", default=[], choices=["bench", "sweep", "profile", "check", "host"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (64, 16, 4, 32, 32) if args.small else (2048, 512, 10, 512, 512)  # D, E, k, I, shared I
    tokens = (1, 5, 40) if args.small else (1, 64, 1024, 8192)
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "moe_gpu.log"), "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    import transformers
    import triton
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    log(f"{datetime.date.today()} {name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}; D, E, k, I, shared I = {shape}, bf16")
    torch.manual_seed(0)
    if "check" not in args.skip:
        check(shape, device, log)
    peak, bw = ceilings(device, log) if device.type == "cuda" else (1e12, 1e11)
    if "bench" in args.skip:
        (block, config), table = make_block(shape, device, torch.bfloat16), ""
    else:
        block, config, table = bench(shape, device, tokens, peak, bw, log)
    if device.type == "cuda":
        extras = [lambda: graph_replay(block, config, shape, device, log)]
        if "host" not in args.skip:
            extras.append(lambda: host_costs(block, shape, device, log))
        if "profile" not in args.skip:
            extras.append(lambda: profile(block, shape, device, log, args.out))
        if "sweep" not in args.skip:
            extras.append(lambda: sweep(shape, device, log))
        for extra in extras:
            try:
                extra()
            except Exception as exc:  # the table below is the result; an extra failing must not lose it
                log(f"{type(exc).__name__}: {str(exc)[:300]}")
    log("\n" + table)


if __name__ == "__main__":
    main()
