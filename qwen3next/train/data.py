"""Training data: tokenizers, a streaming corpus reader, packing into fixed-length rows with document
boundaries, and a held-out split.

Corpus: files and directories (walked recursively, sorted, hidden and `__pycache__` directories
skipped, file names matched against `include` globs). A `.jsonl` file holds one document per line
(its "text" field); any other file is one document, read as UTF-8 in pieces of about 64 KB of whole
lines, so neither a huge file nor a huge corpus is ever held in memory. A document's tokens end with
the tokenizer's end-of-text id when it has one.

Held-out split: a piece (a .jsonl line, or a block of a text file) is held out when a hash of (file
path, piece index) falls below `eval_fraction`, so even a corpus of one large file has a held-out
part; the decision never depends on the order files are read in, so the split is stable across epochs
and runs. Where pieces of one document fall on both sides, each side's text resumes as a new segment
after a gap (no token is trained to continue text it did not see).

Packing: documents are laid end to end in rows of exactly `seq_len` tokens; a document that does not
fit the rest of a row continues at the start of the next one. Each row carries `cu_seqlens`, the
offsets of its segments (a new segment at every document start and at the row start), so the model
lets no token attend to or carry state from another document, and no token learns to predict the
next document's first token. A batch of B rows goes to the model as at most two forward passes:
the rows that hold a single segment as a plain [n, seq_len] batch, the others packed into one row.

Order: the training split shuffles its file order every epoch (seeded), and its rows pass through a
shuffle buffer (`ShuffledRows`). Position: where the next row starts, (epoch, file, piece, token);
restarting from a saved position reads, and skips, only the pieces of one file, so resuming is exact
and costs no re-tokenisation of what came before.
"""

from __future__ import annotations

import fnmatch
import json
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from ..files import atomic_open

END_OF_TEXT = "<|endoftext|>"
PIECE_CHARS = 1 << 16
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.rst", "*.py", "*.jsonl")


class DataError(ValueError):
    """A corpus that cannot be trained on: no files, no tokens, no held-out documents, unreadable lines."""


# --------------------------------------------------------------------------------------------- tokenizers
class TextTokenizer(Protocol):
    """What the data pipeline needs of a tokenizer (ByteTokenizer and qwen3next.tokenizer.Tokenizer)."""

    eos_token_id: int | None

    def encode(self, text: str) -> Sequence[int]: ...

    def decode(self, ids, skip_special_tokens: bool = False) -> str: ...


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which `tokenizers`' ByteLevel steps use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


class ByteTokenizer:
    """The built-in tokenizer for from-scratch runs: token id = UTF-8 byte value (0..255), and
    `<|endoftext|>` = 256; vocab_size 257. Encoding is `str.encode`, so it is fast and lossless.

    `save_pretrained` writes the same tokenizer as a standard `tokenizer.json` (byte-level BPE with
    no merges, vocabulary ordered by byte value), so checkpoints load with `qwen3next generate`,
    the `tokenizers` library and transformers."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        out, start = [], 0
        for i, t in enumerate(ids + [self.eos_token_id]):
            if t >= 256:
                out.append(bytes(ids[start:i]).decode("utf-8", errors="replace"))
                if i < len(ids) and not skip_special_tokens:
                    out.append(END_OF_TEXT)
                start = i + 1
        return "".join(out)

    @staticmethod
    def tokenizer_json() -> dict:
        """The `tokenizers` serialisation of this tokenizer."""
        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 256, "content": END_OF_TEXT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
            "decoder": {**byte_level},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []},
        }

    @classmethod
    def is_serialised_in(cls, directory: str) -> bool:
        """Whether `directory/tokenizer.json` is this tokenizer (then it is loaded as a ByteTokenizer)."""
        try:
            with open(os.path.join(directory, "tokenizer.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        model = data.get("model") or {}
        return model.get("merges") == [] and model.get("vocab") == cls.tokenizer_json()["model"]["vocab"] and [
            (t.get("id"), t.get("content")) for t in data.get("added_tokens", [])] == [(256, END_OF_TEXT)]

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        files = {
            "tokenizer.json": self.tokenizer_json(),
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_TEXT,
                                      "model_max_length": 1 << 30},
        }
        for name, body in files.items():
            with atomic_open(os.path.join(directory, name)) as f:
                json.dump(body, f, ensure_ascii=False, indent=1)


def load_tokenizer(spec: str) -> TextTokenizer:
    """'byte' -> ByteTokenizer; a checkpoint directory with tokenizer.json -> its tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(os.path.join(spec, "tokenizer.json")):
        raise DataError(f"no tokenizer at {spec!r}: give 'byte' (built-in) or a directory with tokenizer.json")
    if ByteTokenizer.is_serialised_in(spec):
        return ByteTokenizer()
    from ..tokenizer import Tokenizer

    return Tokenizer.from_pretrained(spec)


def save_tokenizer(tokenizer: TextTokenizer, directory: str) -> None:
    """Write the tokenizer's files into a checkpoint directory."""
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer.save_pretrained(directory)
    else:
        tokenizer.backend.save(os.path.join(directory, "tokenizer.json"))
        settings = {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                    "chat_template": tokenizer.chat_template}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in settings.items() if v is not None}, f, indent=1)


