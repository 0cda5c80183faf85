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
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, load_model, save_model
from .data import TextTokenizer, save_tokenizer

MARKER = "COMPLETE.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
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
    with open(path + ".tmp", "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


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
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    if not os.path.isfile(os.path.join(final, MARKER)):
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_model(model, partial)
        save_tokenizer(tokenizer, partial)
        names = {id(p): n for n, p in model.named_parameters()}
        tensors, groups = optimizer_tensors(optimizer, names)
        tensors.update(extra_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = rng
        save_file(tensors, os.path.join(partial, STATE_TENSORS), metadata={"format": "pt"})
        _write_json(os.path.join(partial, STATE_JSON), {**state, "format": FORMAT, "step": step,
                                                        "optimizer_groups": groups})
        files = sorted(f for f in os.listdir(partial) if not f.endswith(".tmp"))
        _write_json(os.path.join(partial, MARKER), {"step": step, "files": {
            f: {"size": os.path.getsize(os.path.join(partial, f)), "sha256": _sha256(os.path.join(partial, f))}
            for f in files}})
        if os.path.isdir(final):  # an incomplete leftover of the same step
            shutil.rmtree(final)
        os.replace(partial, final)
    with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    if keep > 0:
        complete = sorted(d for d in os.listdir(root) if d.startswith("step-") and "." not in d
                          and os.path.isfile(os.path.join(root, d, MARKER)))
        for old in complete[:-keep]:
            if old != name:
                shutil.rmtree(os.path.join(root, old))
    return final


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


def load_checkpoint(directory: str, device) -> tuple:
    """Verify and read a training checkpoint: (model in fp32 on `device`, state dict from the JSON,
    the tensors of trainer_state.safetensors)."""
    verify_checkpoint(directory)
    try:
        with open(os.path.join(directory, STATE_JSON)) as f:
            state = json.load(f)
        tensors = load_file(os.path.join(directory, STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: unreadable training state ({e})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: training-state format {state.get('format')!r}, this version reads {FORMAT}")
    model = load_model(directory, dtype=torch.float32, device=device)
    return model, state, tensors


def restore_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
