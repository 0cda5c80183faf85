"""`parallelize(model, dims)`: apply tp, ep, cp and FSDP2 to a built single-device model, in place.

Order (as torchtitan): tensor parallel and expert parallel first (parameters become DTensors on the
tp / ep meshes), context parallel (the mixers get their context-parallel ops), then FSDP2 per decoder
layer and at the root over the ranks that see different tokens (dp_shard x cp). The causal-LM forward
is replaced by one that knows the layout: sequence-parallel decision, cp positions, vocab-parallel
logits and loss, the next-token shift across cp slices, and losses over the global batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..config import LINEAR
from . import comm
from .context_parallel import ContextParallelOps, CPRuntime, cp_attention_forward
from .dims import ParallelConfigError, ParallelDims
from .expert_parallel import EPRuntime, check_ep, expert_rules, moe_forward
from .loss import RoutingStats, global_sum, routing_statistics, vocab_parallel_cross_entropy
from .tensor_parallel import (
    TPRuntime, check_tp, distribute_parameter, install_forward, local, local_views_forward, parallelize_embedding,
    parallelize_final_norm, parallelize_gated_attention, parallelize_gated_deltanet, parallelize_lm_head,
    parallelize_mlp, parallelize_moe_params, parallelize_norm, shard_offset,
)
from ..model import CausalLMOutput


@dataclass
class Runtime:
    """A parallelized model's layout (kept as `model.parallel`)."""

    dims: ParallelDims
    tp: TPRuntime
    ep: EPRuntime
    cp: CPRuntime
    batch_group: object  # the group over which ranks see different tokens (dp_shard x cp), or None

    def recompute_contexts(self):
        """`torch.utils.checkpoint`'s `context_fn`: a layer recomputed in the backward sees the state of
        the forward call it belongs to (sequence parallel or not, cp lengths and documents), not that
        of the last call (a batch may take two calls before its backward)."""
        saved = (self.tp.sp, self.cp.sizes, self.cp.documents, self.cp.continues)

        @contextlib.contextmanager
        def recompute():
            now = (self.tp.sp, self.cp.sizes, self.cp.documents, self.cp.continues)
            self.tp.sp, self.cp.sizes, self.cp.documents, self.cp.continues = saved
            try:
                yield
            finally:
                self.tp.sp, self.cp.sizes, self.cp.documents, self.cp.continues = now

        return contextlib.nullcontext(), recompute()


@dataclass
class LossTerms:
    """The sums over every rank's tokens behind one forward call's losses. Those of calls on disjoint
    tokens add up and give the losses of all of them together (e.g. a training step's)."""

    ce_sum: torch.Tensor  # next-token cross-entropy summed over the predicted tokens (differentiable)
    targets: torch.Tensor  # how many tokens were predicted
    routing: RoutingStats | None  # None without MoE layers

    def __add__(self, other: "LossTerms") -> "LossTerms":
        routing = None if self.routing is None else self.routing + other.routing
        return LossTerms(self.ce_sum + other.ce_sum, self.targets + other.targets, routing)

    def cross_entropy(self) -> torch.Tensor:
        return self.ce_sum / self.targets


@dataclass
class ParallelCausalLMOutput(CausalLMOutput):
    """`CausalLMOutput` plus, when labels are given, the loss's `LossTerms`."""

    terms: LossTerms | None = None


def layout_errors(config, tp: int, ep: int) -> list[str]:
    """Every reason `config`'s heads and experts cannot be split tp and ep ways (empty: they can)."""
    return check_tp(config, tp, ep) + check_ep(config, ep)


def check(config, dims: ParallelDims) -> None:
    """Raise ParallelConfigError listing every reason `config` cannot run under `dims`."""
    errors = layout_errors(config, dims.tp, dims.ep)
    if errors:
        raise ParallelConfigError(f"cannot parallelize with {dims}:\n  - " + "\n  - ".join(errors))


