"""Tensor (head) parallelism with sequence parallelism, applied to a built model from outside.

Parameters become DTensors on the tp mesh (same names; `.full_tensor()` is the single-process tensor):
  Gated DeltaNet   in_proj_qkvz, in_proj_ba  Shard(0): both are grouped per key head, so a contiguous
                   split gives each rank whole key-head groups (q, k, v, z and b, a of the same heads)
                   conv1d.weight             Replicate: its channels are [q all heads | k all heads |
                   v all heads], so a rank uses its slice of EACH segment (a contiguous split is wrong)
                   A_log, dt_bias            Shard(0) (by value head); norm.weight Replicate
                   out_proj                  Shard(1) (row parallel)
  Gated attention  q_proj Shard(0) (query and gate of a head stay together); k/v_proj Shard(0) when
                   tp divides the KV heads, else Replicate with each rank using the KV head of its
                   query heads (Megatron's rule for MQA); o_proj Shard(1); q_norm, k_norm Replicate
  MLP, shared expert  gate/up Shard(0), down Shard(1); routed experts (ep = 1): gate_up
                   _StridedShard(1, 2) (each rank: its gate rows and its up rows), down Shard(2)
  embed_tokens, lm_head  Shard(0) (vocab parallel; the loss never gathers the logits)
  norms, router, shared_expert_gate  Replicate
The computation runs on local tensors: each block's forward is the model's own, called with the
parameters swapped for their local views (so the model code stays single-device). Between blocks the
residual stream is sharded on the sequence (sequence parallel) when the sequence divides by tp (else,
e.g. while decoding one token, it is replicated): a block all-gathers its input and reduce-scatters
its output (all-reduce without SP). Replicated parameters that a rank applies to its own heads or
tokens get their gradients summed over tp inside the backward (`comm.grad_all_reduce`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from . import comm


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (differentiable), a plain tensor unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


class TPRuntime:
    """The tp group and, per forward call, whether the residual stream is sequence-parallel."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.group = None if mesh is None else mesh.get_group()
        self.size = comm.group_size(self.group)
        self.rank = comm.group_rank(self.group)
        self.sp = False

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Residual-stream tokens -> all tokens, for a block whose ranks each compute part of it."""
        if self.size == 1:
            return x
        if self.sp:
            return comm.gather(x, x.dim() - 2, [x.shape[-2]] * self.size, self.group, partial_consumers=True)
        return comm.grad_all_reduce(x, self.group)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """A block's partial sums over tp -> the residual stream's layout."""
        if self.size == 1:
            return y
        if self.sp:
            return comm.reduce_scatter(y, y.dim() - 2, [y.shape[-2] // self.size] * self.size, self.group)
        return comm.all_reduce(y, self.group)

    def data_sum(self, w: torch.Tensor) -> torch.Tensor:
        """A replicated parameter applied to the residual stream: its gradient sums over tp under SP."""
        return comm.grad_all_reduce(w, self.group) if self.sp else w

    def heads_sum(self, w: torch.Tensor) -> torch.Tensor:
        """A replicated parameter applied to this rank's heads/channels only: gradient always sums over tp."""
        return comm.grad_all_reduce(w, self.group)


# --------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def swapped_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Run with `module`'s parameters (dotted names) replaced by the given tensors, then put them back."""
    saved = []
    try:
        for name, t in tensors.items():
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            saved.append((sub, attr, sub._parameters[attr]))
            sub._parameters[attr] = t
        yield
    finally:
        for sub, attr, p in reversed(saved):
            sub._parameters[attr] = p


def distribute_parameter(module: nn.Module, name: str, mesh, placements) -> None:
    """Replace parameter `name` by a DTensor on `mesh`; every rank cuts its shard from its own copy."""
    owner, _, attr = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    param = sub._parameters[attr]
    dt = distribute_tensor(param.data, mesh, placements, src_data_rank=None)
    sub._parameters[attr] = nn.Parameter(dt, requires_grad=param.requires_grad)


def shard_offset(param: DTensor, dim: int) -> int:
    """Global index of this rank's first element along `dim` of a Shard(dim) DTensor."""
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[dim]


def install_forward(module: nn.Module, forward, *extra) -> None:
    """Make `module(...)` call `forward(module, inner, *extra, *args, **kwargs)`, where `inner` is the
    forward it had (its class's, or one installed before: wrappers chain)."""
    module.forward = functools.partial(forward, module, module.forward, *extra)


def _block_forward(module, inner, tp: TPRuntime, rules, is_block, *args, **kwargs):
    """The module's own forward on local parameter views; a block also enters/exits the tp region."""
    x = tp.enter(args[0]) if is_block else args[0]
    views = {name: rule(module.get_parameter(name)) for name, rule in rules.items()}
    with swapped_parameters(module, views):
        y = inner(x, *args[1:], **kwargs)
    return tp.exit(y) if is_block else y


# --------------------------------------------------------------------------------------------- checks
def check_tp(config, tp: int, ep: int) -> list[str]:
    """Reasons this config cannot be split over `tp` ranks (empty when it can)."""
    errors = []
    if tp == 1:
        return errors
    if config.linear_num_key_heads % tp:
        errors.append(f"tp={tp} must divide linear_num_key_heads={config.linear_num_key_heads} "
                      "(Gated DeltaNet is split by key-head groups)")
    if config.num_attention_heads % tp:
        errors.append(f"tp={tp} must divide num_attention_heads={config.num_attention_heads}")
    kv = config.num_key_value_heads
    if kv % tp and tp % kv:
        errors.append(f"tp={tp} must divide num_key_value_heads={kv} or be a multiple of it (KV heads replicated)")
    if config.attention_bias:
        errors.append("tensor parallelism does not support attention_bias=True (Qwen3-Next has no attention bias)")
    dense = any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    widths = [("intermediate_size", config.intermediate_size)] if dense else []
    if config.num_experts:
        widths.append(("shared_expert_intermediate_size", config.shared_expert_intermediate_size))
        if ep == 1:
            widths.append(("moe_intermediate_size", config.moe_intermediate_size))
    for name, width in widths:
        if width % tp:
            errors.append(f"tp={tp} must divide {name}={width}")
    return errors