def tokenizer_vocab_size(tokenizer: TextTokenizer) -> int:
    return tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else tokenizer.backend.get_vocab_size()


# --------------------------------------------------------------------------------------------- files
def list_files(paths: Sequence[str], include: Sequence[str] = DEFAULT_INCLUDE,
               exclude_dirs: Sequence[str] = ()) -> list[str]:
    """Files named directly plus, under each directory, the files whose name matches an `include` glob,
    sorted; directories that are hidden, `__pycache__` or named in `exclude_dirs` are skipped."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__" and d not in exclude_dirs]
                found += [os.path.join(root, n) for n in names if any(fnmatch.fnmatch(n, g) for g in include)]
            files += sorted(found)
        else:
            raise DataError(f"corpus path {path!r} does not exist")
    if not files:
        raise DataError(f"empty corpus: no files matching {', '.join(include)} in {', '.join(map(repr, paths))}")
    return files


@dataclass(frozen=True)
class Piece:
    """A stretch of one document: `index` counts the pieces of its file; `first`/`last` mark the
    document's first and last piece."""

    index: int
    text: str
    first: bool
    last: bool


def read_pieces(path: str, start: int = 0) -> Iterator[Piece]:
    """The pieces of one file from piece `start` on (earlier pieces are read but not returned)."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if i < start or not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{i + 1}: expected a JSON object with a 'text' string ({e})") from None
                yield Piece(i, str(text), True, True)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        blocks = _line_blocks(f)
        text, index = next(blocks, None), 0
        while text is not None:
            following = next(blocks, None)
            if index >= start:
                yield Piece(index, text, index == 0, following is None)
            text, index = following, index + 1


def _line_blocks(lines: Iterator[str]) -> Iterator[str]:
    """Whole lines joined into blocks of at least PIECE_CHARS characters (the last may be shorter)."""
    block, size = [], 0
    for line in lines:
        block.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


def is_held_out(path: str, piece: int, fraction: float) -> bool:
    """Deterministic split: crc32 of 'path:piece' below `fraction` of the hash range."""
    return fraction > 0 and zlib.crc32(f"{path}:{piece}".encode()) < fraction * 2**32


# --------------------------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Position:
    """Where a row starts: epoch, index into that epoch's file order, piece of the file, token of the piece."""

    epoch: int = 0
    file: int = 0
    piece: int = 0
    token: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Row:
    """One packed row: ids [seq_len] int64; cu_seqlens [segments + 1]; `next` is where the following row starts."""

    ids: np.ndarray
    cu_seqlens: np.ndarray
    next: Position


