"""The Qwen3-Next model: Gated DeltaNet and gated-attention mixers, sparse-MoE FFNs, zero-centred RMSNorm.

Module and parameter names mirror Hugging Face `transformers` (`model.layers.N.linear_attn.in_proj_qkvz`,
`model.layers.N.mlp.experts.gate_up_proj`, ...), so a state dict maps one to one onto transformers'
in-memory model; `checkpoint.py` converts to and from the per-expert on-disk layout.

Conventions: activations are [B, T, D]; `attention_mask` [B, past + T] has 1 for tokens and 0 for
padding (left padding for batched generation); positions default to the count of real tokens before
each one, so a left-padded row computes exactly what it computes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from . import ops
from .config import FULL, LINEAR, Qwen3NextConfig
from .ops.packing import PaddedLayout


@dataclass
class CausalLMOutput:
    """logits [B, T', V] (T' = T or `logits_to_keep`); loss: cross-entropy (+ coef * aux) when labels are
    given; aux_loss: the load-balancing loss over all MoE layers (None without MoE layers)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] = ()


# --------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `x / rms(x) * (1 + weight)`, weight [D] initialised to 0, fp32 inside."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Plain RMSNorm (weight initialised to 1) times silu(gate), over the last dim (one value head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, gate, self.weight, self.eps)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every id lies in [0, vocab_size): one host round trip (min and max together)."""
    if input_ids.numel():
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got range [{low}, {high}]")


