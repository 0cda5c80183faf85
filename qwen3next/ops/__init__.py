"""The model's operations, each with a plain-PyTorch reference (`*_ref`) and, where written, a Triton kernel.

The functions exported here pick the backend per call: Triton kernels on CUDA tensors, the references
on the CPU. `QWEN3NEXT_BACKEND=torch|triton` overrides the choice (`triton` on CPU tensors runs the
kernels in Triton's interpreter when `TRITON_INTERPRET=1`, which is how CI tests them). An op without
a kernel yet uses its reference on every backend.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .conv import causal_conv1d_ref, causal_conv1d_update_ref
from .fused import (
    add_rms_norm_ref, gdn_gates_ref, qkvz_causal_conv1d_ref, rms_norm_rotary_ref, rotary_ref, sigmoid_gate_ref,
    split_qkvz_ref,
)
from .gated_delta import (
    chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref, recurrent_gated_delta_rule_update_ref,
)
from .moe import load_balancing_loss_ref, moe_experts_grouped, moe_experts_ref, route_ref
from .norms import gated_rms_norm_ref, l2_norm_ref, rms_norm_ref

BACKENDS = ("torch", "triton")

# op name -> "module:function" of its Triton implementation (same signature as the reference).
_TRITON_KERNELS: dict[str, str] = {
    "rms_norm": ".triton.norms:rms_norm",
    "gated_rms_norm": ".triton.norms:gated_rms_norm",
    "l2_norm": ".triton.norms:l2_norm",
    "causal_conv1d": ".triton.conv:causal_conv1d",
    "causal_conv1d_update": ".triton.conv:causal_conv1d_update",
    "chunk_gated_delta_rule": ".triton.gated_delta:chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule": ".triton.gated_delta:fused_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule_update": ".triton.gated_delta:recurrent_gated_delta_rule_update",
    "route": ".triton.moe:route",
    "moe_experts": ".triton.moe:moe_experts",
    "split_qkvz": ".triton.fused:split_qkvz",
    "qkvz_causal_conv1d": ".triton.fused:qkvz_causal_conv1d",
    "gdn_gates": ".triton.fused:gdn_gates",
    "add_rms_norm": ".triton.fused:add_rms_norm",
    "sigmoid_gate": ".triton.fused:sigmoid_gate",
    "rms_norm_rotary": ".triton.fused:rms_norm_rotary",
}


def backend_for(t: torch.Tensor) -> str:
    """The backend for an op on tensor `t`: $QWEN3NEXT_BACKEND if set, else triton on CUDA, torch elsewhere."""
    choice = os.environ.get("QWEN3NEXT_BACKEND", "").strip().lower()
    if choice:
        if choice not in BACKENDS:
            raise ValueError(f"QWEN3NEXT_BACKEND must be one of {BACKENDS}, got {choice!r}")
        return choice
    return "triton" if t.is_cuda else "torch"


@functools.cache
def _triton_kernel(name: str):
    """The Triton function registered for op `name` (its module imported on first use)."""
    module, fn = _TRITON_KERNELS[name].split(":")
    return getattr(importlib.import_module(module, __name__), fn)


def _dispatch(name: str, reference):
    def op(*args, **kwargs):
        if name in _TRITON_KERNELS and backend_for(args[0]) == "triton":
            return _triton_kernel(name)(*args, **kwargs)
        return reference(*args, **kwargs)

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = f"Backend-dispatched `{name}`; contract: see `{reference.__module__}.{reference.__name__}`."
    return op


rms_norm = _dispatch("rms_norm", rms_norm_ref)
gated_rms_norm = _dispatch("gated_rms_norm", gated_rms_norm_ref)
l2_norm = _dispatch("l2_norm", l2_norm_ref)
causal_conv1d = _dispatch("causal_conv1d", causal_conv1d_ref)
causal_conv1d_update = _dispatch("causal_conv1d_update", causal_conv1d_update_ref)
chunk_gated_delta_rule = _dispatch("chunk_gated_delta_rule", chunk_gated_delta_rule_ref)
fused_recurrent_gated_delta_rule = _dispatch("fused_recurrent_gated_delta_rule", recurrent_gated_delta_rule_ref)
recurrent_gated_delta_rule_update = _dispatch(
    "recurrent_gated_delta_rule_update", recurrent_gated_delta_rule_update_ref
)
route = _dispatch("route", route_ref)
moe_experts = _dispatch("moe_experts", moe_experts_grouped)  # torch backend: sort-based, grouped products
load_balancing_loss = load_balancing_loss_ref
split_qkvz = _dispatch("split_qkvz", split_qkvz_ref)
qkvz_causal_conv1d = _dispatch("qkvz_causal_conv1d", qkvz_causal_conv1d_ref)
gdn_gates = _dispatch("gdn_gates", gdn_gates_ref)
add_rms_norm = _dispatch("add_rms_norm", add_rms_norm_ref)
sigmoid_gate = _dispatch("sigmoid_gate", sigmoid_gate_ref)
rms_norm_rotary = _dispatch("rms_norm_rotary", rms_norm_rotary_ref)

__all__ = [
    "backend_for", "rms_norm", "gated_rms_norm", "l2_norm", "causal_conv1d", "causal_conv1d_update",
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "recurrent_gated_delta_rule_update",
    "route", "moe_experts", "load_balancing_loss", "split_qkvz", "qkvz_causal_conv1d", "gdn_gates", "add_rms_norm",
    "sigmoid_gate", "rms_norm_rotary",
    "rms_norm_ref", "gated_rms_norm_ref", "l2_norm_ref", "causal_conv1d_ref", "causal_conv1d_update_ref",
    "chunk_gated_delta_rule_ref", "recurrent_gated_delta_rule_ref", "recurrent_gated_delta_rule_update_ref",
    "route_ref", "moe_experts_ref", "split_qkvz_ref", "qkvz_causal_conv1d_ref", "gdn_gates_ref", "add_rms_norm_ref",
    "sigmoid_gate_ref", "rms_norm_rotary_ref", "rotary_ref", "load_balancing_loss_ref",
]
