"""The hot kernels of one MoE block or one gated-delta-rule layer, run once inside a CUDA profiler range, for
Nsight Compute's hardware counters (DRAM and L2 throughput, occupancy, registers, stall reasons).

    S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
       --section LaunchStats --section SchedulerStats --print-details all"
    ncu --profile-from-start off -k regex:'_grouped_gemm|_slot_sum|_swiglu|_sort_by|_grouped_wgrad' $S \
        python benchmarks/ncu_kernels.py moe > ncu_moe.txt
    ncu --profile-from-start off -k regex:'_chunk|l2' $S python benchmarks/ncu_kernels.py gdn > ncu_gdn.txt

moe: the 80B-A3B block (D=2048, 512 experts, top-10, I=512) forward+backward at 8192 tokens with our
kernels, and our weight-gradient kernel on the same rows (the block itself uses torch._grouped_mm there).
gdn: the chunked gated delta rule at 1 x 16384 tokens (16 key heads, 32 value heads, d=128, bf16, q/k L2 norm
in the kernel): the inference forward, then forward+backward. Two warm-up rounds precede the profiled one.
"""

import argparse

import torch
import torch.nn.functional as F

from gdn_gpu import D as HEAD_DIM, HK, HV, gdn_inputs
from moe_gpu import make_block, our_block
from qwen3next import ops
from qwen3next.ops.triton import gated_delta as tgd
from qwen3next.ops.triton import moe


def moe_step(device):
    D, E, k, I = 2048, 512, 10, 512
    block, _ = make_block((D, E, k, I, 512), device, torch.bfloat16)
    fn = our_block(block, ops.moe_experts)
    x = torch.randn(1, 8192, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(x)
    flat = x.detach().view(-1, D)
    order, ends = moe._sort_by_expert(ops.route(F.linear(flat, block.gate.weight), k, True)[1], E)
    dh = torch.randn(flat.shape[0] * k, 2 * I, device=device, dtype=torch.bfloat16)
    dgate_up = torch.empty_like(block.experts.gate_up_proj)

    def step():
        fn(x).backward(dout)
        moe._grouped_wgrad(dh, flat, order, ends, dgate_up, top_k=k, gather_a=True)

    return step


def gdn_step(B=1, T=16384):
    ins = gdn_inputs(B, T, HK, HV, HEAD_DIM, torch.bfloat16, seed=0, requires_grad=True)
    do = torch.randn_like(ins[2])

    def step():
        with torch.no_grad():
            tgd.chunk_gated_delta_rule(*ins, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o, _ = tgd.chunk_gated_delta_rule(*ins, output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.autograd.grad(o, ins, do)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["moe", "gdn"])
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    step = moe_step(device) if args.what == "moe" else gdn_step()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
