"""A parallelized model that no rank ever holds whole (the 80B-A3B fits no single device): built on the
meta device, `parallelize`d, given storage for this rank's shards only, then filled one parameter at a
time. Each parameter's full tensor is made on the CPU (read from a checkpoint, or drawn from the seeded
generator), this rank keeps its shard of it (`local_shard`) and drops the rest, so the extra memory is
one parameter at most (the largest: a layer's stacked experts; on a GPU mesh it passes through the
device once, `distribute_tensor` cuts it there).

    model = build_sharded(config, dims, device)   # meta -> parallelize -> this rank's storage
    fill_from_checkpoint(model, "ckpt/")          # the checkpoint's weights (load_model's files and checks)
    fill_seeded(model, seed)                      # one process's weights for `torch.manual_seed(seed)`
    fill_random(model, seed)                      # the same distributions, drawn shard by shard on the device
"""

from __future__ import annotations

import itertools

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..checkpoint import checkpoint_parts
from ..model import Qwen3NextForCausalLM, init_module
from .tensor_parallel import swapped_parameters


def build_sharded(config, dims, device, dtype=torch.float32, **parallelize_options):
    """Qwen3NextForCausalLM(config) parallelized over `dims` with storage for this rank's shards on
    `device`, weights not yet filled (uninitialised memory): call a `fill_*` function next."""
    from .apply import parallelize

    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    return materialise(parallelize(model.to(dtype), dims, **parallelize_options), device)


def materialise(model, device):
    """Storage on `device` for a meta-device model's (local) parameters, uninitialised; tied embeddings
    stay tied (`to_empty` gives each module a parameter of its own)."""
    model = model.to_empty(device=device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` (a whole parameter) laid out as `like` (a DTensor parameter) holds it,
    so that `like.full_tensor()` would give back `full`; a plain tensor: `full` itself."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _put(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's shard of `full` into `param` (a DTensor's local tensor, or a plain parameter)."""
    target = param.to_local() if isinstance(param, DTensor) else param
    target.copy_(local_shard(full, param))


@torch.no_grad()
def fill_from_checkpoint(model, path) -> None:
    """Fill a (parallelized, materialised) model's shards from the Hugging Face-layout checkpoint at
    `path`: per-expert or stacked experts, `mtp.*` skipped, CheckpointError naming every missing,
    unexpected or mis-shaped tensor before any is read (`checkpoint.checkpoint_parts`). One parameter
    at a time is assembled on the CPU and this rank keeps its shard."""
    params = dict(model.named_parameters())
    parts = checkpoint_parts(path, {name: p.shape for name, p in params.items()}, model.config)
    for name, group in itertools.groupby(parts, key=lambda part: part[0]):
        param = params[name]
        full = torch.empty(param.shape, dtype=param.dtype)
        for _, index, tensor in group:
            full[index].copy_(tensor)
        _put(param, full)


@torch.no_grad()
def fill_seeded(model, seed: int) -> None:
    """Fill a (parallelized, materialised) model's shards with exactly the weights of
    `torch.manual_seed(seed); Qwen3NextForCausalLM(config)` built on the CPU in one process, and leave
    the default generator where that leaves it.

    One process draws twice: while building (each layer's default initialisation, e.g. nn.Linear's
    uniform draws), then in `init_weights`, which overwrites every parameter. The first draws are
    replayed into scratch tensors (`_construction_draws`); then `init_module` (qwen3next.model) runs module by
    module, in `init_weights`' order, on full-size CPU stand-ins of the module's parameters, and this
    rank keeps its shards. Every rank draws every value, as one process would (the 80B-A3B: 8e10
    normal draws, about 9 minutes at the 150M/s of one CPU core)."""
    torch.manual_seed(seed)
    for draw in _construction_draws(model.config):
        draw()
    std = model.config.initializer_range
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        full = {name: torch.empty(p.shape, dtype=p.dtype) for name, p in params.items()}
        with swapped_parameters(module, full):
            init_module(module, std)
        for name, p in params.items():
            _put(p, full[name])


@torch.no_grad()
def fill_random(model, seed: int) -> None:
    """Fill a (parallelized, materialised) model's shards with random weights from the model's own
    initialisation (`init_module`'s distributions), drawn directly into this rank's shards on their
    device: seconds for the 80B-A3B, against minutes for `fill_seeded`, but not one process's weights
    (each rank draws its shards from the same seed). Parameters replicated over ranks come out equal on
    every rank when the ranks' shard shapes are equal (the same draws in the same order). For benchmarks."""
    torch.manual_seed(seed)
    std = model.config.initializer_range
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if params:
            shards = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in params.items()}
            with swapped_parameters(module, shards):
                init_module(module, std)


class _Draws(TorchDispatchMode):
    """Records the random ops (those tagged `nondeterministic_seeded`) run while it is active, on meta
    tensors, as calls that repeat them on CPU scratch tensors of the same sizes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.calls.append(_Draw(func, tree_map(_Blank.of, args), tree_map(_Blank.of, kwargs)))
        return func(*args, **kwargs)


class _Blank:
    """A tensor's size, stride and dtype: replayed as an uninitialised CPU tensor."""

    def __init__(self, t: torch.Tensor):
        self.spec = (tuple(t.shape), t.stride(), t.dtype)

    @classmethod
    def of(cls, x):
        return cls(x) if isinstance(x, torch.Tensor) else x

    def make(self) -> torch.Tensor:
        size, stride, dtype = self.spec
        return torch.empty_strided(size, stride, dtype=dtype)

    def __eq__(self, other):
        return isinstance(other, _Blank) and self.spec == other.spec


class _Draw:
    def __init__(self, func, args, kwargs):
        self.func, self.args, self.kwargs = func, args, kwargs

    def __call__(self) -> None:
        make = lambda x: x.make() if isinstance(x, _Blank) else x  # noqa: E731
        self.func(*tree_map(make, self.args), **tree_map(make, self.kwargs))

    def __eq__(self, other):
        return (self.func, self.args, self.kwargs) == (other.func, other.args, other.kwargs)


def _construction_draws(config) -> list[_Draw]:
    """The random draws of building Qwen3NextForCausalLM(config) that come before its `init_weights`
    (recorded on the meta device: what building draws, less the tail that `init_weights` draws)."""
    with torch.device("meta"), _Draws() as built:
        model = Qwen3NextForCausalLM(config)
    with _Draws() as init:
        model.init_weights()
    n = len(built.calls) - len(init.calls)
    if built.calls[n:] != init.calls:
        raise RuntimeError("building Qwen3NextForCausalLM no longer ends with its init_weights' draws: "
                           "fill_seeded cannot replay it")
    return built.calls[:n]
