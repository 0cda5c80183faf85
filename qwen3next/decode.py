"""Graph-safe decoding: one-token steps over static buffers, replayed from CUDA graphs.

A `StaticDecoder` owns, for up to `capacity` sequences of up to `max_length` positions:
  * a `HybridCache` (attention K/V preallocated to max_length, conv states, fp32 recurrent states used as
    a state pool indexed by row);
  * ids [capacity, max_length] (prompt, then the generated tokens; not-yet-written columns repeat column 0,
    which changes nothing for the repetition penalty), the current input token and rope position per row,
    key_mask [capacity, max_length] (the positions each row attends to), the cache position `slot` ([1],
    shared: the cache counts positions, left padding included) and the finished flags.
One step (`_step`) reads and writes only these, in place, and never waits for the host: the model's
`decode_step` (attention over the whole preallocated cache under key_mask, in-place conv/recurrent state
updates), then the token choice, the pad of finished rows, and the advance of slot, positions and flags.

Batch-size buckets: the step runs on the first b rows (views: same storage) for b in `buckets(capacity)`.
With graphs, one CUDA graph per bucket is captured up front on the empty buffers (all sharing one memory
pool), before the prompt is prefilled into the cache. When rows finish, the live rows are moved to the
front and the step continues in the smallest bucket that holds them.

The host reads tokens back only to stream them or to check for the end (every `check_every` steps, or
every step with a streamer); the steps run past the end by a finished batch only write pads, and the
result is trimmed to what the step-by-step loop returns.
"""

from __future__ import annotations

from typing import Callable

import torch

from .cache import HybridCache


def buckets(capacity: int) -> list[int]:
    """Batch sizes the step is prepared for, largest first: capacity, then the powers of two below it."""
    sizes, b = [capacity], 1
    while b < capacity:
        sizes.append(b)
        b *= 2
    return sorted(set(sizes), reverse=True)


