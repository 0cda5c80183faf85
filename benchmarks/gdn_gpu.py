"""Gated DeltaNet kernels on the GPU: first correctness in bf16 against the fp32 references, then timings
of ours against fla 0.6.0 in the same process. Prints markdown tables; writes everything to $OUT/gdn_gpu.json.

    python benchmarks/gdn_gpu.py [--quick] [--sweep [all | bwd]] [--profile]

--sweep first times the chunked kernels' launch choices (`Tuning`: the T kernel's warps, then the backward
kernel's dv block and P's source in training; `bwd`: only the latter) and then checks and times everything
with the fastest. --profile prints the kernel-time breakdown of forward+backward at 1 x 65536 and 8 x 8192.

Checks (each output buffer region is poisoned with NaN before the run, so an unwritten element fails):
chunked forward and all gradients (model shape and a varlen GVA case), recurrent decode, the state-pool
update, conv1d forward/backward/update and the norms: relative error (||a-b|| / ||b||) < 1e-2, no NaN.
Timings (triton.testing.do_bench, median): chunked forward, ours vs fla (its chunked backward refuses
Triton 3.4-3.7 on Hopper, so only its forward is timed), our forward+backward, decode at 1/32/256
sequences (plain launches and a CUDA-graph replay) against the device-to-device copy rate measured here.
"""

import argparse
import datetime
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qwen3next.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402
from qwen3next.ops.gated_delta import (  # noqa: E402
    chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref, recurrent_gated_delta_rule_update_ref,
)
from qwen3next.ops.norms import gated_rms_norm_ref, l2_norm_ref, rms_norm_ref  # noqa: E402
from qwen3next.ops.triton import conv as tconv  # noqa: E402
from qwen3next.ops.triton import blocks  # noqa: E402
from qwen3next.ops.triton import gated_delta as tgd  # noqa: E402
from qwen3next.ops.triton import norms as tnorms  # noqa: E402
from timing import capture_graph, gpu_idle, host_ms, kernel_profile  # noqa: E402

HK, HV, D = 16, 32, 128
SHAPES = [(1, 4096), (1, 16384), (4, 8192), (8, 8192), (1, 65536)]
RESULTS = {"checks": {}, "forward": {}, "fwd_bwd": {}, "decode": {}, "sweep": {}}
FAILED = []


def rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison():
    """Fill free cached memory with NaN, so that buffers the kernels fail to write show up."""
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(min(int(free * 0.5), 8 * 2**30) // 4, dtype=torch.float32, device="cuda")
    x.fill_(float("nan"))
    del x


def check(name, pairs):
    errs = {k: rel(a, b) for k, (a, b) in pairs.items()}
    ok = all(e == e and e < 1e-2 for e in errs.values())
    RESULTS["checks"][name] = {"ok": ok, **errs}
    if not ok:
        FAILED.append(name)
    print(f"check {name:34s} {'ok  ' if ok else 'FAIL'} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()),
          flush=True)


def gdn_inputs(B, T, hk, hv, d, dtype, seed, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, hk, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, T, hk, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, T, hv, d, device="cuda", generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, hv, device="cuda", generator=gen) + 3.0)
    beta = torch.rand(B, T, hv, device="cuda", generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta)]


def section(fn):
    def run(*a, **kw):
        try:
            fn(*a, **kw)
        except Exception:  # keep going: one broken section must not hide the others
            FAILED.append(fn.__name__)
            traceback.print_exc()
            sys.stdout.flush()
    return run


@section
def check_chunk(B, T, hk, hv, cu=None, tag=""):
    q, k, v, g, beta = gdn_inputs(B, T, hk, hv, D, torch.bfloat16, seed=T, requires_grad=True)
    N = B if cu is None else len(cu) - 1
    h0 = torch.randn(N, hv, D, D, device="cuda").requires_grad_()
    ins = (q, k, v, g, beta, h0)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    ref_ins = [x.detach().float().requires_grad_() for x in ins]
    o_ref, s_ref = chunk_gated_delta_rule_ref(*ref_ins[:5], **{**kw, "initial_state": ref_ins[5]})
    do = torch.randn_like(o_ref)
    ds = torch.randn_like(s_ref)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref_ins)
    poison()
    o, s = tgd.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    poison()
    grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), ins)
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    check(f"chunk {tag} B={B} T={T} Hk={hk} Hv={hv}",
          {"o": (o, o_ref), "state": (s, s_ref), **{n: (a, b) for n, a, b in zip(names, grads, grads_ref)}})


