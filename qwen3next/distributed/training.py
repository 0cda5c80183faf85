"""The trainer under a parallel layout (`qwen3next train --tp/--ep/--cp/--dp-shard`, launched with torchrun).

Data. Every rank reads the same stream of packed rows (same seed, same shuffle buffer), so a
checkpoint's data position is one for all. A global batch of B rows (`--batch-size`) is dealt out:
  dp_shard  rank r takes rows r*B/dp .. (r+1)*B/dp - 1 (B must divide by dp_shard)
  cp        each rank takes its contiguous part of every row (`ParallelDims.cp_slice`); a row of
            packed documents keeps the whole row's offsets (the model's cp forward reads them)
  tp, ep    the same rows as their peers
A rank lays its rows out as at most two forward calls (`data.make_batch`: plain rows, packed rows).
The ranks that see different rows must make the same number of calls (FSDP's gathers and the loss
sums are collectives), so a rank with fewer calls than another splits its rows in two.

Losses. Each call returns the global sums behind its losses (`LossTerms`); the batch's losses come
from the sums over its calls: the cross-entropy over all predicted tokens, the load-balancing loss
over all tokens. They do not depend on how the batch was cut, so they are one process's on the same
global batch (`Trainer.batch_loss` pools the same way).

Gradient clipping takes the norm of the whole gradient (each shard counted once, `clip_grad_norm_`).
Checkpoints are written with torch.distributed.checkpoint (`train/state.py`); rank 0 alone writes the
run files.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..train.data import Part, Row, make_batch
from . import comm
from .dims import ParallelDims


@dataclass
class ShardedBatch:
    """This rank's forward calls of a global batch (input ids cut for cp; a packed row's `cu_seqlens`
    are the whole row's) and the global batch's token and target counts."""

    parts: list[Part]
    tokens: int
    targets: int


def check_settings(settings, config, dims: ParallelDims) -> None:
    """Raise ConfigError when the batch or the rows cannot be dealt out over `dims`."""
    errors = []
    if settings.batch_size % dims.dp_shard:
        errors.append(f"--batch-size {settings.batch_size} must divide by --dp-shard {dims.dp_shard} "
                      "(each data-parallel rank takes the same number of rows)")
    reach = max(config.linear_conv_kernel_dim - 1, 1)
    if settings.seq_len // dims.cp < reach:
        errors.append(f"--seq-len {settings.seq_len} over --cp {dims.cp} gives slices of {settings.seq_len // dims.cp} "
                      f"tokens; each needs at least {reach} (the causal conv reads {reach} back)")
    if errors:
        raise ConfigError("cannot train with this layout:\n  - " + "\n  - ".join(errors))


def place_model(model, device: torch.device, dims: ParallelDims | None, compute_dtype: torch.dtype | None,
                fill=None):
    """A float32 model on `device`, parallelized over `dims` (None: one process). A model on the meta
    device is parallelized first, then given storage for this rank's shards only, which `fill(model)`
    fills (`materialize.fill_seeded` or `fill_from_checkpoint`; None: the caller loads them, as a
    resumed run does)."""
    meta = any(p.is_meta for p in model.parameters())
    model = model.to(dtype=torch.float32)
    if not meta:
        model = model.to(device)
    if dims is not None:
        from .apply import parallelize

        model = parallelize(model, dims, param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if meta:
        from .materialize import materialise

        model = materialise(model, device)
        if fill is not None:
            fill(model)
    return model


def shard_batch(rows: list[Row], dims: ParallelDims) -> ShardedBatch:
    """This rank's share of the global batch `rows` (see the module docstring)."""
    if len(rows) % dims.dp_shard:
        raise ValueError(f"{len(rows)} rows cannot be dealt out evenly over dp_shard={dims.dp_shard}")
    n = len(rows) // dims.dp_shard
    shares = [rows[r * n : (r + 1) * n] for r in range(dims.dp_shard)]
    calls = max(len(make_batch(share).parts) for share in shares)
    mine = shares[dims.rank("dp_shard")]
    parts = make_batch(mine).parts
    if len(parts) < calls:  # one kind of row only, while another rank has both: two calls all the same
        parts = make_batch(mine[: n // 2]).parts + make_batch(mine[n // 2 :]).parts
    whole = make_batch(rows)
    return ShardedBatch([Part(dims.cp_slice(p.input_ids), p.cu_seqlens, p.targets) for p in parts],
                        whole.tokens, whole.targets)


def batch_loss(model, batch: ShardedBatch, device: torch.device, autocast):
    """(cross-entropy over the global batch's predicted tokens, load-balancing loss over its tokens or
    None, routing counts [MoE layers, E] or None): `Trainer.batch_loss`'s contract, every rank the same.
    `autocast()` gives the context each forward call runs in."""
    terms = None
    for part in batch.parts:
        ids = part.input_ids.to(device)
        cu = None if part.cu_seqlens is None else part.cu_seqlens.to(device)
        with autocast():
            out = model(ids, labels=ids, cu_seqlens=cu)
        terms = out.terms if terms is None else terms + out.terms
    if terms.routing is None:
        return terms.cross_entropy(), None, None
    return terms.cross_entropy(), terms.routing.loss(), terms.routing.layer_counts.round().long()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a parallelized model: the 2-norm of the whole gradient, every
    shard counted once (one process's norm), then every gradient scaled by min(1, max_norm / norm)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    sharded = defaultdict(list)  # (mesh, the mesh dims it is sharded over) -> local sums of squares
    for g in grads:
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):
                raise ValueError(f"a gradient with pending sums ({g.placements}) cannot be clipped")
            dims = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())  # Shard, _StridedShard
            sharded[(g.device_mesh, dims)].append(g.to_local().float().square().sum())
        else:  # a plain tensor is the same on every rank
            total += g.float().square().sum()
    for (mesh, dims), sums in sharded.items():  # the same order on every rank (the parameters')
        part = torch.stack(sums).sum()
        for d in dims:
            dist.all_reduce(part, group=mesh.get_group(d))
        total += part
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return norm


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (all ranks call it: a stop must be taken by all together)."""
    t = torch.tensor([float(flag)], device=comm.collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
