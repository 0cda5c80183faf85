"""HybridCache: what a decode step needs from the past, per layer kind.

  * Gated DeltaNet layer: the conv state [B, C, K-1] (last K-1 conv inputs, activation dtype) and the
    recurrent state [B, Hv, dk, dv] (fp32). Constant size whatever the context length: the point of
    the architecture.
  * Gated attention layer: K and V [B, Hkv, max_length, hd], preallocated so every decode step sees
    static shapes; the first `seq_length` positions are filled.

The cache counts positions, not tokens: with left padding, padded positions are cached too (masked
out by the attention mask) and the caller passes the mask over all cached + new positions.
"""

from __future__ import annotations

import copy

import torch

from .config import LINEAR, Qwen3NextConfig


class LinearLayerCache:
    """Allocated uninitialised: `HybridCache` zeroes all layers' tensors at once."""

    def __init__(self, config: Qwen3NextConfig, batch_size: int, dtype, device):
        C, K = config.linear_conv_dim, config.linear_conv_kernel_dim
        self.conv_state = torch.empty(batch_size, C, K - 1, dtype=dtype, device=device)
        self.recurrent_state = torch.empty(
            batch_size, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim,
            dtype=torch.float32, device=device,
        )
        self.forget()

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_state, self.recurrent_state]

    def select(self, rows: torch.Tensor) -> None:
        self.conv_state = self.conv_state[rows]
        self.recurrent_state = self.recurrent_state[rows]

    def head(self, n: int) -> "LinearLayerCache":
        view = copy.copy(self)
        view.conv_state, view.recurrent_state = self.conv_state[:n], self.recurrent_state[:n]
        return view

    def forget(self) -> None:
        """Mark the (zeroed) states as not yet written."""
        self.filled = False  # False until a forward has written the states


class AttentionLayerCache:
    """Allocated uninitialised: `HybridCache` zeroes all layers' tensors at once."""

    def __init__(self, config: Qwen3NextConfig, batch_size: int, max_length: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.key = torch.empty(shape, dtype=dtype, device=device)
        self.value = torch.empty(shape, dtype=dtype, device=device)
        self.forget()

    def tensors(self) -> list[torch.Tensor]:
        return [self.key, self.value]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value [B, Hkv, T, hd] after the filled positions; return all filled K, V."""
        start, end = self.length, self.length + key.shape[2]
        if end > self.key.shape[2]:
            raise ValueError(f"cache holds {self.key.shape[2]} positions; {end} needed (raise max_length)")
        self.key[:, :, start:end] = key
        self.value[:, :, start:end] = value
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        self.key = self.key[rows]
        self.value = self.value[rows]

    def head(self, n: int) -> "AttentionLayerCache":
        view = copy.copy(self)
        view.key, view.value = self.key[:n], self.value[:n]
        return view

    def forget(self) -> None:
        """Mark no position as filled."""
        self.length = 0


class HybridCache:
    """Per-layer decode state for `batch_size` sequences of up to `max_length` positions."""

    def __init__(self, config: Qwen3NextConfig, batch_size: int, max_length: int, dtype=torch.float32, device="cpu"):
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
            )
        self.max_length = max_length
        self.seq_length = 0
        self.layers = [
            LinearLayerCache(config, batch_size, dtype, device) if kind == LINEAR
            else AttentionLayerCache(config, batch_size, max_length, dtype, device)
            for kind in config.layer_types
        ]
        self.reset()

    @property
    def batch_size(self) -> int:
        return self.layers[0].tensors()[0].shape[0]

    def advance(self, num_positions: int) -> None:
        """Called by the model after a forward over `num_positions` new positions."""
        self.seq_length += num_positions

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the linear layers' states and by the attention layers' filled K/V."""
        linear = sum(t.numel() * t.element_size() for l in self.layers if isinstance(l, LinearLayerCache) for t in l.tensors())
        attention = sum(
            2 * l.key[:, :, : l.length].numel() * l.key.element_size()
            for l in self.layers if isinstance(l, AttentionLayerCache)
        )
        return {"linear": linear, "attention": attention}

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder to) these batch rows: drop finished sequences, or reorder for beam search."""
        rows = torch.as_tensor(rows, device=self.layers[0].tensors()[0].device)
        for layer in self.layers:
            layer.select(rows)

    def head(self, n: int) -> "HybridCache":
        """A cache of the first `n` rows sharing this one's storage: what is written through it lands here
        (a decode step over fewer rows keeps the tensors' addresses, as a captured CUDA graph needs)."""
        view = copy.copy(self)
        view.layers = [layer.head(n) for layer in self.layers]
        return view

    def reset(self) -> None:
        """Empty the cache in place (zeros, no positions filled), keeping every tensor's storage. All tensors are
        zeroed by one multi-tensor op (a launch or a few on a GPU, where a zero_ per tensor is a launch each)."""
        torch._foreach_zero_([t for layer in self.layers for t in layer.tensors()])
        for layer in self.layers:
            layer.forget()
        self.seq_length = 0

    def snapshot(self) -> "HybridCache":
        """An independent copy (e.g. the state after a shared prompt prefix, to reuse for many continuations)."""
        return copy.deepcopy(self)

    def restore(self, snapshot: "HybridCache") -> None:
        """Return to a snapshot's state (the snapshot stays reusable). Tensors of the snapshot's shapes are
        copied into the existing storage, so views of this cache (`head`) and the buffers a captured CUDA
        graph reads stay valid; after a `select` changed the batch, the snapshot's tensors are cloned in."""
        for mine, theirs in zip(self.layers, snapshot.layers):
            for name, value in vars(theirs).items():
                current = getattr(mine, name)
                if isinstance(value, torch.Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    setattr(mine, name, value.clone() if isinstance(value, torch.Tensor) else value)
        self.seq_length = snapshot.seq_length
