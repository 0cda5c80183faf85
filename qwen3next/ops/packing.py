"""Packed sequences as a padded batch and back, by index (no loop over the sequences).

`cu_seqlens` [N+1] (offsets, rising from 0 to T) packs N sequences end to end in one row of T tokens.
`PaddedLayout` puts them (or any subset of them) in a batch [N, L] (L = the longest, at least 1), sequence
n in row n from slot 0, so that an op written for a plain batch (causal attention, the gated delta rule)
runs every sequence at once, and takes the results back. `length_groups` splits sequences of very
different lengths into batches that padding does not blow up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PaddedLayout:
    """index [N, L] int64: the row position each slot reads (a padding slot repeats its sequence's
    last token; an empty sequence's slots read position 0); valid [N, L] bool: the slot holds one of
    its sequence's tokens; slots [M] int64: the flat slots [N * L] of the M tokens, sequence by sequence."""

    index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def from_offsets(cls, cu_seqlens: torch.Tensor) -> "PaddedLayout":
        """All N sequences of the row, in order (so `unpad` gives the row back)."""
        cu = cu_seqlens.long()
        return cls.from_spans(cu[:-1], cu[1:] - cu[:-1], int(cu[-1]))

    @classmethod
    def from_spans(cls, starts: torch.Tensor, lengths: torch.Tensor, T: int) -> "PaddedLayout":
        """The sequences at row positions starts[n] .. starts[n] + lengths[n] of a row of T tokens."""
        L = max(int(lengths.max()), 1) if len(lengths) else 1
        j = torch.arange(L, device=starts.device)
        valid = j < lengths[:, None]
        index = (starts[:, None] + torch.minimum(j, (lengths[:, None] - 1).clamp(min=0))).clamp(max=max(T - 1, 0))
        return cls(index, valid, valid.flatten().nonzero().squeeze(1))

    @property
    def positions(self) -> torch.Tensor:
        """[M] the row position of each token that `unpad` returns."""
        return self.index.flatten().index_select(0, self.slots)

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
        """y [N, L, ...] -> [1, M, ...]: the tokens' slots, sequence by sequence, the padding dropped (the row
        [1, T, ...] for a layout `from_offsets`)."""
        return y.reshape(-1, *y.shape[2:]).index_select(0, self.slots)[None]


def length_groups(lengths: torch.Tensor, slack: float = 2.0) -> list[torch.Tensor]:
    """Sequence indices [n_g] (ascending within a group) grouped longest first, so that each group padded
    to its longest sequence holds at most `slack` x its tokens (a group's first sequence always fits;
    empty sequences end up together). One long sequence among many short ones thus stays out of their batch."""
    ls = lengths.tolist()
    groups: list[list[int]] = []
    total = 0
    for n in sorted(range(len(ls)), key=lambda m: -ls[m]):
        if groups and (len(groups[-1]) + 1) * max(ls[groups[-1][0]], 1) <= slack * max(total + ls[n], 1):
            groups[-1].append(n)
            total += ls[n]
        else:
            groups.append([n])
            total = ls[n]
    return [torch.tensor(sorted(g), dtype=torch.long, device=lengths.device) for g in groups]
