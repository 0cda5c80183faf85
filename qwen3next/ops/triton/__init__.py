"""Triton kernels, one module per op family, each function with the signature of its reference in `qwen3next.ops`.

- `gated_delta`: chunked gated delta rule (forward and backward), recurrent decode, in-place state-pool update.
- `conv`: causal depthwise conv1d with fused SiLU (forward, backward, one-step update).
- `norms`: zero-centred RMSNorm, gated RMSNorm, L2 norm (forward and backward).

Import these through `qwen3next.ops`, which picks the backend; this package needs triton at import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    """Where the sequences and their `block`-token blocks lie in the packed token row that the kernels see:
    cu [N+1] int32 (sequence offsets, on the device), offsets (the same on the host), seq and pos [NB]
    int32 (each block's sequence and index within it, sequence by sequence), first [N+1] int32 (the first
    block of each sequence: cumulative counts), N and NB. Read-only: a [B, T] batch's may be shared."""

    cu: torch.Tensor
    offsets: tuple[int, ...]
    seq: torch.Tensor
    pos: torch.Tensor
    first: torch.Tensor
    N: int
    NB: int


def blocks(B: int, T: int, cu_seqlens: torch.Tensor | None, block: int, at_least_one: bool, device) -> Blocks:
    """`Blocks` of a [B, T, ...] batch (row b is sequence b: built on the device, no host round trip before the
    launches, and kept for the next call of the same shape: every layer of a forward asks for the same) or of
    the sequences that `cu_seqlens` packs into one row (from their offsets on the host). With `at_least_one`,
    an empty sequence gets one (empty) block, so a kernel still visits it."""
    if cu_seqlens is None:
        device = torch.device(device)
        if device.type != "cuda":
            return _cached_batch_blocks(B, T, block, at_least_one, device, 0)
        if torch.cuda.is_current_stream_capturing():
            return _batch_blocks(B, T, block, at_least_one, device)  # a graph's own tensors, filled at replay
        stream = torch.cuda.current_stream(device).stream_id
        return _cached_batch_blocks(B, T, block, at_least_one, device, stream)
    offsets = tuple(cu_seqlens.tolist())
    counts = [-(-(end - start) // block) for start, end in zip(offsets[:-1], offsets[1:])]
    if at_least_one:
        counts = [max(c, 1) for c in counts]
    seq = [n for n, c in enumerate(counts) for _ in range(c)]
    pos = [i for c in counts for i in range(c)]
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return Blocks(cu_seqlens.to(device=device, dtype=torch.int32), offsets, as_tensor(seq), as_tensor(pos),
                  as_tensor(first), len(counts), len(seq))


def _batch_blocks(B: int, T: int, block: int, at_least_one: bool, device: torch.device) -> Blocks:
    """`blocks` of a [B, T] batch, built on the device (row b is sequence b)."""
    per = max(-(-T // block), 1 if at_least_one else 0)
    rows = torch.arange(B + 1, device=device, dtype=torch.int32)
    ids = torch.arange(B * per, device=device, dtype=torch.int32)
    return Blocks(rows * T, tuple(b * T for b in range(B + 1)), ids // max(per, 1), ids % max(per, 1), rows * per,
                  B, B * per)


@functools.lru_cache(maxsize=64)
def _cached_batch_blocks(B: int, T: int, block: int, at_least_one: bool, device: torch.device, stream: int) -> Blocks:
    """`_batch_blocks`, kept per stream: the kernels that read it later on that stream run after those that
    built it."""
    return _batch_blocks(B, T, block, at_least_one, device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids and block sizes on the host (`triton.cdiv` does the same through Triton's
    constexpr-function wrapper, about 2 us a call: a forward makes over a hundred of them)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), on the host, as `triton.next_power_of_2` (see `cdiv`)."""
    return 1 << (n - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 132 elsewhere, e.g. in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for operands of `dtype`: fp32 gets fp32 products ("ieee"; Triton's default
    for fp32 is tf32), so that fp32 results match the references; bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
