"""Checkpoint I/O in the Hugging Face layout: `config.json` + `model.safetensors` (or shards with
`model.safetensors.index.json`). Safetensors only, never pickle.

On disk (as published and as transformers writes it) each expert is separate:
`model.layers.N.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`; in memory they are stacked
(`experts.gate_up_proj` [E, 2I, D] = [gate; up] per expert, `experts.down_proj` [E, D, I]). Loading
accepts both. Multi-token-prediction weights (`mtp.*`) are skipped. Every other key maps one to one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Qwen3NextConfig
from .files import atomic_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model: missing, unexpected or mis-shaped tensors, or no files."""


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '64KB' or a byte count -> bytes (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a size from {size!r}; use e.g. '5GB', '200MB' or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def resolve_dtype(dtype: torch.dtype | str | None, config: Qwen3NextConfig) -> torch.dtype:
    """The dtype to load in: the argument, else the checkpoint's `dtype`, else fp32."""
    name = dtype if dtype is not None else (config.dtype or "float32")
    if isinstance(name, torch.dtype):
        return name
    result = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ValueError(f"not a floating-point dtype: {name!r}")
    return result


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (from the index when sharded)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a checkpoint directory")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise CheckpointError(f"{path}: the index names shard files that are not there: {absent}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise CheckpointError(f"{path}: only pickle weights found; qwen3next reads safetensors only")
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_model(path, dtype=None, device=None):
    """Build the model from `path/config.json` and fill it from the safetensors files, tensor by tensor,
    straight into `dtype` on `device` (the model is first made on the meta device, so no second copy
    of the weights is ever held). Raises CheckpointError naming every missing, unexpected or
    mis-shaped tensor before any is read."""
    from .model import Qwen3NextForCausalLM

    path = os.fspath(path)
    config = Qwen3NextConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device if device is not None else "cpu")
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, index, tensor in checkpoint_parts(path, {n: p.shape for n, p in params.items()}, config):
            params[name][index].copy_(tensor)
    model.eval()
    return model


def checkpoint_parts(path, shapes: dict[str, torch.Size], config: Qwen3NextConfig):
    """Yield (parameter name, index, tensor) for every tensor of the checkpoint at `path`, read one at a
    time, grouped by parameter in the order of `shapes` (parameter name -> shape): the tensor is
    `parameter[index]` (index () for a whole parameter; an expert's row or its gate / up half of a
    stacked experts parameter). The files are matched against `shapes` first, from their headers:
    CheckpointError naming every missing, unexpected or mis-shaped tensor before any is read.
    Multi-token-prediction tensors (`mtp.*`) are skipped with a warning."""
    path = os.fspath(path)
    files = checkpoint_files(path)
    expert_size = config.moe_intermediate_size
    halves = {"gate_proj": slice(0, expert_size), "up_proj": slice(expert_size, 2 * expert_size)}
    plan: dict[str, list] = defaultdict(list)  # parameter -> [(index, part, file, key)]
    unexpected, misshaped, skipped_mtp = [], [], 0
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith("mtp."):
                    skipped_mtp += 1
                    continue
                m = _EXPERT_KEY.match(key)
                if m:
                    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                    name = f"{prefix}.down_proj" if proj == "down_proj" else f"{prefix}.gate_up_proj"
                    index, part = ((e,) if proj == "down_proj" else (e, halves[proj])), (e, proj)
                    if name not in shapes or e >= shapes[name][0]:
                        unexpected.append(key)
                        continue
                else:
                    name, index, part = key, (), "all"
                    if name not in shapes:
                        unexpected.append(key)
                        continue
                want = tuple(torch.empty(shapes[name], device="meta")[index].shape)
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    misshaped.append(f"{key}: file {got}, model {want}")
                    continue
                plan[name].append((index, part, file, key))
    if skipped_mtp:
        warnings.warn(f"skipped {skipped_mtp} multi-token-prediction tensors (mtp.*): not used by this model", stacklevel=3)

    missing = []
    for name, shape in shapes.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            projs = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
            found = {part for _, part, _, _ in plan[name]}
            if "all" not in found:
                missing += [f"{name.rsplit('.', 1)[0]}.{e}.{proj}.weight"
                            for e in range(shape[0]) for proj in projs if (e, proj) not in found]
        elif not plan[name] and not (name == "lm_head.weight" and config.tie_word_embeddings):
            missing.append(name)
    if missing or unexpected or misshaped:
        raise CheckpointError(f"checkpoint {path} does not match its config:" + _listing(
            ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)))

    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt", device="cpu")) for file in files}
        for name in shapes:
            for index, _, file, key in plan[name]:
                yield name, index, handles[file].get_tensor(key)


def _listing(*groups) -> str:
    lines = []
    for label, items in groups:
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            lines.append(f"\n  {len(items)} {label}: {shown}")
    return "".join(lines)


def hf_state_items(model):
    """(on-disk key, tensor) pairs of the Hugging Face layout, one expert projection at a time."""
    tied = model.config.tie_word_embeddings
    I = model.config.moe_intermediate_size
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", tensor[e, :I]
                yield f"{prefix}.{e}.up_proj.weight", tensor[e, I:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor


def save_model(model, directory, max_shard_size: int | str = "5GB") -> None:
    """Write `config.json` and the weights in the Hugging Face layout (per-expert keys; shards of at
    most `max_shard_size` plus an index when they do not fit one file): `write_hf_checkpoint`."""
    write_hf_checkpoint(directory, hf_state_items(model), model.config, max_shard_size)


def write_hf_checkpoint(directory, items, config: Qwen3NextConfig, max_shard_size: int | str = "5GB") -> None:
    """Write (key, tensor) `items` in Hugging Face key order as safetensors shards of at most `max_shard_size`,
    streaming (one shard in memory at a time), then the index (when there are several shards) and
    `config.json` (its dtype: the first tensor's). Shards are written under temporary names and renamed
    into place at the end, the index and config last, and stale shards of an earlier save are removed, so
    a reader never sees a half-written checkpoint as complete."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    limit = parse_size(max_shard_size)
    written: list[tuple[str, list[str]]] = []  # (temporary file, its keys)
    pending: dict[str, torch.Tensor] = {}
    size = total = 0
    dtype = None

    def flush():
        tmp = os.path.join(directory, f"part-{len(written):05d}.safetensors.tmp")
        save_file(pending, tmp, metadata={"format": "pt"})
        written.append((tmp, list(pending)))

    for key, tensor in items:
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = dtype or tensor.dtype
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > limit:
            flush()
            pending, size = {}, 0
        pending[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    n = len(written)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for (tmp, keys), name in zip(written, names):
        os.replace(tmp, os.path.join(directory, name))
        weight_map.update({k: name for k in keys})
    for stale in os.listdir(directory):
        if stale.startswith("model") and stale.endswith(".safetensors") and stale not in names:
            os.remove(os.path.join(directory, stale))
    index = os.path.join(directory, INDEX_FILE)
    if n > 1:
        with atomic_open(index) as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    elif os.path.exists(index):
        os.remove(index)
    if dtype is not None and (config.dtype is None or resolve_dtype(None, config) != dtype):
        config = Qwen3NextConfig.from_dict({**config.to_dict(), "dtype": str(dtype).replace("torch.", "")})
    config.save_pretrained(directory)


