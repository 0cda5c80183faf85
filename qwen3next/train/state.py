"""Training checkpoints: one directory that is both a Hugging Face checkpoint and a resumable state.

    checkpoints/step-000100/
      config.json, model.safetensors (or shards + index)   the model (checkpoint.save_model): from_pretrained
                                                           and transformers load it as it is
      tokenizer.json, tokenizer_config.json                the tokenizer
      trainer_state.safetensors                            AdamW moments and step counts (keyed by parameter
                                                           name), RNG states, the data shuffle buffer
      trainer_state.json                                   step, tokens, data position, settings, corpus
      COMPLETE.json                                        written last: size and sha256 of every file above
    checkpoints/latest                                     the name of the newest complete checkpoint

A run under torchrun (a parallel layout) adds `dcp/`: every rank's shards of the model and optimizer
state (torch.distributed.checkpoint, `distributed.checkpoint.save`); its trainer_state.safetensors then
holds no optimizer tensors. The model files are gathered from the shards, so the directory is a
Hugging Face checkpoint all the same, and it resumes on any layout (or in one process).

A checkpoint is assembled in `step-000100.partial/` and renamed into place once its marker is written,
so a crash leaves either the whole checkpoint or a `.partial` directory that nothing reads. Loading
re-hashes every file against the marker: a partial, truncated or altered checkpoint is reported with
what is wrong, never loaded. Safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, load_model, save_model
from ..config import Qwen3NextConfig
from ..files import atomic_open
from ..model import Qwen3NextForCausalLM
from .data import TextTokenizer, save_tokenizer

MARKER = "COMPLETE.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
SHARDED = "dcp"
LATEST = "latest"
FORMAT = 1


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: str, body) -> None:
    with atomic_open(path) as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------------------------- optimizer
def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    """The optimizer's per-parameter state as {'optimizer.<param>.<key>': tensor} and its param groups
    (hyper-parameters, parameters by name) as JSON-ready dicts. `names` maps id(param) -> name."""
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        params = [names[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        for p, name in zip(group["params"], params):
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name}.{key} is not a tensor: {type(value).__name__}")
                tensors[f"optimizer.{name}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors, groups


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, groups: list) -> None:
    """Inverse of `optimizer_tensors` for an optimizer built the same way over the same parameters."""
    index, state, param_groups = 0, {}, []
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        ours = [names[id(p)] for p in group["params"]]
        if ours != saved["params"]:
            raise CheckpointError("the optimizer in the checkpoint covers other parameters than this model's")
        ids = list(range(index, index + len(ours)))
        index += len(ours)
        param_groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
        for i, name in zip(ids, ours):
            prefix = f"optimizer.{name}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                state[i] = entry
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(run_dir: str, step: int, model, optimizer, tokenizer: TextTokenizer, state: dict,
                    extra_tensors: dict, keep: int = 0) -> str:
    """Write the checkpoint of `step` under `run_dir/checkpoints/` atomically (`state` to the JSON file,
    the optimizer, RNG and `extra_tensors` to the safetensors file), point `latest` at it, and delete
    all but the newest `keep` complete checkpoints (keep = 0 keeps all). Returns its path."""
    root, name, final = _paths(run_dir, step)
    if not os.path.isfile(os.path.join(final, MARKER)):
        partial = _fresh_partial(final)
        save_model(model, partial)
        names = {id(p): n for n, p in model.named_parameters()}
        tensors, groups = optimizer_tensors(optimizer, names)
        _write_trainer_state(partial, step, tokenizer, {**state, "optimizer_groups": groups},
                             {**tensors, **extra_tensors})
        _seal(partial, final, step)
    _point_latest(root, name, keep)
    return final


def save_sharded_checkpoint(run_dir: str, step: int, model, optimizer, tokenizer: TextTokenizer, state: dict,
                            extra_tensors: dict, keep: int = 0) -> str:
    """`save_checkpoint` for a parallelized model: every rank calls it and writes its shards of the
    model and optimizer under `dcp/`; the Hugging Face model is gathered one tensor at a time; rank 0
    writes everything else. Returns the path (on every rank, once the checkpoint is complete)."""
    from ..distributed import checkpoint as dcp_checkpoint

    rank0 = dist.get_rank() == 0
    root, name, final = _paths(run_dir, step)
    if not os.path.isfile(os.path.join(final, MARKER)):
        partial = final + ".partial"
        if rank0:
            _fresh_partial(final)
        dist.barrier()
        dcp_checkpoint.save(os.path.join(partial, SHARDED), model, optimizer, step)
        dcp_checkpoint.export_hf(model, partial)
        if rank0:
            _write_trainer_state(partial, step, tokenizer, state, extra_tensors)
            _seal(partial, final, step)
    if rank0:
        _point_latest(root, name, keep)
    dist.barrier()
    return final


def _paths(run_dir: str, step: int) -> tuple[str, str, str]:
    root = os.path.join(run_dir, "checkpoints")
    name = checkpoint_name(step)
    return root, name, os.path.join(root, name)


def _fresh_partial(final: str) -> str:
    """An empty `final.partial` directory (parents created)."""
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


def _write_trainer_state(partial: str, step: int, tokenizer: TextTokenizer, state: dict, tensors: dict) -> None:
    """The tokenizer, the JSON state and the tensors (with this process's RNG states added)."""
    save_tokenizer(tokenizer, partial)
    tensors = {**tensors, "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    save_file(tensors, os.path.join(partial, STATE_TENSORS), metadata={"format": "pt"})
    _write_json(os.path.join(partial, STATE_JSON), {**state, "format": FORMAT, "step": step})


def _seal(partial: str, final: str, step: int) -> None:
    """Write the marker (size and sha256 of every file, subdirectories included) and rename into place."""
    files = sorted(os.path.relpath(os.path.join(d, f), partial) for d, _, names in os.walk(partial)
                   for f in names if not f.endswith(".tmp"))
    _write_json(os.path.join(partial, MARKER), {"step": step, "files": {
        f: {"size": os.path.getsize(os.path.join(partial, f)), "sha256": _sha256(os.path.join(partial, f))}
        for f in files}})
    if os.path.isdir(final):  # an incomplete leftover of the same step
        shutil.rmtree(final)
    os.replace(partial, final)


def _point_latest(root: str, name: str, keep: int) -> None:
    with atomic_open(os.path.join(root, LATEST)) as f:
        f.write(name + "\n")
    if keep > 0:
        complete = sorted(d for d in os.listdir(root) if d.startswith("step-") and "." not in d
                          and os.path.isfile(os.path.join(root, d, MARKER)))
        for old in complete[:-keep]:
            if old != name:
                shutil.rmtree(os.path.join(root, old))


# --------------------------------------------------------------------------------------------- load
def find_checkpoint(path: str) -> str:
    """`path` is a checkpoint directory, or a run directory whose `checkpoints/latest` names one."""
    if not os.path.isdir(path):
        raise CheckpointError(f"cannot resume from {path!r}: no such directory")
    latest = os.path.join(path, "checkpoints", LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, "checkpoints", f.read().strip())
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path}: no complete checkpoint (checkpoints/{LATEST} is missing)")
    return path


def run_directory(checkpoint: str) -> str:
    """The run directory a checkpoint belongs to (`run/checkpoints/step-N` -> `run`)."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def verify_checkpoint(directory: str) -> dict:
    """Check every file against the completeness marker; return the marker. Raises CheckpointError
    saying what is missing, truncated or altered."""
    marker = os.path.join(directory, MARKER)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not os.path.isfile(marker):
        what = "an incomplete training checkpoint (the save did not finish)" if os.path.isfile(
            os.path.join(directory, STATE_JSON)) or directory.endswith(".partial") else "not a training checkpoint"
        raise CheckpointError(f"{directory}: no {MARKER}: {what}; refusing to load it")
    try:
        with open(marker) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: unreadable {MARKER} ({e})") from None
    problems = []
    for name, want in sorted(listed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != want["size"]:
            problems.append(f"{name} has {os.path.getsize(path)} bytes, {want['size']} were written")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{name} does not match its sha256 (altered or corrupt)")
    if problems:
        raise CheckpointError(f"{directory}: corrupt checkpoint: " + "; ".join(problems))
    return listed


def is_sharded(directory: str) -> bool:
    """Whether a checkpoint was written under a parallel layout (its state is in `dcp/`)."""
    return os.path.isdir(os.path.join(directory, SHARDED))


def load_checkpoint(directory: str, device) -> tuple:
    """Verify and read a training checkpoint: (model in fp32 on `device`, state dict from the JSON,
    the tensors of trainer_state.safetensors). The model of a sharded checkpoint is built on the meta
    device: its weights come with the optimizer's (`load_sharded_state`). Under torch.distributed,
    rank 0 verifies the files and every rank raises what it found."""
    if dist.is_initialized():
        problem = [None]
        if dist.get_rank() == 0:
            try:
                verify_checkpoint(directory)
            except CheckpointError as e:
                problem = [str(e)]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise CheckpointError(problem[0])
    else:
        verify_checkpoint(directory)
    try:
        with open(os.path.join(directory, STATE_JSON)) as f:
            state = json.load(f)
        tensors = load_file(os.path.join(directory, STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: unreadable training state ({e})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: training-state format {state.get('format')!r}, this version reads {FORMAT}")
    if is_sharded(directory):
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(Qwen3NextConfig.from_pretrained(directory))
    else:
        model = load_model(directory, dtype=torch.float32, device=device)
    return model, state, tensors


def load_sharded_state(directory: str, model, optimizer) -> None:
    """Fill a model (parallelized on any layout, or not) and its optimizer from a sharded checkpoint."""
    from ..distributed import checkpoint as dcp_checkpoint

    dcp_checkpoint.load(os.path.join(directory, SHARDED), model, optimizer)


def restore_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