# --------------------------------------------------------------------------------------------- rope
class RotaryEmbedding(nn.Module):
    """cos/sin [B, T, rotary_dim] for the first `rotary_dim` dims of each head (rotate-half style).
    Holds no parameters or buffers (the frequencies are computed on first use on each device and kept
    outside the state dict), so a model built on the meta device needs nothing re-initialised."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.theta = config.rope_theta
        self._inv_freq = {}  # device -> fp32 [rotary_dim]: the frequencies, repeated for both halves

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """theta^(-2i / rotary_dim) for i < rotary_dim / 2, twice over (fp32 [rotary_dim]); kept per device
        except while a CUDA graph is being captured (a tensor made then holds nothing until a replay)."""
        if device in self._inv_freq:
            return self._inv_freq[device]
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        inv_freq = (1.0 / (self.theta**exponents)).repeat(2)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            self._inv_freq[device] = inv_freq
        return inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.is_floating_point():
            position_ids = position_ids.float()
        emb = position_ids[..., None] * self.inv_freq(position_ids.device)  # integer positions promote to fp32
        return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------------------------- mixers
class GatedDeltaNet(nn.Module):
    """Linear-attention mixer: projections, causal conv + SiLU, L2-normed q/k, the gated delta rule,
    gated RMSNorm, output projection (SPEC section 3).

    The layer calls its operations through `self.ops` (the `qwen3next.ops` module): a layer that is
    parallelized from outside (context parallelism) gets its own ops object with the same functions."""

    ops = ops

    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = config.linear_key_dim
        self.value_dim = config.linear_value_dim
        self.conv_dim = config.linear_conv_dim
        self.chunk_size = config.linear_attention_chunk_size
        self.use_recurrent = config.linear_attention_use_recurrent
        self.clip_val = config.linear_attention_clip_val
        D = config.hidden_size
        self.in_proj_qkvz = nn.Linear(D, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(D, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=config.linear_conv_kernel_dim, groups=self.conv_dim,
            padding=config.linear_conv_kernel_dim - 1, bias=False,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, D, bias=False)

    def split_projections(self, qkvz: torch.Tensor):
        """The fused projection qkvz [B, T, Hk * (2 dk + 2 r dv)] (grouped per key head) -> (the conv's input
        [B, T, 2 Hk dk + Hv dv]: all q, then all k, then all v channels; z [B, T, Hv, dv]): `ops.split_qkvz`,
        for a decode step (over a prompt, `ops.qkvz_causal_conv1d` splits and convolves at once).
        (in_proj_ba's output goes to `gates`.)"""
        return self.ops.split_qkvz(qkvz, self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def split_mixed(self, mixed: torch.Tensor):
        """The conv output [B, T, 2 Hk dk + Hv dv] -> q, k [B, T, Hk, dk], v [B, T, Hv, dv]."""
        B, T, _ = mixed.shape
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.reshape(B, T, self.num_k_heads, self.head_k_dim), k.reshape(B, T, self.num_k_heads, self.head_k_dim),
                v.reshape(B, T, self.num_v_heads, self.head_v_dim))

    def gates(self, ba: torch.Tensor, token_mask=None):
        """in_proj_ba's output [B, T, Hk * 2r] -> (beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias))
        [B, T, Hv], fp32 (fp64 in an fp64 model), one fused op; a padding step (token_mask 0) gets
        beta = g = 0, which leaves the state unchanged."""
        beta, g = self.ops.gdn_gates(ba, self.A_log, self.dt_bias, self.num_k_heads, self.clip_val)
        if token_mask is not None:
            beta, g = beta * token_mask[..., None], g * token_mask[..., None]
        return beta, g

    def forward(self, x, token_mask=None, cache=None, cu_seqlens=None):
        """x [B, T, D]; token_mask [B, T] (0 = padding: the step leaves the state untouched) or None;
        cache: this layer's `LinearLayerCache` (read and updated) or None; cu_seqlens: packed rows."""
        B, T, _ = x.shape
        if token_mask is not None:
            x = x * token_mask[..., None].to(x.dtype)
        qkvz = self.in_proj_qkvz(x)
        weight = self.conv1d.weight.squeeze(1)  # [C, K]
        conv_state = cache.conv_state if cache is not None and cache.filled else None
        recurrent_state = cache.recurrent_state if cache is not None and cache.filled else None
        if cache is not None and T == 1 and conv_state is not None:
            mixed, z = self.split_projections(qkvz)
            mixed = self.ops.causal_conv1d_update(mixed[:, 0], conv_state, weight).unsqueeze(1)
        else:  # z [B, T, Hk, r, dv]: on the GPU a view of qkvz, the conv reading q, k, v from it in place
            mixed, z, new_conv_state = self.ops.qkvz_causal_conv1d(
                qkvz, weight, self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                initial_state=conv_state, output_final_state=cache is not None, cu_seqlens=cu_seqlens,
            )
            if cache is not None:
                cache.conv_state.copy_(new_conv_state)
        q, k, v = self.split_mixed(mixed)
        beta, g = self.gates(self.in_proj_ba(x), token_mask)

        recurrent = T == 1 or self.use_recurrent
        rule = self.ops.fused_recurrent_gated_delta_rule if recurrent else self.ops.chunk_gated_delta_rule
        o, final_state = rule(
            q, k, v, g, beta, initial_state=recurrent_state, output_final_state=cache is not None,
            use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens,
        )
        if cache is not None:
            cache.recurrent_state.copy_(final_state)
            cache.filled = True
        o = self.norm(o.reshape(z.shape), z)
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def decode_step(self, x, cache, state_indices):
        """One token per row with no host synchronisation (CUDA-graph safe): x [B, 1, D]; cache: this layer's
        filled `LinearLayerCache`, whose conv state and recurrent state (a pool, rows `state_indices` [B]
        int32) are updated in place. Returns [B, 1, D]."""
        B = x.shape[0]
        mixed, z = self.split_projections(self.in_proj_qkvz(x))
        mixed = self.ops.causal_conv1d_update(mixed[:, 0], cache.conv_state, self.conv1d.weight.squeeze(1))
        q, k, v = self.split_mixed(mixed.unsqueeze(1))
        beta, g = self.gates(self.in_proj_ba(x))
        o = self.ops.recurrent_gated_delta_rule_update(
            q, k, v, g, beta, cache.recurrent_state, state_indices, use_qk_l2norm_in_kernel=True
        )
        o = self.norm(o, z)
        return self.out_proj(o.reshape(B, 1, self.value_dim))


class GatedAttention(nn.Module):
    """Softmax attention with q/k zero-centred RMSNorm, partial RoPE, GQA and a sigmoid output gate."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        D, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * hd * 2, bias=bias)  # per head: query (hd) then gate (hd)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=bias)
        self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps)

    def project(self, x, cos, sin):
        """x [B, T, D] -> query [B, H, T, hd], key, value [B, Hkv, T, hd] (normed, rotated) and the output
        gate [B, T, H, hd] (a view of q_proj's output)."""
        B, T, _ = x.shape
        hd = self.head_dim
        query, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * hd).chunk(2, dim=-1)
        query = ops.rms_norm_rotary(query, self.q_norm.weight, cos, sin, self.q_norm.eps).transpose(1, 2)
        key = self.k_proj(x).view(B, T, self.num_kv_heads, hd)
        key = ops.rms_norm_rotary(key, self.k_norm.weight, cos, sin, self.k_norm.eps).transpose(1, 2)
        value = self.v_proj(x).view(B, T, self.num_kv_heads, hd).transpose(1, 2)
        return query, key, value, gate

    def output(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, T, hd] times sigmoid(gate [B, T, H, hd]), through o_proj."""
        B, _, T, _ = out.shape
        return self.o_proj(ops.sigmoid_gate(out.transpose(1, 2), gate).reshape(B, T, -1))

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        """x [B, T, D]; cos/sin [B, T, r]; attn_mask: bool [B, 1, T, S] (True = attend), a
        `torch.nn.attention.bias.CausalBias` (causal, aligned to the last key), a `PaddedLayout` of the
        sequences packed in a row (B = 1: causal within each) or None for plain causal;
        cache: this layer's `AttentionLayerCache` or None. S = cached length + T."""
        T = x.shape[1]
        query, key, value, gate = self.project(x, cos, sin)
        if cache is not None:
            key, value = cache.append(key, value)
        packed = attn_mask if isinstance(attn_mask, PaddedLayout) else None
        if packed is not None:  # the sequences as rows of a padded batch, plain causal: no [T, T] mask
            query, key, value = (packed.pad(t.transpose(1, 2)).transpose(1, 2) for t in (query, key, value))
            attn_mask = None
        if isinstance(attn_mask, CausalBias):  # its dispatch comes before autocast's casts: make them here
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
            query, key, value = (t.to(dtype) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5, enable_gqa=True,
        )
        if packed is not None:
            out = packed.unpad(out.transpose(1, 2)).transpose(1, 2)
        return self.output(out, gate)

    def decode_step(self, x, cos, sin, cache, slot, key_mask):
        """One token per row with no host synchronisation (CUDA-graph safe): x [B, 1, D]; cos/sin [B, 1, r];
        the new key/value go to position `slot` ([1] int64 tensor) of the preallocated `cache` in place;
        attention runs over all its positions under `key_mask` (bool [B, max_length], True = attend; the
        caller marks the slot). Returns [B, 1, D]."""
        B = x.shape[0]
        query, key, value, gate = self.project(x, cos, sin)
        cache.key.index_copy_(2, slot, key)
        cache.value.index_copy_(2, slot, value)
        # one query position: the query heads of a KV group are rows of one attention problem
        grouped = query.reshape(B, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            grouped, cache.key, cache.value, attn_mask=key_mask[:, None, None, :], scale=self.head_dim**-0.5
        )
        return self.output(out.reshape(B, self.num_heads, 1, self.head_dim), gate)


# --------------------------------------------------------------------------------------------- FFNs
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Router weight [E, D] (state-dict name `mlp.gate.weight`)."""

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))


class Experts(nn.Module):
    """All experts' SwiGLU weights stacked: gate_up_proj [E, 2I, D] (gate rows, then up rows), down_proj [E, D, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoE(nn.Module):
    """Top-k routed experts plus a sigmoid-gated shared expert (SPEC section 5)."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Router(config.num_experts, config.hidden_size)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (y [B, T, D], router logits [B*T, E])."""
        flat = x.reshape(-1, x.shape[-1])
        # routing first, so that the host reaches the expert GEMMs' launches soonest; the shared expert after
        router_logits = F.linear(flat, self.gate.weight)
        weights, ids = ops.route(router_logits, self.top_k, self.norm_topk_prob)
        routed = ops.moe_experts(flat, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        shared = self.shared_expert(flat)
        out = ops.sigmoid_gate(shared, self.shared_expert_gate(flat), routed)
        return out.view_as(x), router_logits


# --------------------------------------------------------------------------------------------- stack
class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == LINEAR:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = SparseMoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, ctx: "_ForwardContext", cache=None, pending=None):
        """The residual stream is x + pending [B, T, D] (pending: the previous layer's FFN output, None at the
        first layer), its add fused into this layer's first norm. Returns (the stream before this layer's FFN
        output, that output, the router logits or None): the caller adds the two, or hands them on."""
        x, h = self.norm_input(x, pending)
        if self.layer_type == LINEAR:
            h = self.linear_attn(h, ctx.token_mask, cache, ctx.cu_seqlens)
        else:
            h = self.self_attn(h, ctx.cos, ctx.sin, ctx.attn_mask, cache)
        return self.ffn(x, h)

    def decode_step(self, x, step: "DecodeInputs", cache, pending=None):
        """The graph-safe one-token step (see `GatedDeltaNet.decode_step`, `GatedAttention.decode_step`);
        x, pending and the result as in `forward`, less the router logits."""
        x, h = self.norm_input(x, pending)
        if self.layer_type == LINEAR:
            h = self.linear_attn.decode_step(h, cache, step.state_indices)
        else:
            h = self.self_attn.decode_step(h, step.cos, step.sin, cache, step.slot, step.key_mask)
        return self.ffn(x, h)[:2]

    def norm_input(self, x, pending):
        """(s, input_layernorm(s)) with s = x + pending (x alone when pending is None): one fused op."""
        if pending is None:
            return x, self.input_layernorm(x)
        norm = self.input_layernorm
        return ops.add_rms_norm(x, pending, norm.weight, norm.eps)

    def ffn(self, x, h):
        """With s = x + h (the mixer's output added to the residual stream): (s, FFN(post_attention_layernorm(s)),
        the router logits or None for a dense MLP); the add and the norm are one fused op, and the FFN's
        output is left for the next layer's first norm to add."""
        norm = self.post_attention_layernorm
        x, h = ops.add_rms_norm(x, h, norm.weight, norm.eps)
        h = self.mlp(h)
        router_logits = None
        if self.is_moe:
            h, router_logits = h
        return x, h, router_logits


@dataclass
class DecodeInputs:
    """What every layer of a graph-safe decode step shares (all device tensors of fixed shape)."""

    cos: torch.Tensor  # [B, 1, r]
    sin: torch.Tensor
    slot: torch.Tensor  # [1] int64: cache position of the new token
    key_mask: torch.Tensor  # bool [B, max_length]
    state_indices: torch.Tensor  # [B] int32: rows of the linear layers' recurrent-state pools


@dataclass
class _ForwardContext:
    """What every layer of one forward call shares: rope tables, masks, packing offsets."""

    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | PaddedLayout | None  # bool [B, 1, T, S], packed sequences or None (plain causal)
    token_mask: torch.Tensor | None  # [B, T] float, None when there is no padding
    cu_seqlens: torch.Tensor | None


class Qwen3NextModel(nn.Module):
    """Embedding, decoder layers, final norm. Returns hidden states [B, T, D] and the router logits."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, cu_seqlens=None):
        B, T = input_ids.shape
        check_token_ids(input_ids, self.config.vocab_size)
        past = cache.seq_length if cache is not None else 0
        position_ids, attn_mask, token_mask, cu_seqlens = self._positions_and_masks(
            B, T, past, attention_mask, position_ids, cu_seqlens, input_ids.device
        )
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        ctx = _ForwardContext(cos, sin, attn_mask, token_mask, cu_seqlens)
        router_logits, pending = [], None
        for i, layer in enumerate(self.layers):
            x, pending, logits = layer(x, ctx, cache.layers[i] if cache is not None else None, pending)
            if logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(T)
        return self.norm(x + pending), router_logits

    def decode_step(self, input_ids, position_ids, cache, slot, key_mask, state_indices):
        """One token per row, graph-safe (static shapes, no host synchronisation, cache updated in place).

        input_ids, position_ids [B, 1] (int64); cache: a filled `HybridCache` of B rows; slot [1] int64: the
        cache position of the new token; key_mask bool [B, max_length]: which cache positions each row
        attends to (the slot is marked here, in place); state_indices [B] int32: each row's recurrent-state
        row (arange(B) for the cache's own rows). Returns the final-normed hidden states [B, 1, D]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        key_mask.index_fill_(1, slot, True)
        step = DecodeInputs(cos, sin, slot, key_mask, state_indices)
        pending = None
        for layer, layer_cache in zip(self.layers, cache.layers):
            x, pending = layer.decode_step(x, step, layer_cache, pending)
        return self.norm(x + pending)

    def _positions_and_masks(self, B, T, past, attention_mask, position_ids, cu_seqlens, device):
        """Positions [B, T], the attention mask (bool [B, 1, T, S], a `PaddedLayout` of packed sequences or
        None), the token mask for the linear layers ([B, T] or None) and the packing offsets, for this call.
        Positions count the real tokens before each token (so left padding does not shift them) and
        restart at every packed sequence."""
        S = past + T
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(
                    f"attention_mask must be [batch, cached + new tokens] = {(B, S)}; got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None
        if cu_seqlens is not None:
            if B != 1 or past:
                raise ValueError("cu_seqlens packs sequences into one row without a cache: batch size must be 1")
            if attention_mask is not None:
                raise ValueError("pass either cu_seqlens or an attention_mask with padding, not both")
            cu_seqlens = cu_seqlens.to(device)
        if position_ids is None:
            if cu_seqlens is not None:
                doc = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=device), right=True)
                position_ids = (torch.arange(T, device=device) - cu_seqlens[doc])[None]
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=device)[None].expand(B, T)
        elif position_ids.shape[-1] != T:
            raise ValueError(f"position_ids must have {T} positions, got shape {tuple(position_ids.shape)}")

        attn_mask = None
        packed = PaddedLayout.from_offsets(cu_seqlens) if cu_seqlens is not None else None
        if packed is not None and packed.work <= T * T:
            # attention runs the sequences as a padded batch [N, L]: no [T, T] mask, N L^2 <= T^2 scores
            attn_mask = packed
        elif attention_mask is None and past and T > 1 and device.type == "cuda":
            # a chunk continuing a cache: causal aligned to the last key, which flash attention runs
            # without materialising a [T, S] mask
            attn_mask = causal_lower_right(T, S)
        elif attention_mask is not None or packed is not None or (past and T > 1):
            # a dense mask; for packed sequences of very unequal lengths (one long, many short) it is
            # less work than padding every sequence to the longest
            q_pos = torch.arange(past, S, device=device)
            allowed = q_pos[:, None] >= torch.arange(S, device=device)[None, :]  # causal [T, S]
            if packed is not None:
                doc = torch.searchsorted(cu_seqlens[1:], q_pos, right=True)
                allowed = allowed & (doc[:, None] == doc[None, :])
            allowed = allowed[None].expand(B, T, S)
            if attention_mask is not None:
                # a padding query would see no key at all: let it see itself (its output is never used)
                allowed = allowed & (attention_mask[:, None, :] | (q_pos[:, None] == torch.arange(S, device=device))[None])
            attn_mask = allowed[:, None]
        token_mask = attention_mask[:, past:].float() if attention_mask is not None else None
        return position_ids, attn_mask, token_mask, cu_seqlens