def parallelize(model, dims: ParallelDims, *, param_dtype: torch.dtype | None = torch.bfloat16,
                reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True):
    """Shard `model` (a Qwen3NextForCausalLM on this rank's device) over `dims` in place and return it.

    Every rank must hold the same initial weights (same seed, or the same checkpoint). Or, for a model
    larger than one device: build it on the meta device, parallelize it, then materialise only this
    rank's shards (`materialize.build_sharded`) and fill them with `materialize.fill_seeded`,
    `materialize.fill_from_checkpoint` or `distributed.checkpoint.load(...)`. Parameters keep their
    names; sharded ones are DTensors.
    Under FSDP (dp_shard * cp > 1) the forward computes in `param_dtype` and gradients reduce in
    `reduce_dtype` (None: the parameters' own dtype).
    With every dim 1 the model is returned untouched.
    """
    if not dims.enabled:
        return model
    if getattr(model, "parallel", None) is not None:
        raise ParallelConfigError("this model is already parallelized")
    config = model.config
    check(config, dims)
    ep = EPRuntime(dims.submesh("ep"), shares_tokens=not dims.ep_in_dp, replica_group=dims.group("expert_dp"))
    rt = Runtime(dims, TPRuntime(dims.submesh("tp")), ep, CPRuntime(dims.group("cp")), dims.group("dp_shard_cp"))
    tp, ep, cp = rt.tp, rt.ep, rt.cp
    for layer in model.model.layers:
        mixer, prefix = (layer.linear_attn, "linear_attn.") if layer.layer_type == LINEAR else (layer.self_attn, "self_attn.")
        if cp.size > 1 and layer.layer_type == LINEAR:
            mixer.ops = ContextParallelOps(cp)
        elif cp.size > 1:  # innermost: tensor parallelism wraps it
            install_forward(mixer, cp_attention_forward, cp)
        rules = {}  # the layer's DTensor parameters -> their local views, put in place for its forward
        if tp.size > 1:
            for norm in ("input_layernorm", "post_attention_layernorm"):
                rules.update(_prefixed(f"{norm}.", parallelize_norm(getattr(layer, norm), tp)))
            parallelize_mixer = parallelize_gated_deltanet if layer.layer_type == LINEAR else parallelize_gated_attention
            rules.update(_prefixed(prefix, parallelize_mixer(mixer, tp)))
            if not layer.is_moe:
                rules.update(_prefixed("mlp.", parallelize_mlp(layer.mlp, tp)))
        if layer.is_moe and (tp.size > 1 or ep.size > 1):
            if tp.size > 1:
                rules.update(_prefixed("mlp.", parallelize_moe_params(layer.mlp, tp, expert_tp=ep.size == 1)))
            if ep.size > 1:
                mesh, placements = (dims.submesh("ep", "tp"), [Shard(0), Replicate()]) if tp.size > 1 else (ep.mesh, [Shard(0)])
                for name in ("experts.gate_up_proj", "experts.down_proj"):
                    distribute_parameter(layer.mlp, name, mesh, placements)
                rules.update(_prefixed("mlp.", expert_rules(tp, ep)))
            install_forward(layer.mlp, moe_forward, tp, ep)
        if rules:
            install_forward(layer, local_views_forward, rules)
    if tp.size > 1:
        parallelize_embedding(model.model.embed_tokens, tp)
        parallelize_final_norm(model.model.norm, tp)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        parallelize_lm_head(model.lm_head, tp, config.tie_word_embeddings)
    install_forward(model, causal_lm_forward, rt)
    if rt.batch_group is not None:
        # under ep_in_dp the experts are sharded by ep over ranks FSDP shards over too: FSDP leaves them
        experts = ({p for layer in model.model.layers if layer.is_moe for p in layer.mlp.experts.parameters()}
                   if dims.ep_in_dp and ep.size > 1 else set())
        _fully_shard(model, dims.submesh("dp_shard_cp"), param_dtype, reduce_dtype, reshard_after_forward,
                     ignored=experts)
    model.parallel = rt
    return model


def _prefixed(prefix: str, rules: dict) -> dict:
    return {prefix + name: rule for name, rule in rules.items()}


def _fully_shard(model, mesh, param_dtype, reduce_dtype, reshard_after_forward, ignored: set) -> None:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored)
    # the root (embeddings, final norm, lm_head) stays unsharded until its backward: its output is a
    # dataclass, which FSDP does not hook to all-gather again before the backward (torch 2.11 frees it)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=ignored)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # the loss is already the global mean: gradients sum over the batch ranks
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


