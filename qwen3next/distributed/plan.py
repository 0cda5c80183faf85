"""Per-GPU memory and per-layer communication of a parallel layout, from the config alone (no GPU).

Conventions (what `parallelize` does; AdamW training, bf16 compute, fp32 master weights, no
activation checkpointing, one micro-batch of `batch` rows of `seq_len` tokens per dp_shard rank):

  t  = batch * seq_len / cp                    tokens a GPU's residual stream carries (before SP)
  Parameters: a tensor's share on one GPU is its size / (the tp or ep ways it is sharded) / F,
      F = dp_shard * cp (FSDP2 shards everything over the ranks that see different tokens).
      tp shards: GDN in_proj_qkvz, in_proj_ba, out_proj, A_log, dt_bias; attention q_proj, o_proj
      (k/v_proj when tp divides the KV heads); shared expert and dense MLP; embed_tokens, lm_head.
      ep shards the routed experts (E / ep each); with ep = 1, tp splits them (expert TP). With ep_in_dp
      (ep's ranks are dp_shard ranks) FSDP leaves the experts: E / ep each, replicated over F / ep.
      Replicated: norms, router, shared_expert_gate, conv1d, KV projections when tp > KV heads.
  Memory per GPU: master weights 4 B, gradients 4 B, AdamW m and v 8 B per local parameter (half of
      each with states="bf16": bf16 master weights and optimizer states); plus the FSDP all-gather
      buffers: 2 B x (two layers' unsharded-over-F parameters: current + prefetch).
  Activations per GPU (bf16 unless noted), per layer, what the backward keeps:
      residual stream: 4 D per token (block inputs and normed inputs), / tp under SP;
      GDN (local heads = / tp): qkvz + ba, conv input and output, o and normed o:
          2Kd + 2Vd + 2Hv + 2 C_conv + 2 Vd; fp32: normed q, k (2 Kd), the chunk rule's u, w
          (Hv (dk + dv)) and its within-chunk matrices (2 Hv c), c = chunk size;
      attention: q and gate, k, v, rotated q, k, output, gated output: (4 H + 3 Hkv) hd / tp;
      MoE: router logits E (fp32, per residual token); per routed (token, expert) pair on this GPU
          (t k / ep pairs; t k under ep_in_dp): its input D and gate/up/act 3 I / tp_e (tp_e = tp with
          expert TP, else 1);
          shared expert: t (D + 3 Is / tp) (its input is gathered: all t tokens);
      logits: t V / tp in bf16 and fp32 (the loss's exp).
      With activation checkpointing (`recompute`, the trainer's --activation-checkpointing): each layer
      keeps only its input (2 t D / tp bytes) and one layer at a time holds the above.
  Communication: bytes sent per GPU per step, forward + backward, ring collectives (all-gather or
  reduce-scatter of an X-byte whole: X (n - 1) / n; all-to-all: the fraction (n - 1) / n of the rows):
      TP + SP: each block (mixer, FFN) all-gathers its input and reduce-scatters its output, and the
          backward does the converse: 4 x 2 t D (tp - 1) / tp per block, 2 blocks per layer;
      EP: a token goes once to each rank holding any of its k experts, v = ep (1 - (1 - 1/ep)^k) ranks
          on average (uniform routing), and comes back as one row: out and back, forward and backward,
          4 x 2 (t' / ep) v D (ep - 1) / ep, plus the all-gather of the outputs over ep and its backward:
          2 x 2 t' D (ep - 1) / ep (t' = t / tp under SP); under ep_in_dp every rank sends its own t'
          tokens (4 x 2 t' v D (ep - 1) / ep) and gathers nothing;
      CP: GDN all-gathers each rank's affine state map (fp32, b (Hv / tp) dk (dk + dv) per rank) and
          reduce-scatters its gradient: 2 (cp - 1) x that; attention all-gathers K and V (the whole
          sequence, local KV heads) and reduce-scatters their gradients: 2 x 2 x 2 S b Hkv' hd (cp - 1) / cp;
      FSDP: all-gather bf16 parameters in forward and again in backward, reduce-scatter fp32
          gradients: (2 + 2 + 4) P (F - 1) / F bytes, P = the layer's parameters on this tp/ep rank (the
          experts' too, except under ep_in_dp: their fp32 gradients are all-reduced over the R = F / ep
          ranks that hold the same experts, 2 x 4 P_e (R - 1) / R, counted in this column).
These are estimates of the dominant terms, meant to compare layouts before renting GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LINEAR, Qwen3NextConfig


@dataclass
class Layout:
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    seq_len: int = 4096
    batch: int = 1
    states: str = "fp32"  # master weights, gradients, AdamW m and v: "fp32" (16 B/param) or "bf16" (8 B/param)
    recompute: bool = False  # activation checkpointing per decoder layer
    ep_in_dp: bool = False  # ep's ranks are dp_shard ranks (ParallelDims.ep_in_dp)

    @property
    def gpus(self) -> int:
        return self.dp_shard * self.tp * self.cp * (1 if self.ep_in_dp else self.ep)

    @property
    def experts_outside_fsdp(self) -> bool:
        return self.ep_in_dp and self.ep > 1

    def __str__(self) -> str:
        return f"dp_shard{self.dp_shard} x tp{self.tp} x ep{self.ep}{' (in dp)' if self.ep_in_dp else ''} x cp{self.cp}"


def _layer_params(c: Qwen3NextConfig, i: int, lay: Layout) -> tuple[float, float, float]:
    """(parameters of layer i before tp/ep sharding, its share on one tp/ep rank that FSDP shards, the
    share it leaves: the routed experts under ep_in_dp)."""
    D, tp, ep = c.hidden_size, lay.tp, lay.ep
    full = local = 2 * D  # the two norms
    kept = 0.0
    if c.layer_types[i] == LINEAR:
        sharded = D * (2 * c.linear_key_dim + 2 * c.linear_value_dim) + D * 2 * c.linear_num_value_heads
        sharded += c.linear_value_dim * D + 2 * c.linear_num_value_heads
        replicated = c.linear_conv_dim * c.linear_conv_kernel_dim + c.linear_value_head_dim
    else:
        hd = c.head_dim
        sharded = D * c.num_attention_heads * hd * 3
        kv = 2 * D * c.num_key_value_heads * hd
        sharded, replicated = (sharded + kv, 2 * hd) if c.num_key_value_heads % tp == 0 else (sharded, kv + 2 * hd)
    full += sharded + replicated
    local += sharded / tp + replicated
    if c.is_moe_layer(i):
        experts = c.num_experts * 3 * D * c.moe_intermediate_size
        shared = 3 * D * c.shared_expert_intermediate_size
        small = c.num_experts * D + D
        full += experts + shared + small
        local += shared / tp + small
        if lay.experts_outside_fsdp:
            kept += experts / ep
        else:
            local += experts / (ep if ep > 1 else tp)
    else:
        dense = 3 * D * c.intermediate_size
        full += dense
        local += dense / tp
    return full, local, kept


def _activations(c: Qwen3NextConfig, i: int, lay: Layout, t: float) -> float:
    D, tp, ep, b2, b4 = c.hidden_size, lay.tp, lay.ep, 2, 4
    total = 4 * D * t / tp * b2
    if c.layer_types[i] == LINEAR:
        kd, vd, hv = c.linear_key_dim, c.linear_value_dim, c.linear_num_value_heads
        bf16 = 2 * kd + 2 * vd + 2 * hv + 2 * c.linear_conv_dim + 2 * vd
        fp32 = 2 * kd + hv * (c.linear_key_head_dim + c.linear_value_head_dim) + 2 * hv * c.linear_attention_chunk_size
        total += t * (bf16 * b2 + fp32 * b4) / tp
    else:
        kv_local = max(c.num_key_value_heads // tp, 1)
        total += t * (4 * c.num_attention_heads / tp + 3 * kv_local) * c.head_dim * b2
    if c.is_moe_layer(i):
        tp_e = tp if ep == 1 else 1
        pairs = t * c.num_experts_per_tok / (1 if lay.ep_in_dp else ep)
        total += t / tp * c.num_experts * b4 + pairs * (D + 3 * c.moe_intermediate_size / tp_e) * b2
        total += t * (D + 3 * c.shared_expert_intermediate_size / tp) * b2
    else:
        total += t * 3 * c.intermediate_size / tp * b2
    return total


def _communication(c: Qwen3NextConfig, i: int, lay: Layout, t: float, local_params: float,
                   kept_params: float) -> dict[str, float]:
    D, tp, ep, cp = c.hidden_size, lay.tp, lay.ep, lay.cp
    F = lay.dp_shard * cp
    out = {"tp": 0.0, "ep": 0.0, "cp": 0.0, "fsdp": (2 + 2 + 4) * local_params * (F - 1) / F}
    if kept_params:
        R = F // ep
        out["fsdp"] += 2 * 4 * kept_params * (R - 1) / R
    if tp > 1:
        out["tp"] = 2 * 4 * 2 * t * D * (tp - 1) / tp
    if ep > 1 and c.is_moe_layer(i):
        t_res = t / tp if tp > 1 else t
        visits = ep * (1 - (1 - 1 / ep) ** c.num_experts_per_tok)  # ranks a token's experts are on
        sent = t_res if lay.ep_in_dp else t_res / ep
        out["ep"] = 4 * 2 * sent * visits * D * (ep - 1) / ep
        if not lay.ep_in_dp:
            out["ep"] += 2 * 2 * t_res * D * (ep - 1) / ep
    if cp > 1:
        if c.layer_types[i] == LINEAR:
            dk = c.linear_key_head_dim
            per_rank = lay.batch * c.linear_num_value_heads / tp * dk * (dk + c.linear_value_head_dim) * 4
            out["cp"] = 2 * (cp - 1) * per_rank
        else:
            kv_local = max(c.num_key_value_heads // tp, 1)
            out["cp"] = 2 * 2 * 2 * lay.seq_len * lay.batch * kv_local * c.head_dim * (cp - 1) / cp
    return out


def plan(config: Qwen3NextConfig, lay: Layout) -> dict:
    """Per-GPU bytes (params, grads, optimizer, FSDP buffers, activations) and per-step communication
    bytes per GPU, by layer kind and in total. See the module docstring for the formulas."""
    c = config
    t = lay.batch * lay.seq_len / lay.cp
    F = lay.dp_shard * lay.cp
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    local_total = embed / lay.tp + c.hidden_size
    kept_total = 0.0  # parameters FSDP leaves (the experts under ep_in_dp)
    biggest = embed / lay.tp
    logits = t * c.vocab_size / lay.tp * (2 + 4)
    layer_activations = []
    kinds: dict[str, dict] = {}
    comm_total = {"tp": 0.0, "ep": 0.0, "cp": 0.0, "fsdp": 2 * 2 * embed / lay.tp * (F - 1) / F}
    for i, kind in enumerate(c.layer_types):
        _, local, kept = _layer_params(c, i, lay)
        local_total += local
        kept_total += kept
        biggest = max(biggest, local)
        layer_activations.append(_activations(c, i, lay, t))
        volume = _communication(c, i, lay, t, local, kept)
        name = ("GDN" if kind == LINEAR else "attention") + ("+MoE" if c.is_moe_layer(i) else "+MLP")
        kinds.setdefault(name, {"layers": 0, **volume})["layers"] += 1
        for k, v in volume.items():
            comm_total[k] += v
    if lay.recompute:
        activations = logits + len(layer_activations) * 2 * t * c.hidden_size / lay.tp + max(layer_activations)
    else:
        activations = logits + sum(layer_activations)
    params = local_total / F + kept_total
    w = 4 if lay.states == "fp32" else 2
    return {
        "layout": lay, "tokens_per_gpu": t, "local_parameters": params,
        "memory": {f"parameters ({lay.states})": w * params, f"gradients ({lay.states})": w * params,
                   f"AdamW m, v ({lay.states})": 2 * w * params,
                   "FSDP gather buffers (bf16)": 2 * 2 * biggest if F > 1 else 0.0, "activations": activations},
        "per_layer_comm": kinds, "comm_total": comm_total,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:9.1f} MiB"


def format_plan(p: dict) -> str:
    lay = p["layout"]
    lines = [f"layout {lay} = {lay.gpus} GPUs, {lay.batch} x {lay.seq_len} tokens per dp_shard rank "
             f"({p['tokens_per_gpu']:.0f} per GPU residual stream)"
             + (", activation checkpointing" if lay.recompute else ""), "  memory per GPU:"]
    for name, v in p["memory"].items():
        lines.append(f"    {name:<28}{_gib(v)}")
    lines.append(f"    {'total':<28}{_gib(sum(p['memory'].values()))}")
    lines.append("  communication per GPU per step (sent, forward + backward):")
    lines.append(f"    {'layer kind':<16}{'count':>6}{'tp':>14}{'ep':>14}{'cp':>14}{'fsdp':>14}   (per layer)")
    for name, v in p["per_layer_comm"].items():
        lines.append(f"    {name:<16}{v['layers']:>6}" + "".join(f"{_mib(v[k]):>14}" for k in ("tp", "ep", "cp", "fsdp")))
    total = p["comm_total"]
    lines.append(f"    {'whole step':<16}{'':>6}" + "".join(f"{_gib(total[k]):>14}" for k in ("tp", "ep", "cp", "fsdp")))
    lines.append(f"    {'all':<22}{_gib(sum(total.values()))}")
    return "\n".join(lines)


def add_inspect_arguments(parser) -> None:
    """The planning flags of `qwen3next inspect`."""
    group = parser.add_argument_group("parallel plan (any of these prints the per-GPU memory and communication)")
    for flag in ("--tp", "--ep", "--cp", "--dp-shard"):
        group.add_argument(flag, type=int, default=None, help=f"{flag[2:]} ways (default 1)")
    group.add_argument("--ep-in-dp", dest="ep_in_dp", action="store_true", default=None,
                       help="ep's ranks are dp_shard ranks (each its own rows; ep divides dp_shard)")
    group.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096)")
    group.add_argument("--batch", type=int, default=None, help="sequences per dp_shard rank (default 1)")
    group.add_argument("--activation-checkpointing", dest="recompute", action="store_true", default=None,
                       help="activations as with per-layer activation checkpointing")
    group.add_argument("--states", choices=["fp32", "bf16"], default=None,
                       help="master weights, gradients and AdamW states: fp32 (16 B/param, default) or bf16 (8 B/param)")


def print_plan_if_asked(config: Qwen3NextConfig, args) -> None:
    """Print the plan when any planning flag was given (`add_inspect_arguments`); exit with the reasons
    when the layout cannot work."""
    values = {k: getattr(args, k, None)
              for k in ("tp", "ep", "cp", "dp_shard", "seq_len", "batch", "states", "recompute", "ep_in_dp")}
    if all(v is None for v in values.values()):
        return
    lay = Layout(**{k: v for k, v in values.items() if v is not None})
    from .apply import layout_errors

    errors = layout_errors(config, lay.tp, lay.ep)
    if min(lay.dp_shard, lay.tp, lay.ep, lay.cp, lay.seq_len, lay.batch) < 1:
        errors.append("every dim, --seq-len and --batch must be >= 1")
    elif lay.ep_in_dp and lay.dp_shard % lay.ep:
        errors.append(f"with --ep-in-dp, ep={lay.ep} must divide dp_shard={lay.dp_shard}")
    if errors:
        raise SystemExit("error: invalid layout:\n  - " + "\n  - ".join(errors))
    print(format_plan(plan(config, lay)))