class Qwen3NextForCausalLM(nn.Module):
    """Qwen3NextModel plus the LM head, the loss and the load-balancing loss.

    `model(input_ids, attention_mask=None, position_ids=None, labels=None)`: labels [B, T] aligned with
    input_ids (shifted inside; -100 ignored). Loss = mean cross-entropy + router_aux_loss_coef * aux.
    """

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as transformers does, so a fresh model trains like the reference."""
        for module in self.modules():
            init_module(module, self.config.initializer_range)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, labels=None, cache=None, cu_seqlens=None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, cached + T]; position_ids [B, T]; labels [B, T];
        cache: a `HybridCache` to continue from and update; cu_seqlens [N+1]: N documents packed in a
        row of B = 1 (no state or attention crosses a boundary, and no token is trained to predict the
        next document's first token); logits_to_keep: if > 0, logits of the last that many positions only."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        hidden, router_logits = self.model(input_ids, attention_mask, position_ids, cache, cu_seqlens)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        aux_loss = None
        if router_logits:
            token_mask = None
            if attention_mask is not None:
                token_mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1] :].reshape(-1)
            aux_loss = ops.load_balancing_loss(router_logits, self.config.num_experts_per_tok, token_mask)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must match input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
            loss = causal_lm_loss(logits, labels, cu_seqlens)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, router_logits=tuple(router_logits))

    def decode_step(self, input_ids, position_ids, cache, slot, key_mask, state_indices) -> torch.Tensor:
        """`Qwen3NextModel.decode_step` through the LM head: logits [B, V] of the one new token per row."""
        hidden = self.model.decode_step(input_ids, position_ids, cache, slot, key_mask, state_indices)
        return self.lm_head(hidden[:, 0])

    # checkpoint I/O lives in checkpoint.py; these are the conventional entry points
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Qwen3NextForCausalLM":
        """Load a Hugging Face-layout checkpoint directory (see `qwen3next.checkpoint.load_model`)."""
        from .checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, directory, max_shard_size="5GB") -> None:
        """Write the Hugging Face layout (see `qwen3next.checkpoint.save_model`)."""
        from .checkpoint import save_model

        save_model(self, directory, max_shard_size=max_shard_size)

    def generate(self, input_ids, **kwargs):
        """Autoregressive generation; see `qwen3next.generate.generate` for the arguments."""
        from .generate import generate

        return generate(self, input_ids, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def init_module(module: nn.Module, std: float) -> None:
    """Initialise `module`'s own parameters (not its children's) as `init_weights` does, drawing from the
    default generator in the same order (`distributed.materialize` replays it one module at a time)."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, RMSNorm):
        module.weight.zero_()
    elif isinstance(module, GatedRMSNorm):
        module.weight.fill_(1.0)
    elif isinstance(module, GatedDeltaNet):
        module.dt_bias.fill_(1.0)
        module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0.01, 16).log())
    elif isinstance(module, (Router, Experts)):
        for p in module.parameters(recurse=False):
            p.normal_(0.0, std)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; -100 is ignored; with packed
    documents, a document's last token predicts nothing."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cu_seqlens is not None:
        # an empty first document gives -1: the row's last position, already -100
        targets[0, cu_seqlens[1:].to(labels.device) - 1] = -100
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def count_parameters(config: Qwen3NextConfig) -> dict[str, int]:
    """Total and active-per-token parameter counts, computed from the config (no model is built)."""
    D, V = config.hidden_size, config.vocab_size
    total = V * D * (1 if config.tie_word_embeddings else 2) + D  # embeddings, lm_head, final norm
    active = total
    for i, kind in enumerate(config.layer_types):
        layer = 2 * D
        if kind == LINEAR:
            layer += D * (2 * config.linear_key_dim + 2 * config.linear_value_dim) + D * 2 * config.linear_num_value_heads
            layer += config.linear_conv_dim * config.linear_conv_kernel_dim + 2 * config.linear_num_value_heads
            layer += config.linear_value_head_dim + config.linear_value_dim * D
        else:
            hd = config.head_dim
            layer += D * config.num_attention_heads * hd * 3 + 2 * D * config.num_key_value_heads * hd + 2 * hd
        if config.is_moe_layer(i):
            per_expert = 3 * D * config.moe_intermediate_size
            common = config.num_experts * D + 3 * D * config.shared_expert_intermediate_size + D
            total += layer + common + config.num_experts * per_expert
            active += layer + common + config.num_experts_per_tok * per_expert
        else:
            dense = 3 * D * config.intermediate_size
            total += layer + dense
            active += layer + dense
    return {"total": total, "active": active}


def cache_bytes_per_sequence(config: Qwen3NextConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Decode-cache bytes for one sequence: linear layers hold a constant conv state (activation dtype)
    and an fp32 recurrent state; attention layers hold K and V growing by `per_token` bytes a token."""
    n_linear = sum(t == LINEAR for t in config.layer_types)
    n_full = sum(t == FULL for t in config.layer_types)
    conv = config.linear_conv_dim * (config.linear_conv_kernel_dim - 1) * dtype_bytes
    rec = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    per_token = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    return {"linear_constant": n_linear * (conv + rec), "attention_per_token": n_full * per_token,
            "per_linear_layer": conv + rec, "per_attention_layer_per_token": per_token}
