"""Scale-out on torch.distributed: `ParallelDims` (the layout and its DeviceMesh) and `parallelize`
(tensor/sequence, expert, context parallelism and FSDP2 applied to a built model from outside)."""

from .dims import ParallelConfigError, ParallelDims
from .parallelize import parallelize

__all__ = ["ParallelConfigError", "ParallelDims", "parallelize"]
