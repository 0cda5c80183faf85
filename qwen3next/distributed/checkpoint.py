"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), and Hugging Face export.

`save(directory, model, optimizer, step)` writes every rank's shards of the model and optimizer state
plus `config.json` (the model config, checked on load). `load(directory, model, optimizer)` reads them
into a model parallelized on ANY mesh (DCP reshards: save on 4 ranks, resume on 2). On disk the
routed experts' `gate_up_proj` [E, 2I, D] is stored as [E, 2, I, D] (gate, up), so that the expert-
tensor-parallel shard (each rank: its gate rows and its up rows) is one contiguous box of it.

`export_hf(model, directory)` writes the Hugging Face layout from a parallelized model: one parameter
at a time is gathered (`full_tensor`), split into the per-expert keys, and rank 0 writes shards of at
most `max_shard_size` as it goes, so no rank ever holds the whole model.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..checkpoint import hf_state_items, write_hf_checkpoint
from ..config import Qwen3NextConfig
from .dims import ParallelConfigError

GATE_UP = "experts.gate_up_proj"
# the optimizer's state and hyper-parameters per parameter name: any grouping of the parameters (they
# are grouped by device mesh, which differs between layouts) loads it
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _storage_layout(t):
    """gate_up [E, 2I, D] -> its [E, 2, I, D] view (a DTensor keeps its shards, re-described)."""
    if not isinstance(t, DTensor):
        return t.view(t.shape[0], 2, t.shape[1] // 2, t.shape[2])
    placements = []
    for p in t.placements:
        if isinstance(p, _StridedShard) and p.dim == 1 and p.split_factor == 2:
            placements.append(Shard(2))
        elif isinstance(p, Shard) and not isinstance(p, _StridedShard) and p.dim != 1:
            placements.append(Shard(p.dim + (p.dim > 1)))
        elif p.is_shard():
            raise ParallelConfigError(f"cannot store a gate_up_proj sharded as {t.placements}")
        else:
            placements.append(p)
    loc = t.to_local()
    shape = (t.shape[0], 2, t.shape[1] // 2, t.shape[2])
    view = loc.view(loc.shape[0], 2, loc.shape[1] // 2, loc.shape[2])
    return DTensor.from_local(view, t.device_mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _on_disk(tree):
    """The state trees with every gate_up tensor (model or optimizer state) in its storage layout."""
    def walk(node, name=""):
        if isinstance(node, dict):
            return {k: walk(v, k if isinstance(k, str) and GATE_UP in k else name) for k, v in node.items()}
        if isinstance(node, torch.Tensor) and GATE_UP in name and node.dim() == 3:
            return _storage_layout(node)
        return node
    return walk(tree)


def _states(model, optimizer):
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_sd, "optim": optim_sd}


def save(directory, model, optimizer=None, step: int = 0) -> None:
    """Write this rank's shards of the model (and optimizer) state to `directory` (all ranks call it)."""
    directory = os.fspath(directory)
    states = _states(model, optimizer)
    dcp.save({**_on_disk(states), "step": torch.tensor(step)}, checkpoint_id=directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.config.save_pretrained(directory)
    if dist.is_initialized():
        dist.barrier()


def check_config(directory, config: Qwen3NextConfig) -> None:
    """Raise ParallelConfigError unless `directory` holds a checkpoint of a model with this config."""
    saved = Qwen3NextConfig.from_pretrained(directory).to_dict()
    mine = config.to_dict()
    differ = sorted(k for k in set(saved) | set(mine) if k != "dtype" and saved.get(k) != mine.get(k))
    if differ:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs model {mine.get(k)!r}" for k in differ[:8])
        raise ParallelConfigError(f"checkpoint {directory} was saved with a different model config ({shown})")


def load(directory, model, optimizer=None) -> int:
    """Fill the model (and optimizer) from a `save` directory, whatever mesh saved it; returns the step."""
    directory = os.fspath(directory)
    check_config(directory, model.config)
    states = _states(model, optimizer)
    box = {**_on_disk(states), "step": torch.tensor(0)}
    with warnings.catch_warnings():  # without a process group DCP reads in this process alone, as meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(box, checkpoint_id=directory)  # tensors in place: the views share storage with `states`
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=states["model"], optim_state_dict={}, options=OPTIONS)
    else:
        # the hyper-parameters are values, not tensors: they were loaded into `box`
        optim = {k: (v if isinstance(v, torch.Tensor) else box["optim"][k]) for k, v in states["optim"].items()}
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=optim, options=OPTIONS)
    return int(box["step"])


class _Gathered:
    """What `checkpoint.hf_state_items` reads from a model: its config and a state dict whose tensors
    are gathered one at a time, as they are reached."""

    def __init__(self, model):
        self.config = model.config
        self._model = model

    def state_dict(self):
        return self

    def items(self):
        for name, t in self._model.state_dict().items():
            yield name, whole_tensor(name, t)


def whole_tensor(name: str, t):
    """The whole tensor of a state-dict entry (a DTensor gathered). gate_up goes through its storage layout,
    whose plain shards every torch gathers (torch 2.11's `full_tensor` rejects the strided ones)."""
    if not isinstance(t, DTensor):
        return t
    if GATE_UP in name and t.dim() == 3:
        return _storage_layout(t).full_tensor().view(t.shape)
    return t.full_tensor()


def export_hf(model, directory, max_shard_size: int | str = "5GB") -> None:
    """Write the Hugging Face layout (`config.json`, safetensors shards, index) from a parallelized
    model; all ranks call it (gathering is collective), rank 0 writes (`write_hf_checkpoint`). Peak extra
    memory on rank 0: one parameter plus one shard."""
    items = hf_state_items(_Gathered(model))
    if not dist.is_initialized() or dist.get_rank() == 0:
        # copies: a gathered expert's per-expert slices would otherwise keep the whole gathered tensor alive
        write_hf_checkpoint(directory, ((key, t.detach().to("cpu", copy=True)) for key, t in items), model.config,
                            max_shard_size)
    else:
        for _ in items:  # take part in every gather
            pass
    if dist.is_initialized():
        dist.barrier()