# --------------------------------------------------------------------------------------------- plans
def _mlp_rules(module, mesh, prefix=""):
    for name in ("gate_proj", "up_proj"):
        distribute_parameter(module, f"{prefix}{name}.weight", mesh, [Shard(0)])
    distribute_parameter(module, f"{prefix}down_proj.weight", mesh, [Shard(1)])
    return {f"{prefix}{n}.weight": local for n in ("gate_proj", "up_proj", "down_proj")}


def parallelize_gated_deltanet(module, tp: TPRuntime) -> None:
    n, r = tp.size, tp.rank
    for name in ("in_proj_qkvz.weight", "in_proj_ba.weight", "A_log", "dt_bias"):
        distribute_parameter(module, name, tp.mesh, [Shard(0)])
    distribute_parameter(module, "out_proj.weight", tp.mesh, [Shard(1)])
    for name in ("conv1d.weight", "norm.weight"):
        distribute_parameter(module, name, tp.mesh, [Replicate()])
    kd, vd = module.key_dim // n, module.value_dim // n
    device = module.conv1d.weight.device
    channels = torch.cat([torch.arange(r * kd, (r + 1) * kd), module.key_dim + torch.arange(r * kd, (r + 1) * kd),
                          2 * module.key_dim + torch.arange(r * vd, (r + 1) * vd)]).to(device)
    module.num_k_heads //= n
    module.num_v_heads //= n
    module.key_dim, module.value_dim, module.conv_dim = kd, vd, 2 * kd + vd
    rules = {name: local for name in ("in_proj_qkvz.weight", "in_proj_ba.weight", "A_log", "dt_bias", "out_proj.weight")}
    rules["conv1d.weight"] = lambda w: tp.heads_sum(local(w)).index_select(0, channels)
    rules["norm.weight"] = lambda w: tp.heads_sum(local(w))
    install_forward(module, _block_forward, tp, rules, True)


def parallelize_gated_attention(module, tp: TPRuntime) -> None:
    n, r = tp.size, tp.rank
    hd, kv = module.head_dim, module.num_kv_heads
    distribute_parameter(module, "q_proj.weight", tp.mesh, [Shard(0)])
    distribute_parameter(module, "o_proj.weight", tp.mesh, [Shard(1)])
    rules = {"q_proj.weight": local, "o_proj.weight": local}
    if kv % n == 0:
        for name in ("k_proj.weight", "v_proj.weight"):
            distribute_parameter(module, name, tp.mesh, [Shard(0)])
            rules[name] = local
        module.num_kv_heads = kv // n
    else:  # fewer KV heads than ranks: every rank keeps them all and uses the one its query heads read
        head = r // (n // kv)
        for name in ("k_proj.weight", "v_proj.weight"):
            distribute_parameter(module, name, tp.mesh, [Replicate()])
            rules[name] = lambda w: tp.heads_sum(local(w))[head * hd : (head + 1) * hd]
        module.num_kv_heads = 1
    for name in ("q_norm.weight", "k_norm.weight"):
        distribute_parameter(module, name, tp.mesh, [Replicate()])
        rules[name] = lambda w: tp.heads_sum(local(w))
    module.num_heads //= n
    install_forward(module, _block_forward, tp, rules, True)


def parallelize_mlp(module, tp: TPRuntime) -> None:
    install_forward(module, _block_forward, tp, _mlp_rules(module, tp.mesh), True)


def parallelize_norm(module, tp: TPRuntime) -> None:
    distribute_parameter(module, "weight", tp.mesh, [Replicate()])
    install_forward(module, _block_forward, tp, {"weight": lambda w: tp.data_sum(local(w))}, False)


def parallelize_moe_params(module, tp: TPRuntime, expert_tp: bool) -> dict:
    """Distribute a SparseMoE's parameters over tp; returns the shared expert's local-view rules.
    Routed experts are split over tp (expert tensor parallelism) only when `expert_tp`."""
    distribute_parameter(module, "gate.weight", tp.mesh, [Replicate()])
    distribute_parameter(module, "shared_expert_gate.weight", tp.mesh, [Replicate()])
    if expert_tp:
        distribute_parameter(module, "experts.gate_up_proj", tp.mesh, [_StridedShard(1, split_factor=2)])
        distribute_parameter(module, "experts.down_proj", tp.mesh, [Shard(2)])
    return _mlp_rules(module.shared_expert, tp.mesh)


def vocab_parallel_embedding(module, inner, tp: TPRuntime, ids):
    """Each rank looks up the ids in its vocab rows (zeros elsewhere); the partial sums are reduced
    into the residual stream's layout."""
    w = local(module.weight)
    start = shard_offset(module.weight, 0)
    shifted = ids - start
    inside = (shifted >= 0) & (shifted < w.shape[0])
    pad = module.padding_idx
    pad = pad - start if pad is not None and 0 <= pad - start < w.shape[0] else None
    out = F.embedding(shifted.clamp(0, w.shape[0] - 1), w, padding_idx=pad) * inside[..., None].to(w.dtype)
    return tp.exit(out)


def parallelize_embedding(module, tp: TPRuntime) -> None:
    distribute_parameter(module, "weight", tp.mesh, [Shard(0)])
    install_forward(module, vocab_parallel_embedding, tp)