class StaticDecoder:
    """Decode state and step for `capacity` rows; `choose(logits [b, V], previous ids [b, L]) -> [b]` picks
    tokens (it must be graph-safe: `generate.select_tokens` is). `eos` [n] int64 on the device. `sizes`:
    the batch buckets to prepare (default `buckets(capacity)`; capacity is always one)."""

    def __init__(self, model, capacity: int, max_length: int, choose: Callable, eos: torch.Tensor,
                 pad_token_id: int, use_graphs: bool, generator: torch.Generator | None = None,
                 check_every: int = 8, sizes: list[int] | None = None):
        param = next(model.parameters())
        device = param.device
        if use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.choose, self.eos, self.pad = model, choose, eos.to(device), pad_token_id
        self.check_every = check_every
        self.cache = HybridCache(model.config, capacity, max_length, dtype=param.dtype, device=device)
        self.ids = torch.zeros(capacity, max_length, dtype=torch.long, device=device)
        self.input = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(capacity, max_length, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.state_indices = torch.arange(capacity, dtype=torch.int32, device=device)
        self.sizes = sorted({capacity, *(sizes or buckets(capacity))}, reverse=True)
        if self.sizes[-1] < 1 or self.sizes[0] > capacity:
            raise ValueError(f"batch sizes must lie in [1, {capacity}], got {sizes}")
        self.views = {b: self.cache.head(b) for b in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graphs:
            self._capture(generator)

    @property
    def capacity(self) -> int:
        return self.ids.shape[0]

    # ------------------------------------------------------------------------------------------ the step
    def _step(self, b: int) -> None:
        """Forward the current token of rows [0, b), choose the next, advance. Graph-safe."""
        logits = self.model.decode_step(self.input[:b], self.positions[:b], self.views[b], self.slot,
                                        self.key_mask[:b], self.state_indices[:b])
        nxt = self.choose(logits, self.ids[:b])
        finished = self.finished[:b]
        nxt = torch.where(finished, torch.full_like(nxt, self.pad), nxt)
        self.slot.add_(1)
        self.ids[:b].index_copy_(1, self.slot, nxt[:, None])
        self.input[:b].copy_(nxt[:, None])
        self.positions[:b].add_(1)
        finished.logical_or_(torch.isin(nxt, self.eos))

    def _capture(self, generator) -> None:
        """Warm up and capture one graph per bucket on the empty buffers, then empty them again."""
        pool, stream = None, torch.cuda.Stream()
        for b in self.sizes:
            self._reset()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # compiles kernels, creates handles: nothing of it in the graph
                self._step(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if generator is not None:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._step(b)
            pool = graph.pool()
            self.graphs[b] = graph
        self._reset()

    def _reset(self) -> None:
        """Empty state: the step on it stays finite (each row attends to at least its new position)."""
        self.cache.reset()
        for t in (self.ids, self.input, self.positions, self.key_mask, self.slot, self.finished):
            t.zero_()

    def step(self, b: int) -> None:
        """One decode step of the first b rows (b a bucket): a graph replay, or the step run eagerly."""
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._step(b)

    # ------------------------------------------------------------------------------------------ the loop
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """After the prompt input_ids [B, T] (B <= capacity) was prefilled into `self.cache`: load the
        buffers, choose the first new token from the prompt's last logits [B, V]; return it [B]."""
        B, T = input_ids.shape
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        self.ids[:B] = input_ids[:, :1]
        self.ids[:B, :T] = input_ids
        self.key_mask[:B, :T] = mask
        self.positions[:B, 0] = mask.sum(-1)
        self.slot.fill_(T)
        first = self.choose(logits, self.ids[:B])
        self.ids[:B, T] = first
        self.input[:B, 0] = first
        self.finished[:B] = torch.isin(first, self.eos)
        self.finished[B:] = True
        return first

    def generate(self, input_ids, attention_mask, logits, max_new_tokens: int, streamer=None) -> torch.Tensor:
        """Decode up to max_new_tokens after the prefilled prompt; returns [B, T + n] as `generate` does."""
        B, T = input_ids.shape
        first = self.start(input_ids, attention_mask, logits)
        out = torch.full((B, T + max_new_tokens), self.pad, dtype=torch.long, device=input_ids.device)
        rows = list(range(B))  # rows[i]: the output row of buffer row i
        if streamer is not None:
            streamer(first)
        bucket = min(b for b in self.sizes if b >= B)
        stop_checks = len(self.eos) > 0
        done = 1
        while done < max_new_tokens:
            if stop_checks and (streamer is not None or done % self.check_every == 0):
                live = (~self.finished[: len(rows)]).nonzero().flatten().tolist()
                if not live:
                    break
                smaller = min(b for b in self.sizes if b >= len(live))
                if smaller < bucket:
                    rows = self._compact(live, rows, out, T + done)
                    bucket = smaller
            self.step(bucket)
            done += 1
            if streamer is not None:
                tokens = torch.full((B,), self.pad, dtype=torch.long, device=out.device)
                tokens[rows] = self.ids[: len(rows), T + done - 1]
                streamer(tokens)
        out[rows] = self.ids[: len(rows), : T + max_new_tokens]
        return out[:, : T + self._new_tokens(out[:, T:], done)]

    def _compact(self, live: list[int], rows: list[int], out: torch.Tensor, written: int) -> list[int]:
        """Move the live buffer rows to the front; finished rows leave their `written` columns in `out`
        (later columns stay pad, as the steps they skip would have written)."""
        gone = sorted(set(range(len(rows))) - set(live))
        out[[rows[i] for i in gone], :written] = self.ids[gone, :written]
        index = torch.tensor(live, device=self.ids.device)
        n = len(live)
        for t in (*[t for layer in self.cache.layers for t in layer.tensors()], self.ids, self.input,
                  self.positions, self.key_mask, self.finished):
            t[:n] = t[index]
        self.finished[n:] = True
        return [rows[i] for i in live]

    def _new_tokens(self, new: torch.Tensor, done: int) -> int:
        """How many new tokens the step-by-step loop keeps: up to the step where the last row finished."""
        if not len(self.eos):
            return done
        hit = torch.isin(new[:, :done], self.eos)
        if not bool(hit.any(-1).all()):
            return done
        return int(hit.int().argmax(-1).max()) + 1
