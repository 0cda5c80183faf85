"""Triton kernels, one module per op family, each function with the signature of its reference in `qwen3next.ops`.

- `gated_delta`: chunked gated delta rule (forward and backward), recurrent decode, in-place state-pool update.
- `conv`: causal depthwise conv1d with fused SiLU (forward, backward, one-step update).
- `norms`: zero-centred RMSNorm, gated RMSNorm, L2 norm (forward and backward).

Import these through `qwen3next.ops`, which picks the backend; this package needs triton at import time.
"""

from __future__ import annotations

import torch


def sequence_offsets(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, list[int]]:
    """The kernels see every input as one packed row of tokens: return (offsets [N+1] int32 on `device`,
    the same offsets as a Python list). Without `cu_seqlens`, row b of a [B, T, ...] batch is sequence b."""
    if cu_seqlens is None:
        offsets = list(range(0, B * T + 1, T)) if T > 0 else [0] * (B + 1)
        return torch.tensor(offsets, dtype=torch.int32, device=device), offsets
    offsets = cu_seqlens.tolist()
    return cu_seqlens.to(device=device, dtype=torch.int32), offsets


def block_table(offsets: list[int], block: int, at_least_one: bool, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Enumerate the `block`-token blocks of every sequence, sequence by sequence: returns (sequence index
    [NB] int32, block index within its sequence [NB] int32, NB). With `at_least_one`, an empty sequence gets
    one (empty) block, so a kernel still visits it."""
    seq, pos = [], []
    for n in range(len(offsets) - 1):
        nb = -(-(offsets[n + 1] - offsets[n]) // block)
        if at_least_one:
            nb = max(nb, 1)
        seq.extend([n] * nb)
        pos.extend(range(nb))
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(seq), as_tensor(pos), len(seq)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 132 elsewhere, e.g. in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for operands of `dtype`: fp32 gets fp32 products ("ieee"; Triton's default
    for fp32 is tf32), so that fp32 results match the references; bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
