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
    B, T, C = x.shape
    K = weight.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    init = x.new_zeros(N, C, K - 1) if initial_state is None else initial_state.to(x.dtype)
    if T == 0:  # no output; the state passes through
        return x.new_zeros(B, 0, C), (init if output_final_state else None)
    if cu_seqlens is None:
        xt = torch.cat([init.transpose(1, 2), x], dim=1)  # [B, K-1+T, C]: each row after its initial inputs
        y = _depthwise(xt, weight)
        final = xt[:, T:].transpose(1, 2) if output_final_state else None  # the last K-1 inputs
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: batch size must be 1, got {B}")
        xt, token_rows, state_rows = _after_initial_inputs(x, init, cu_seqlens)
        y = _depthwise(xt, weight).index_select(1, token_rows)
        final = xt[0, state_rows].transpose(1, 2) if output_final_state else None  # [N, C, K-1]
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), final


def _depthwise(xt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Valid depthwise convolution along time: xt [B, L, C], weight [C, K] -> [B, L-K+1, C] in weight.dtype.
    A conv2d over xt's channels-last view, so neither side is transposed in memory."""
    nhwc = xt.to(weight.dtype)[:, None].permute(0, 3, 1, 2)  # [B, C, 1, L], channels-last
    return F.conv2d(nhwc, weight[:, None, None, :], groups=xt.shape[-1]).permute(0, 2, 3, 1)[:, 0]


def _after_initial_inputs(x: torch.Tensor, init: torch.Tensor, cu_seqlens: torch.Tensor):
    """Packed sequences each after its own K-1 initial inputs, [init_0, x_0, init_1, x_1, ...]: x [1, T, C]
    and init [N, C, K-1] -> ([1, T + N (K-1), C], the valid-conv output row of each token [T], the rows
    of each sequence's last K-1 inputs [N, K-1]). One convolution over it never mixes sequences."""
    T, (N, C, K1) = x.shape[1], init.shape
    cu = cu_seqlens.to(x.device).long()
    t = torch.arange(T, device=x.device)
    token_at = t + K1 * (torch.searchsorted(cu[1:], t, right=True) + 1)
    init_at = (cu[:-1] + K1 * torch.arange(N, device=x.device))[:, None] + torch.arange(K1, device=x.device)
    source = torch.empty(T + N * K1, dtype=torch.long, device=x.device)
    source[token_at] = t
    source[init_at.flatten()] = T + torch.arange(N * K1, device=x.device)
    rows = torch.cat([x[0], init.transpose(1, 2).reshape(N * K1, C)])  # tokens, then initial inputs
    return rows.index_select(0, source)[None], token_at - K1, init_at + (cu[1:] - cu[:-1])[:, None]


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
