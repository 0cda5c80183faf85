"""Registers and spills of the chunked gated-delta-rule kernels on Hopper, without a GPU: each
variant is compiled by the local Triton for sm_90a and its PTX assembled by Triton's bundled ptxas (-v);
also the layout conversions in its TTGIR and the barriers in its PTX.
Registers depend on the Triton version (and its ptxas): for the GPU machine's, run it with that Triton
first on the path (e.g. `pip download triton==3.6.0`, then `pip install --no-deps --target DIR` and
PYTHONPATH=DIR). Compare variants, don't quote.

    python benchmarks/kernel_spills.py
"""

import inspect
import math
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qwen3next.ops.triton import gated_delta as tgd  # noqa: E402

POINTERS = {"*bf16": ("q", "k", "v", "hs", "dhs", "do", "wr", "y", "dq", "dk", "tinv", "pmat", "o", "y_out", "dv"),
            "*fp32": ("g", "beta", "dg", "dbeta", "h0", "ht", "dht", "dh0"),
            "*i32": ("cu", "chunk_seq", "chunk_pos", "chunk_off")}
MODEL = dict(HK=16, HV=32, DK=128, DV=128, BK=128, L2NORM=True, PREC="ieee")  # 80B-A3B, bf16


def ptxas_info(fn, constexprs: dict, num_warps: int, num_stages: int = 3) -> str:
    names = list(inspect.signature(fn.fn).parameters)
    kinds = {n: kind for kind, group in POINTERS.items() for n in group}
    signature = {n: "constexpr" if n in constexprs else kinds.get(n, "fp32" if n == "scale" else "i32") for n in names}
    # as a launch specialises them: pointers 16-byte aligned, integer arguments (strides) multiples of 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if signature[n] not in ("constexpr", "fp32")}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                    attrs=aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))
    ptxas = get_ptxas(90).path  # the assembler this Triton itself runs for sm_90
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    info = [line.split("info    :")[-1].strip() for line in lines if "spill" in line or "Used" in line]
    # layout conversions (through shared memory where they cross warps) and barriers, as compiled: the
    # shuffling between a kernel's products that its instruction count hides
    converts = re.findall(r"ttg\.convert_layout %\S+ : tensor<([0-9x]+)x[a-z0-9]+,", kernel.asm["ttgir"])
    big = sum(math.prod(int(d) for d in shape.split("x")) >= 8192 for shape in converts)
    info.append(f"{len(converts)} layout conversions ({big} of 8192+ elements), "
                f"{kernel.asm['ptx'].count('bar.sync')} barriers (static counts)")
    return "; ".join(info)


def main():
    for bv in (64, 32):  # the parallel backward, 8 warps (as run)
        print(f"_chunk_bwd_kernel, dv block {bv}, 8 warps: {ptxas_info(tgd._chunk_bwd_kernel, dict(MODEL, BV=bv), 8)}",
              flush=True)
    flags = dict(PRE_P=True, HAS_DHT=False, STORE_DH0=False, HAS_H0=False, STORE_HT=False, STORE_HS=True)
    for name in ("_chunk_fwd_kernel", "_chunk_bwd_state_kernel"):  # the sequential ones, 4 warps (as run)
        fn = getattr(tgd, name)
        own = {k: v for k, v in flags.items() if k in inspect.signature(fn.fn).parameters}
        for bv in (64, 32, 16):
            print(f"{name}, dv block {bv}, 4 warps: {ptxas_info(fn, dict(MODEL, BV=bv, **own), 4)}", flush=True)


if __name__ == "__main__":
    main()