@dataclass
class Part:
    """One forward pass of a batch: input_ids [n, seq_len] with cu_seqlens None (rows that each hold a
    single segment: nothing to keep apart), or [1, m * seq_len] with the cu_seqlens of the m rows'
    segments; `targets` = the predicted tokens (tokens minus segments)."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    targets: int


@dataclass
class Batch:
    """B rows as at most two forward passes (see `make_batch`)."""

    parts: list[Part]

    @property
    def tokens(self) -> int:
        return sum(p.input_ids.numel() for p in self.parts)

    @property
    def targets(self) -> int:
        return sum(p.targets for p in self.parts)


class PackedCorpus:
    """Tokenised, packed rows of a corpus split: `split` is "train" (endless, file order shuffled each
    epoch with `seed`) or "eval" (the held-out documents, once, in sorted order)."""

    def __init__(self, files: Sequence[str], tokenizer: TextTokenizer, seq_len: int, split: str = "train",
                 eval_fraction: float = 0.0, seed: int = 0):
        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2, got {seq_len}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0.0 <= eval_fraction < 1.0:
            raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if split == "eval" and eval_fraction == 0:
            raise DataError("an eval split needs eval_fraction > 0")
        self.files, self.tokenizer, self.seq_len = list(files), tokenizer, seq_len
        self.split, self.eval_fraction, self.seed = split, eval_fraction, seed

    def file_order(self, epoch: int) -> list[str]:
        if self.split == "eval":
            return self.files
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.files))
        return [self.files[i] for i in order]

    def _wanted(self, path: str, piece: int) -> bool:
        return is_held_out(path, piece, self.eval_fraction) == (self.split == "eval")

    def _token_pieces(self, start: Position) -> Iterator[tuple[Position, np.ndarray, bool]]:
        """(position of the first token, tokens, starts a document) for every piece from `start` on."""
        eos = self.tokenizer.eos_token_id
        epoch = start.epoch
        while True:
            produced = False
            order = self.file_order(epoch)
            first_file = start.file if epoch == start.epoch else 0
            for f in range(first_file, len(order)):
                resume = epoch == start.epoch and f == start.file
                previous = None  # index of the last piece of this file given out
                for piece in read_pieces(order[f], start.piece if resume else 0):
                    if not self._wanted(order[f], piece.index):
                        continue
                    tokens = np.asarray(self.tokenizer.encode(piece.text), dtype=np.int64)
                    if piece.last and eos is not None:
                        tokens = np.append(tokens, eos)
                    skip = start.token if resume and piece.index == start.piece else 0
                    if skip >= len(tokens):
                        continue
                    produced = True
                    new_segment = piece.first or previous != piece.index - 1
                    previous = piece.index
                    yield Position(epoch, f, piece.index, skip), tokens[skip:], new_segment
            if self.split == "eval":
                return
            if not produced and (epoch > start.epoch or start == Position(start.epoch)):
                raise DataError(f"empty corpus: the {self.split} split of {len(self.files)} file(s) has no tokens"
                                + (f" (eval_fraction {self.eval_fraction} holds out every document)"
                                   if self.eval_fraction else ""))
            epoch += 1

    def rows(self, start: Position = Position()) -> Iterator[Row]:
        """Packed rows from `start` on (the eval split drops its last, partial row)."""
        S = self.seq_len
        buf, filled, cu = np.empty(S, dtype=np.int64), 0, [0]
        for pos, tokens, new_doc in self._token_pieces(start):
            if new_doc and filled and cu[-1] != filled:
                cu.append(filled)
            used = 0
            while used < len(tokens):
                take = min(S - filled, len(tokens) - used)
                buf[filled:filled + take] = tokens[used:used + take]
                filled, used = filled + take, used + take
                if filled == S:
                    cu.append(S)
                    nxt = (Position(pos.epoch, pos.file, pos.piece, pos.token + used) if used < len(tokens)
                           else Position(pos.epoch, pos.file, pos.piece + 1, 0))
                    yield Row(buf.copy(), np.array(cu, dtype=np.int64), nxt)
                    filled, cu = 0, [0]


def make_batch(rows: Sequence[Row]) -> Batch:
    """Lay rows out for the model: the rows that hold one segment (a stretch of a single document) as a
    plain batch, the rest packed into one row whose segments are theirs (the model packs with batch
    size 1, and a packed row's attention is quadratic in its whole length, so only rows that need
    boundaries go there)."""
    S = len(rows[0].ids)
    whole = [r for r in rows if len(r.cu_seqlens) == 2]
    mixed = [r for r in rows if len(r.cu_seqlens) > 2]
    parts = []
    if whole:
        parts.append(Part(torch.from_numpy(np.stack([r.ids for r in whole])), None, len(whole) * (S - 1)))
    if mixed:
        ids = np.concatenate([r.ids for r in mixed])
        cu = np.concatenate([[0]] + [r.cu_seqlens[1:] + i * S for i, r in enumerate(mixed)])
        parts.append(Part(torch.from_numpy(ids)[None], torch.from_numpy(cu), len(ids) - (len(cu) - 1)))
    return Batch(parts)


class ShuffledRows:
    """The training order: the packed rows of the train split pass through a buffer of `size` rows and
    each next row is drawn from it at random (seeded), so that a batch mixes many documents and
    consecutive steps do not march through one long file. size 1: rows in reading order.

    `state()` / `restore()` give and take everything needed to continue exactly: the reader's position,
    the buffered rows and the generator's state."""

    def __init__(self, corpus: PackedCorpus, size: int, seed: int):
        if size < 1:
            raise DataError(f"the shuffle buffer needs at least 1 row, got {size}")
        self.corpus, self.size = corpus, size
        self.rng = np.random.default_rng([seed, 1])
        self.reader_position = Position()
        self.buffer: list[Row] = []
        self._reader: Iterator[Row] | None = None

    def next_row(self) -> Row:
        if self._reader is None:
            self._reader = self.corpus.rows(self.reader_position)
        while len(self.buffer) < self.size:
            row = next(self._reader)  # the train split never ends
            self.buffer.append(row)
            self.reader_position = row.next
        i = int(self.rng.integers(len(self.buffer)))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-ready dict, tensors) describing where the stream stands."""
        S = self.corpus.seq_len
        ids = np.stack([r.ids for r in self.buffer]) if self.buffer else np.zeros((0, S), dtype=np.int64)
        cu = [r.cu_seqlens for r in self.buffer]
        tensors = {"data.buffer.ids": torch.from_numpy(ids),
                   "data.buffer.cu_seqlens": torch.from_numpy(np.concatenate(cu) if cu else np.zeros(0, np.int64)),
                   "data.buffer.cu_lengths": torch.tensor([len(c) for c in cu], dtype=torch.int64)}
        return {"reader": self.reader_position.to_dict(), "rng": self.rng.bit_generator.state}, tensors

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.reader_position = Position(**state["reader"])
        self.rng.bit_generator.state = state["rng"]
        cu = np.split(tensors["data.buffer.cu_seqlens"].numpy(), np.cumsum(tensors["data.buffer.cu_lengths"].numpy())[:-1])
        ids = tensors["data.buffer.ids"].numpy()
        self.buffer = [Row(ids[i].copy(), cu[i].copy(), self.reader_position) for i in range(len(ids))]
        self._reader = None
