"""Reference causal depthwise conv1d (with SiLU), over a whole sequence and one decode step.

Layout is channels-last, as the model holds activations: x [B, T, C]. The conv state of a sequence is
its last K-1 inputs, [B, C, K-1] (oldest first), which is what a decode step needs to continue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y[t, c] = act(sum_i weight[c, i] * x[t - (K-1) + i, c]), inputs before the start taken from
    `initial_state` (zeros if None).

    x [B, T, C]; weight [C, K]; initial_state [N, C, K-1] (N = B, or the number of sequences with
    `cu_seqlens`, which packs N sequences in a row of B = 1 as offsets [N+1]). Returns y [B, T, C] in
    x.dtype and, if asked, the final state [N, C, K-1].
    """
    if cu_seqlens is not None:
        outs, states = [], []
        for n in range(len(cu_seqlens) - 1):
            s, e = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
            init = None if initial_state is None else initial_state[n : n + 1]
            y, st = causal_conv1d_ref(x[:, s:e], weight, init, output_final_state, None, activation)
            outs.append(y)
            states.append(st)
        return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)
    B, T, C = x.shape
    K = weight.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(B, C, K - 1)
    xt = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    if T == 0:  # an empty sequence (possible in a varlen pack): no output, the state passes through
        return x.new_zeros(B, 0, C), (xt if output_final_state else None)
    y = F.conv1d(xt.to(weight.dtype), weight.unsqueeze(1), groups=C)  # [B, C, T]
    if activation == "silu":
        y = F.silu(y)
    final = xt[:, :, xt.shape[-1] - (K - 1) :] if output_final_state else None
    return y.transpose(1, 2).to(x.dtype), final


def causal_conv1d_update_ref(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, activation: str | None = "silu"
) -> torch.Tensor:
    """One decode step. x [B, C] (the new input), conv_state [B, C, K-1], updated in place to hold the
    last K-1 inputs; returns y [B, C]."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # [B, C, K]
    conv_state.copy_(window[:, :, 1:])
    y = (window.to(weight.dtype) * weight).sum(-1)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
