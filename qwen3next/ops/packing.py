"""Packed sequences as a padded batch and back, by index (no loop over the sequences).

`cu_seqlens` [N+1] (offsets, rising from 0 to T) packs N sequences end to end in one row of T tokens.
`PaddedLayout` puts them in a batch [N, L] (L = the longest, at least 1), sequence n in row n from slot
0, so that an op written for a plain batch (causal attention, the gated delta rule) runs every
sequence at once, and puts the results back in the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PaddedLayout:
    """index [N, L] int64: the row position each slot reads (a padding slot repeats its sequence's
    last token; an empty sequence's slots read position 0); valid [N, L] bool: the slot holds one of
    its sequence's tokens; slots [T] int64: each token's slot in the flattened batch [N * L]."""

    index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def from_offsets(cls, cu_seqlens: torch.Tensor) -> "PaddedLayout":
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        T, L = int(cu[-1]), max(int(lengths.max()), 1)
        j = torch.arange(L, device=cu.device)
        valid = j < lengths[:, None]
        index = (cu[:-1, None] + torch.minimum(j, (lengths[:, None] - 1).clamp(min=0))).clamp(max=max(T - 1, 0))
        t = torch.arange(T, device=cu.device)
        seq = torch.searchsorted(cu[1:], t, right=True)
        return cls(index, valid, seq * L + t - cu[seq])

    @property
    def work(self) -> int:
        """N L^2: the attention scores of the padded batch (a dense mask over the row has T^2)."""
        N, L = self.index.shape
        return N * L * L

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, T, ...] -> [N, L, ...] (padding slots as described above; zeros when T = 0)."""
        N, L = self.index.shape
        if x.shape[1] == 0:
            return x.new_zeros(N, L, *x.shape[2:])
        return x[0].index_select(0, self.index.flatten()).view(N, L, *x.shape[2:])

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """y [N, L, ...] -> [1, T, ...]: each token's slot, the padding dropped."""
        return y.reshape(-1, *y.shape[2:]).index_select(0, self.slots)[None]
