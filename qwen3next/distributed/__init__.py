"""Scale-out on torch.distributed: `ParallelDims` (the layout and its DeviceMesh) and `parallelize`
(tensor/sequence, expert, context parallelism and FSDP2 applied to a built model from outside).

Modules: dims (ParallelDims), apply (parallelize, the causal-LM forward under a layout),
tensor_parallel, expert_parallel, context_parallel, loss, comm (collectives with their gradients),
checkpoint (DCP save/load, Hugging Face export), materialize (a model built on the meta device, its
shards filled from a seed or a checkpoint), plan (memory/communication estimates), launch (CLI).
`parallelize` is imported on first use, so the CLI can read these flags without loading DTensor/FSDP.
"""

from .dims import ParallelConfigError, ParallelDims

__all__ = ["ParallelConfigError", "ParallelDims", "parallelize"]


def __getattr__(name):
    if name == "parallelize":
        from .apply import parallelize

        return parallelize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
