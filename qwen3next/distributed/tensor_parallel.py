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
The computation runs on local tensors: each decoder layer runs the model's own forward with its
parameters swapped for their local views (`local_views_forward`, so the model code stays single-device
and sees plain tensors). Between blocks the
residual stream is sharded on the sequence (sequence parallel) when the sequence divides by tp (else,
e.g. while decoding one token, it is replicated): a block all-gathers its input and reduce-scatters
its output (all-reduce without SP). Replicated parameters that a rank applies to its own heads or
tokens get their gradients summed over tp inside the backward (`comm.grad_all_reduce`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

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
        self.sp = False  # set by the embedding on each forward: the sequence divides by tp
        self.vocab_sizes: list[int] = []  # every rank's number of vocab rows of the LM head

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


def local_views_forward(module, inner, rules: dict, *args, **kwargs):
    """The module's own forward with its parameters (dotted names) replaced by `rules[name](param)`,
    their local views. Installed on whole decoder layers, so that code reading a submodule's parameter
    directly (a fused residual-add + norm, say) sees the local view too."""
    views = {name: rule(module.get_parameter(name)) for name, rule in rules.items()}
    with swapped_parameters(module, views):
        return inner(*args, **kwargs)


def tp_block_forward(module, inner, tp: TPRuntime, x, *args, **kwargs):
    """A block computed piecewise by the tp ranks: all tokens in, partial sums out to the residual layout."""
    return tp.exit(inner(tp.enter(x), *args, **kwargs))


def _local_cache_forward(module, inner, view, *args, **kwargs):
    """Run a mixer whose cache argument holds all heads with the cache showing only this rank's part
    (`view(cache)`, a context manager); what the layer writes lands in the whole cache."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    cache = bound.arguments.get("cache")
    if cache is None:
        return inner(*args, **kwargs)
    with view(cache):
        return inner(*args, **kwargs)


def _attention_cache_view(heads: slice):
    @contextlib.contextmanager
    def view(cache):
        key, value = cache.key, cache.value
        cache.key, cache.value = key[:, heads], value[:, heads]
        try:
            yield
        finally:
            cache.key, cache.value = key, value
    return view


class _OnDevice:
    """An index tensor kept on the CPU and copied once to each device that asks (the model may be
    parallelized on the meta device and materialised afterwards)."""

    def __init__(self, index: torch.Tensor):
        self.copies = {torch.device("cpu"): index}

    def __call__(self, device: torch.device) -> torch.Tensor:
        if device not in self.copies:
            self.copies[device] = self.copies[torch.device("cpu")].to(device)
        return self.copies[device]


def _linear_cache_view(channels: "_OnDevice", heads: slice):
    @contextlib.contextmanager
    def view(cache):
        conv, state = cache.conv_state, cache.recurrent_state
        cache.conv_state, cache.recurrent_state = conv.index_select(1, channels(conv.device)), state[:, heads]
        try:
            yield
        finally:
            conv.index_copy_(1, channels(conv.device), cache.conv_state)
            cache.conv_state, cache.recurrent_state = conv, state
    return view


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


def parallelize_gated_deltanet(module, tp: TPRuntime) -> dict:
    """Shard a Gated DeltaNet over tp; returns its parameters' local-view rules."""
    n, r = tp.size, tp.rank
    for name in ("in_proj_qkvz.weight", "in_proj_ba.weight", "A_log", "dt_bias"):
        distribute_parameter(module, name, tp.mesh, [Shard(0)])
    distribute_parameter(module, "out_proj.weight", tp.mesh, [Shard(1)])
    for name in ("conv1d.weight", "norm.weight"):
        distribute_parameter(module, name, tp.mesh, [Replicate()])
    kd, vd = module.key_dim // n, module.value_dim // n
    channels = _OnDevice(torch.cat([torch.arange(r * kd, (r + 1) * kd), module.key_dim + torch.arange(r * kd, (r + 1) * kd),
                                    2 * module.key_dim + torch.arange(r * vd, (r + 1) * vd)]))
    module.num_k_heads //= n
    module.num_v_heads //= n
    module.key_dim, module.value_dim, module.conv_dim = kd, vd, 2 * kd + vd
    rules = {name: local for name in ("in_proj_qkvz.weight", "in_proj_ba.weight", "A_log", "dt_bias", "out_proj.weight")}
    rules["conv1d.weight"] = lambda w: tp.heads_sum(local(w)).index_select(0, channels(w.device))
    rules["norm.weight"] = lambda w: tp.heads_sum(local(w))
    install_forward(module, _local_cache_forward, _linear_cache_view(channels, slice(r * module.num_v_heads,
                                                                                   (r + 1) * module.num_v_heads)))
    install_forward(module, tp_block_forward, tp)
    return rules


def parallelize_gated_attention(module, tp: TPRuntime) -> dict:
    """Shard a gated attention layer over tp; returns its parameters' local-view rules."""
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
        kv_heads = slice(r * kv // n, (r + 1) * kv // n)
    else:  # fewer KV heads than ranks: every rank keeps them all and uses the one its query heads read
        head = r // (n // kv)
        for name in ("k_proj.weight", "v_proj.weight"):
            distribute_parameter(module, name, tp.mesh, [Replicate()])
            rules[name] = lambda w: tp.heads_sum(local(w))[head * hd : (head + 1) * hd]
        module.num_kv_heads = 1
        kv_heads = slice(head, head + 1)
    for name in ("q_norm.weight", "k_norm.weight"):
        distribute_parameter(module, name, tp.mesh, [Replicate()])
        rules[name] = lambda w: tp.heads_sum(local(w))
    module.num_heads //= n
    install_forward(module, _local_cache_forward, _attention_cache_view(kv_heads))
    install_forward(module, tp_block_forward, tp)
    return rules


def parallelize_mlp(module, tp: TPRuntime) -> dict:
    rules = _mlp_rules(module, tp.mesh)
    install_forward(module, tp_block_forward, tp)
    return rules


def parallelize_norm(module, tp: TPRuntime) -> dict:
    """A residual-stream norm (its weight meets this rank's tokens under SP)."""
    distribute_parameter(module, "weight", tp.mesh, [Replicate()])
    return {"weight": lambda w: tp.data_sum(local(w))}


def parallelize_final_norm(module, tp: TPRuntime) -> None:
    """The last norm: local weight view, then the sequence gathered back (the LM head's input)."""
    rules = parallelize_norm(module, tp)
    install_forward(module, local_views_forward, rules)
    install_forward(module, lambda m, inner, x: tp.enter(inner(x)))


def parallelize_moe_params(module, tp: TPRuntime, expert_tp: bool) -> dict:
    """Distribute a SparseMoE's parameters over tp; returns their local-view rules (the routed
    experts' only when `expert_tp`: split over tp by their intermediate dim)."""
    distribute_parameter(module, "gate.weight", tp.mesh, [Replicate()])
    distribute_parameter(module, "shared_expert_gate.weight", tp.mesh, [Replicate()])
    rules = {"gate.weight": lambda w: tp.data_sum(local(w)),  # the router meets this rank's tokens
             # the gate scales the shared expert's partial sums: its gradient is partial over tp too
             "shared_expert_gate.weight": lambda w: tp.heads_sum(local(w)),
             **_mlp_rules(module, tp.mesh, "shared_expert.")}
    if expert_tp:
        distribute_parameter(module, "experts.gate_up_proj", tp.mesh, [_StridedShard(1, split_factor=2)])
        distribute_parameter(module, "experts.down_proj", tp.mesh, [Shard(2)])
        rules.update({"experts.gate_up_proj": local, "experts.down_proj": local})
    return rules


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
    tp.sp = ids.shape[-1] % tp.size == 0  # the residual stream starts here: sequence parallel if it divides
    return tp.exit(out)


def parallelize_embedding(module, tp: TPRuntime) -> None:
    distribute_parameter(module, "weight", tp.mesh, [Shard(0)])
    install_forward(module, vocab_parallel_embedding, tp)


def vocab_parallel_head(module, inner, tp: TPRuntime, x):
    """`lm_head(x)` called directly (e.g. by generation): this rank's vocab slice, all-gathered into the
    whole logits. (The training forward uses the local slice itself: its loss never gathers.)"""
    return comm.gather(F.linear(x, local(module.weight)), x.dim() - 1, tp.vocab_sizes, tp.group)


def parallelize_lm_head(module, tp: TPRuntime, tied: bool) -> None:
    if not tied:
        distribute_parameter(module, "weight", tp.mesh, [Shard(0)])
    tp.vocab_sizes = comm.gather_sizes(local(module.weight).shape[0], tp.group)
    install_forward(module, vocab_parallel_head, tp)