@section
def check_decode():
    q, k, v, g, beta = gdn_inputs(8, 3, HK, HV, D, torch.bfloat16, seed=1)
    h0 = torch.randn(8, HV, D, D, device="cuda")
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, **kw)
    poison()
    o, s = tgd.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    check("fused_recurrent B=8 T=3", {"o": (o, o_ref), "state": (s, s_ref)})
    pool = torch.randn(12, HV, D, D, device="cuda")
    pool_ref = pool.clone()
    idx = torch.tensor([5, -1, 0, 11, 3, 7, 2, 9], dtype=torch.int32, device="cuda")
    o_ref = recurrent_gated_delta_rule_update_ref(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], pool_ref, idx,
                                                  use_qk_l2norm_in_kernel=True)
    poison()
    o = tgd.recurrent_gated_delta_rule_update(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], pool, idx,
                                              use_qk_l2norm_in_kernel=True)
    check("pool update B=8 T=1", {"o": (o, o_ref), "pool": (pool, pool_ref)})


@section
def check_conv_norms():
    x = torch.randn(1, 3000, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 1000, 1001, 3000], device="cuda", dtype=torch.int32)
    h0 = torch.randn(3, 2048, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ins = (x, w, h0)
    ref_ins = [t.detach().float().requires_grad_() for t in ins]
    y_ref, f_ref = causal_conv1d_ref(*ref_ins[:2], ref_ins[2], True, cu)
    dy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * dy).sum(), ref_ins)
    poison()
    y, f = tconv.causal_conv1d(x, w, h0, True, cu)
    poison()
    g = torch.autograd.grad((y.float() * dy).sum(), ins)
    check("conv1d varlen", {"y": (y, y_ref), "final": (f, f_ref), "dx": (g[0], g_ref[0]), "dw": (g[1], g_ref[1]),
                            "dh0": (g[2], g_ref[2])})
    st = torch.randn(64, 2048, 3, device="cuda", dtype=torch.bfloat16)
    st_ref = st.float()
    xx = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    y_ref = causal_conv1d_update_ref(xx.float(), st_ref, w.detach().float())
    poison()
    y = tconv.causal_conv1d_update(xx, st, w.detach())
    check("conv1d update", {"y": (y, y_ref), "state": (st, st_ref)})
    xn = torch.randn(4096, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn_like(xn).requires_grad_()
    wn = (1 + 0.1 * torch.randn(128, device="cuda")).to(torch.bfloat16).requires_grad_()
    for name, ours, ref, args in (("gated_rms_norm", tnorms.gated_rms_norm, gated_rms_norm_ref, (xn, z, wn)),
                                  ("rms_norm", tnorms.rms_norm, rms_norm_ref, (xn, wn)),
                                  ("l2_norm", tnorms.l2_norm, l2_norm_ref, (xn,))):
        ref_args = [a.detach().float().requires_grad_() for a in args]
        y_ref = ref(*ref_args)
        dy = torch.randn_like(y_ref)
        g_ref = torch.autograd.grad(y_ref, ref_args, dy)
        poison()
        y = ours(*args)
        poison()
        g = torch.autograd.grad(y, args, dy.to(y.dtype))
        check(name, {"y": (y, y_ref), **{f"d{i}": (a, b) for i, (a, b) in enumerate(zip(g, g_ref))}})


def bench(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


@section
def time_copy():
    x = torch.empty(512 * 2**20, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    RESULTS["copy_TBps"] = 2 * x.numel() * 4 / ms / 1e9
    print(f"device-to-device copy: {RESULTS['copy_TBps']:.2f} TB/s (read + write)", flush=True)


@section
def time_chunk(fla_chunk, quick):
    for B, T in SHAPES[:2] if quick else SHAPES:
        q, k, v, g, beta = gdn_inputs(B, T, HK, HV, D, torch.bfloat16, seed=7)
        key = f"{B}x{T}"
        row = {}
        with torch.no_grad():
            row["ours"] = bench(lambda: tgd.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                                   use_qk_l2norm_in_kernel=True))
            if fla_chunk is not None:
                row["fla"] = bench(lambda: fla_chunk(q, k, v, g, beta, output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True))
        RESULTS["forward"][key] = row
        print(f"forward {key}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in row.items()), flush=True)
        ins = [x.requires_grad_() for x in (q, k, v, g, beta)]
        do = torch.randn(B, T, HV, D, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd():
            o, _ = tgd.chunk_gated_delta_rule(*ins, output_final_state=True, use_qk_l2norm_in_kernel=True)
            torch.autograd.grad(o, ins, do)

        RESULTS["fwd_bwd"][key] = bench(fwd_bwd)
        print(f"fwd+bwd {key}: {RESULTS['fwd_bwd'][key]:.3f} ms", flush=True)
        del ins, q, k, v, g, beta, do
        torch.cuda.empty_cache()


def sweep_part(spec):
    """Time one group of launch choices (a child process of `sweep_tuning`: a choice that faults the GPU
    loses only its group). spec: {"pass": "fwd" | "fwd+bwd", "shapes": [[B, T], ...], "choices": [Tuning
    fields, ...]}. Prints `RESULT` and a JSON list of milliseconds, [choice][shape]."""
    times = [[float("inf")] * len(spec["shapes"]) for _ in spec["choices"]]
    for j, (B, T) in enumerate(spec["shapes"]):
        if spec["pass"] == "fwd":
            q, k, v, g, beta = gdn_inputs(B, T, HK, HV, D, torch.bfloat16, seed=3)
            layout = blocks(B, T, None, tgd.CHUNK, False, q.device)
            ins = (q.view(B * T, HK, D), k.view(B * T, HK, D), v.view(B * T, HV, D), g.view(B * T, HV),
                   beta.view(B * T, HV))
        else:
            q, k, v, g, beta = (x.requires_grad_() for x in gdn_inputs(B, T, HK, HV, D, torch.bfloat16, seed=5))
            do = torch.randn(B, T, HV, D, device="cuda", dtype=torch.bfloat16)
        for i, fields in enumerate(spec["choices"]):
            tgd.TUNING = tgd.Tuning(**fields)
            if spec["pass"] == "fwd":
                fn = lambda: tgd._chunk_forward(*ins, D ** -0.5, None, True, True, layout, False)  # noqa: E731
            else:
                def fn():
                    o, _ = tgd.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
                    torch.autograd.grad(o, (q, k, v, g, beta), do)
            try:
                times[i][j] = bench(fn)
            except Exception as e:  # does not compile (e.g. shared memory): no result for this choice
                print(f"{fields}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            print(f"{spec['pass']} {B}x{T} {fields}: {times[i][j]:.3f} ms", flush=True)
    print("RESULT " + json.dumps(times), flush=True)


def _sweep_group(spec):
    import subprocess
    proc = subprocess.run([sys.executable, __file__, "--sweep-part", json.dumps(spec)], capture_output=True,
                          text=True, timeout=300)
    print(proc.stdout + proc.stderr[-2000:], flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return [[float("inf")] * len(spec["shapes"]) for _ in spec["choices"]]


@section
def sweep_tuning(what):
    """Launch choices of the chunked kernels (`tgd.Tuning`): the T kernel's warps by forward time at 1 x 16384,
    1 x 65536 and 8 x 8192 (what = "all"), then the parallel backward kernel's dv block and P's source in
    training under the best of those, by forward+backward time at 1 x 16384 and 8 x 8192. The sequential
    kernels keep the defaults that session 2's sweep of their choices picked (BENCHMARKS.md). Sets
    `tgd.TUNING` to the winner for the checks and timings after."""
    import itertools
    fwd_choices, fwd, best = [], [], {}
    if what == "all":
        # T at 4 warps was 1.5-2x slower, P at 1 or 2 warps 1-9% (an H100 sweep, BENCHMARKS.md): not swept again
        fwd_choices = [dict(inverse_warps=iw) for iw in (1, 2)]
        fwd = _sweep_group({"pass": "fwd", "shapes": [[1, 16384], [1, 65536], [8, 8192]], "choices": fwd_choices})
        RESULTS["sweep"]["forward"] = {json.dumps(c): t for c, t in zip(fwd_choices, fwd)}
        best = min(zip(fwd_choices, fwd), key=lambda ct: sum(ct[1]))[0]
    # 16 warps lost by 25-50% in sessions 8, 11 and 12 on an H200 (BENCHMARKS.md): not swept again
    bwd_choices = [dict(best, bwd_block_v=bbv, train_pre_scores=tp)
                   for bbv, tp in itertools.product((32, 64), (None, True))]
    both = _sweep_group({"pass": "fwd+bwd", "shapes": [[1, 16384], [8, 8192]], "choices": bwd_choices})
    RESULTS["sweep"]["fwd+bwd"] = {json.dumps(c): t for c, t in zip(bwd_choices, both)}
    chosen = min(zip(bwd_choices, both), key=lambda ct: sum(ct[1]))[0]
    tgd.TUNING = tgd.Tuning(**chosen)
    RESULTS["tuning"] = str(tgd.TUNING)
    print("forward (ms at 1x16384, 1x65536, 8x8192):")
    for c, t in zip(fwd_choices, fwd):
        print(f"  {json.dumps(c)}: " + ", ".join(f"{x:.3f}" for x in t))
    print("forward+backward (ms at 1x16384, 8x8192):")
    for c, t in zip(bwd_choices, both):
        print(f"  {json.dumps(c)}: " + ", ".join(f"{x:.3f}" for x in t))
    print(f"chosen: {tgd.TUNING}", flush=True)


def kernel_resources():
    """Registers, spills and shared memory of each compiled variant of the chunked kernels (Triton's caches)."""
    for name in ("_chunk_fwd_kernel", "_chunk_bwd_state_kernel", "_chunk_bwd_kernel", "_norm_bwd_kernel"):
        fn = getattr(tgd, name, None) or getattr(tnorms, name, None)
        for entry in getattr(fn, "device_caches", {}).values():
            for compiled in (entry[0] if isinstance(entry, tuple) else entry).values():
                meta = getattr(compiled, "metadata", None)
                print(f"{name}: regs {getattr(compiled, 'n_regs', '?')}, spills {getattr(compiled, 'n_spills', '?')}, "
                      f"warps {getattr(meta, 'num_warps', '?')}, stages {getattr(meta, 'num_stages', '?')}, "
                      f"shared {getattr(meta, 'shared', '?')}", flush=True)


@section
def profile_fwd_bwd():
    kernel_resources()
    for B, T in ((1, 4096), (1, 65536), (8, 8192)):
        ins = [x.requires_grad_() for x in gdn_inputs(B, T, HK, HV, D, torch.bfloat16, seed=9)]
        do = torch.randn(B, T, HV, D, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd():
            o, _ = tgd.chunk_gated_delta_rule(*ins, output_final_state=True, use_qk_l2norm_in_kernel=True)
            torch.autograd.grad(o, ins, do)

        kernel_profile(fwd_bwd, torch.device("cuda"), f"fwd+bwd {B}x{T}", lambda m: print(m, flush=True), top=12)
        print(f"host: fwd+bwd {B}x{T} takes {host_ms(fwd_bwd, reps=7, warm=0):.3f} ms to issue", flush=True)
        gpu_idle(fwd_bwd, torch.device("cuda"), f"fwd+bwd {B}x{T}", lambda m: print(m, flush=True))
        del ins, do
        torch.cuda.empty_cache()


@section
def time_decode(fla_recurrent):
    for n in (1, 32, 256):
        q, k, v, g, beta = gdn_inputs(n, 1, HK, HV, D, torch.bfloat16, seed=n)
        pool = torch.randn(n, HV, D, D, device="cuda")
        idx = torch.arange(n, dtype=torch.int32, device="cuda")
        state_bytes = 2 * pool.numel() * 4  # read + write
        step = lambda: tgd.recurrent_gated_delta_rule_update(q, k, v, g, beta, pool, idx,  # noqa: E731
                                                             use_qk_l2norm_in_kernel=True)
        row = {"ours_ms": bench(step)}
        row["ours_graph_ms"] = bench(capture_graph(step).replay)
        row["ours_TBps"] = state_bytes / row["ours_graph_ms"] / 1e9
        if fla_recurrent is not None:
            row["fla_ms"] = bench(lambda: fla_recurrent(q, k, v, g, beta, initial_state=pool, output_final_state=True,
                                                        use_qk_l2norm_in_kernel=True))
            row["fla_TBps"] = state_bytes / row["fla_ms"] / 1e9
        RESULTS["decode"][n] = row
        print(f"decode {n} seqs: " + ", ".join(f"{k_} {v_:.3f}" for k_, v_ in row.items()), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--sweep-part", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", nargs="?", const="all", choices=["all", "bwd"],
                        help="first sweep the kernels' launch choices (all, or the backward's only) and time "
                        "everything after with the fastest")
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of forward+backward")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.sweep_part:
        return sweep_part(json.loads(args.sweep_part))
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
        fla_version = fla.__version__
    except Exception as e:  # time ours alone rather than nothing
        print(f"fla unavailable: {e!r}")
        fla_chunk = fla_recurrent = None
        fla_version = None
    RESULTS["env"] = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                      "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version}
    print(RESULTS["env"], flush=True)

    time_copy()
    if args.sweep:
        sweep_tuning(args.sweep)
    check_chunk(1, 2048, HK, HV, tag="model shape")
    check_chunk(1, 1000, 2, 4, cu=torch.tensor([0, 1, 300, 300, 1000], device="cuda", dtype=torch.int32),
                tag="varlen")
    check_chunk(3, 193, 4, 4, tag="GVA 1")
    check_decode()
    check_conv_norms()
    time_chunk(fla_chunk, args.quick)
    time_decode(fla_recurrent)
    if args.profile:
        profile_fwd_bwd()

    env = RESULTS["env"]
    print(f"\n{env['device']}, {env['date']}, torch {env['torch']}, triton {env['triton']}, fla {env['fla']}; "
          f"Hk={HK}, Hv={HV}, d={D}, bf16, q/k L2 norm in kernel, final state out; {tgd.TUNING}")
    print("| B x T | fla fwd ms | ours fwd ms | ours/fla | ours fwd+bwd ms | fwd+bwd / fwd |")
    print("|---|---|---|---|---|---|")
    for key, row in RESULTS["forward"].items():
        fb = RESULTS["fwd_bwd"].get(key, float("nan"))
        fla_ms = row.get("fla", float("nan"))
        print(f"| {key} | {fla_ms:.3f} | {row['ours']:.3f} | {row['ours'] / fla_ms:.2f} | {fb:.3f} | "
              f"{fb / row['ours']:.2f} |")
    copy = RESULTS.get("copy_TBps", float("nan"))
    print(f"\ndecode, one token a sequence, state pool in place (copy rate here {copy:.2f} TB/s)")
    print("| sequences | ours ms | ours graph ms | ours TB/s | % of copy | fla ms | fla TB/s |")
    print("|---|---|---|---|---|---|---|")
    for n, row in RESULTS["decode"].items():
        print(f"| {n} | {row['ours_ms']:.4f} | {row['ours_graph_ms']:.4f} | {row['ours_TBps']:.2f} | "
              f"{100 * row['ours_TBps'] / copy:.0f}% | {row.get('fla_ms', float('nan')):.4f} | "
              f"{row.get('fla_TBps', float('nan')):.2f} |")
    print(f"\nfailed: {FAILED or 'none'}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gdn_gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
