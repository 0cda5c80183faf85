"""Autoregressive generation over a HybridCache: the prompt through the cache in chunks (bounded memory,
logits of the last position only), then one-token steps; greedy or sampled (temperature, top-k, top-p,
min-p, repetition penalty).

Two decode loops share the prefill and the token choice (`select_tokens`):
  * "eager": `model(...)` with the cache, a step at a time (any device);
  * "static" / "graph": `qwen3next.decode.StaticDecoder`, the graph-safe step over static buffers, replayed
    from CUDA graphs in "graph" mode. "auto" (the default) is "graph" on CUDA and "eager" elsewhere.
Greedy decoding gives the same tokens either way (up to rounding of near-ties in low precision).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch

from .cache import HybridCache
from .model import check_token_ids

DECODE_MODES = ("auto", "graph", "static", "eager")


def process_logits(
    logits: torch.Tensor, previous: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
) -> torch.Tensor:
    """Apply, in transformers' order, the repetition penalty (over `previous` ids [B, T]), temperature,
    top-k, top-p (keep the smallest set of most likely tokens whose probability reaches top_p) and min-p
    (drop tokens below min_p times the top probability). logits [B, V] (fp32); removed tokens get -inf."""
    logits = logits.float()
    if repetition_penalty is not None and repetition_penalty != 1.0 and previous is not None:
        seen = torch.gather(logits, 1, previous)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, previous, seen)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def select_tokens(
    logits: torch.Tensor, previous: torch.Tensor | None, greedy: bool, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
    repetition_penalty: float | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: logits [B, V], previous ids [B, T] (for the repetition penalty) -> [B].

    Greedy: argmax after the penalty. Sampled: `process_logits`, then a draw from the softmax as
    argmax(p / E) with E ~ Exp(1) i.i.d., which is what `torch.multinomial(p, 1)` does on the CPU (same
    generator stream, same tokens), without its host synchronisation: safe inside a CUDA graph."""
    scores = process_logits(
        logits, previous, temperature=1.0 if greedy else temperature, top_k=None if greedy else top_k,
        top_p=None if greedy else top_p, min_p=None if greedy else min_p, repetition_penalty=repetition_penalty,
    )
    if greedy:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


def prefill_chunk_length(model, batch_size: int, total_length: int, padded: bool, chunk_size: int) -> int:
    """Prompt positions per prefill chunk: `chunk_size` tokens over all rows together (so activations
    stay bounded whatever the batch); with padding, attention runs under a materialised [B, H, chunk, S]
    mask and scores, so the chunk also keeps those under 2^28 elements (1 GiB of fp32 scores)."""
    step = max(1, chunk_size // batch_size)
    if padded:
        step = min(step, max(64, (1 << 28) // (batch_size * model.config.num_attention_heads * total_length)))
    return step


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: HybridCache,
            chunk_size: int = 8192) -> torch.Tensor:
    """Run the prompt input_ids [B, T] (attention_mask [B, T], left padding) through an empty `cache` in
    chunks of about `chunk_size` tokens (all rows together); return the logits [B, V] of the last
    position. Peak memory grows with the chunk, not with T (no [T, V] logits, no load-balancing loss);
    the cache ends as after one forward over the whole prompt."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T = input_ids.shape
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    step = prefill_chunk_length(model, B, T, padded, chunk_size)
    for start in range(0, T, step):
        end = min(start + step, T)
        mask = attention_mask[:, :end] if padded else None
        hidden, _ = model.model(input_ids[:, start:end], mask, None, cache)
    return model.lm_head(hidden[:, -1])


def _validate(model, input_ids, attention_mask, max_new_tokens):
    config = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, prompt] tensor; got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}")
        if not bool(attention_mask.bool().any(-1).all()):
            raise ValueError("every prompt needs at least one non-padding token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    check_token_ids(input_ids, config.vocab_size)  # the forward checks again; this fails before any cache or graph is built


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    decode: str = "auto",
    prefill_chunk_size: int = 8192,
) -> torch.Tensor:
    """Continue each prompt of `input_ids` [B, T] (left-padded where `attention_mask` has zeros) by up to
    `max_new_tokens` tokens. Returns [B, T + n] (prompt then new tokens, n <= max_new_tokens: generation
    stops once every row has produced one of `eos_token_id`; later positions of finished rows hold
    `pad_token_id`). Greedy unless `do_sample` (temperature 0 is greedy too). `streamer(tokens [B])` is
    called with each step's tokens. Defaults for eos/pad come from the model's config.

    decode: "auto" (CUDA graphs on CUDA, else eager), "graph", "static" (the graph-safe step, not captured)
    or "eager" (see the module docstring). The prompt runs through the cache about `prefill_chunk_size` tokens
    (all rows together) at a time."""
    _validate(model, input_ids, attention_mask, max_new_tokens)
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if decode == "auto":
        decode = "graph" if input_ids.is_cuda else "eager"
    if decode == "graph" and not input_ids.is_cuda:
        raise ValueError("decode='graph' needs CUDA tensors; use 'static' or 'eager' on the CPU")
    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=input_ids.device,
                       dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    greedy = not do_sample or temperature == 0
    choose = functools.partial(
        select_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, generator=generator,
    )
    B, T = input_ids.shape
    mask = attention_mask.to(input_ids.device).long() if attention_mask is not None else None
    if decode != "eager":
        from .decode import StaticDecoder

        decoder = StaticDecoder(model, B, T + max_new_tokens, choose, eos, pad_token_id,
                                use_graphs=decode == "graph", generator=generator)
        logits = prefill(model, input_ids, mask, decoder.cache, prefill_chunk_size)
        return decoder.generate(input_ids, mask, logits, max_new_tokens, streamer)

    dtype = next(model.parameters()).dtype
    cache = HybridCache(config, B, T + max_new_tokens, dtype=dtype, device=input_ids.device)
    logits = prefill(model, input_ids, mask, cache, prefill_chunk_size)
    tokens = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if step:
            logits = model(tokens[:, -1:], attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        next_tokens = choose(logits, tokens)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        if streamer is not None:
            streamer(next_tokens)
        if len(eos):
            finished |= torch.isin(next_tokens, eos)
            if bool(finished.all()):
                break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return tokens