# --------------------------------------------------------------------------------------------- forward
def causal_lm_forward(model, inner, rt: Runtime, input_ids, attention_mask=None, position_ids=None, labels=None,
                      cache=None, cu_seqlens=None, logits_to_keep: int = 0):
    """`Qwen3NextForCausalLM.forward`'s contract (replacing `inner`) on this rank's part of the batch.

    `logits`: this rank's rows and sequence part; under tp, with labels (training) a DTensor sharded on
    the vocab (`.full_tensor()` gathers it), without labels the whole logits. `loss` and `aux_loss`: one process's values on the global
    batch (every rank holds them), and `terms` their sums (`LossTerms`). Under cp, labels are this
    rank's slice of the labels (cut like the inputs); the next-token target across a slice boundary
    comes from the next rank; packed documents are given by the whole row's `cu_seqlens` (B = 1).
    """
    config = model.config
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    tp, cp = rt.tp, rt.cp
    whole = None if cu_seqlens is None else cu_seqlens.to(input_ids.device)  # the row's document offsets
    ends = None if whole is None else whole[1:] - 1  # each document's last position in this part of the row
    if cp.size > 1:
        if cache is not None or position_ids is not None:
            raise ValueError("context parallelism takes plain or packed sequences: no cache or position_ids")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("context parallelism does not support padding (attention_mask with zeros)")
        attention_mask = None
        sizes = comm.gather_sizes(T, cp.group)
        reach = config.linear_conv_kernel_dim - 1
        if min(sizes) < max(reach, 1):
            raise ParallelConfigError(
                f"context-parallel slices of {sizes} tokens: each needs at least {max(reach, 1)} (the causal "
                f"conv reads the previous {reach} tokens, kernel {config.linear_conv_kernel_dim}); use a longer "
                "sequence or a smaller cp")
        cu_seqlens = cp.start(sizes, whole)  # this slice's own document offsets
        pos = torch.arange(T, device=input_ids.device) + cp.offset
        position_ids = (pos if whole is None else pos - whole[cp.documents[pos]])[None].expand(B, T)
        ends = None if ends is None else ends - cp.offset
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must match input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
    if labels is not None and logits_to_keep:
        raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")

    # all tokens of this rank's rows and sequence part (the final norm gathers the sequence-parallel pieces)
    hidden, router_logits = model.model(input_ids, attention_mask, position_ids, cache, cu_seqlens)
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    head = model.lm_head.weight
    logits = F.linear(hidden, local(head))
    vocab_start = shard_offset(head, 0) if isinstance(head, DTensor) else 0

    aux_loss = routing = None
    token_groups = [rt.batch_group] + ([tp.group] if tp.sp else [])
    if router_logits:
        token_mask = None if attention_mask is None else attention_mask[:, attention_mask.shape[1] - T :]
        if token_mask is not None and tp.sp:
            token_mask = token_mask.tensor_split(tp.size, dim=1)[tp.rank]
        routing = routing_statistics(router_logits, config.num_experts_per_tok,
                                     None if token_mask is None else token_mask.reshape(-1), token_groups)
        aux_loss = routing.loss()
    loss = terms = None
    if labels is not None:
        targets = _next_token_targets(labels, ends, cp)
        per_token = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 vocab_start, tp.group)
        count = (targets != -100).sum().to(per_token.dtype)
        terms = LossTerms(global_sum(per_token.sum(), [rt.batch_group]), global_sum(count, [rt.batch_group]), routing)
        loss = terms.cross_entropy()
        if aux_loss is not None:
            loss = loss + config.router_aux_loss_coef * aux_loss
    if tp.size > 1 and labels is not None:  # training: keep them sharded (a DTensor gathers on demand)
        shape = (*logits.shape[:-1], config.vocab_size)
        logits = DTensor.from_local(logits, tp.mesh, [Shard(logits.dim() - 1)], run_check=False, shape=shape,
                                    stride=torch.empty(shape, device="meta").stride())
    elif tp.size > 1:
        logits = comm.gather(logits, logits.dim() - 1, tp.vocab_sizes, tp.group)
    return ParallelCausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, router_logits=tuple(router_logits),
                                  terms=terms)


def _next_token_targets(labels, ends, cp: CPRuntime):
    """targets[t] = labels[t + 1] (-100 past the end; across a cp boundary: the next rank's first label;
    with packed documents, a document's last token, at `ends` [N] in this part's positions, predicts
    nothing), as `model.causal_lm_loss`."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cp.size > 1:
        firsts = comm.all_gather_raw(labels[:, :1].contiguous(), 1, [1] * cp.size, cp.group)  # [B, cp]
        if cp.rank < cp.size - 1:
            targets[:, -1] = firsts[:, cp.rank + 1]
    if ends is not None:
        targets[0, ends[(ends >= 0) & (ends < labels.shape[1])]] = -100
    return targets
