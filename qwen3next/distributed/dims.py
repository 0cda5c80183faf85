"""ParallelDims: the parallel layout of a run and its named DeviceMesh.

The world is a 4-dim mesh ("dp_shard", "cp", "ep", "tp"), outermost first (tp innermost, so on a node
its ranks are neighbours on NVLink). What each dim means for a rank:
  dp_shard  its own rows of the global batch; parameters FSDP2-sharded, gradients summed over the batch
  cp        its contiguous part of the sequence (`cp_slice`); parameters replicated (FSDP-sharded with dp)
  ep        the same tokens as its ep peers; routed experts sharded E / ep, tokens exchanged all-to-all
  tp        the same tokens; heads, channels, vocab and intermediate dims sharded; sequence-parallel
            residual stream between blocks
The product must equal the world size (torchrun's WORLD_SIZE). All dims of 1 in a single process need no
process group at all.

With `ep_in_dp=True` the ep ranks are dp_shard ranks instead (as in Megatron-core and torchtitan: each
its own rows, so the mixers do no duplicate work): ep must divide dp_shard and adds nothing to the world
size (dp_shard * cp * tp). The mesh is then ("dp_mod_ep", "ep", "cp", "tp"): "dp_shard" is the first
two dims flattened, and "expert_dp" (dp_mod_ep x cp) the ranks that hold the same experts but see
other tokens (their expert gradients are summed over it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DIM_NAMES = ("dp_shard", "cp", "ep", "tp")


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run (raised before any work is done)."""


@dataclass
class ParallelDims:
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    ep_in_dp: bool = False
    mesh: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        bad = [f"{n}={getattr(self, n)!r}" for n in DIM_NAMES
               if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool) or getattr(self, n) < 1]
        if bad:
            raise ParallelConfigError(f"parallel dims must be integers >= 1; got {', '.join(bad)}")
        if self.ep_in_dp and self.dp_shard % self.ep:
            raise ParallelConfigError(f"with ep_in_dp the ep ranks are dp_shard ranks: ep={self.ep} must divide "
                                      f"dp_shard={self.dp_shard}")
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size == 1 and world == 1:
            return
        if world != self.world_size:
            names = ("dp_shard", "cp", "tp") if self.ep_in_dp else DIM_NAMES
            product = f"{' * '.join(names)} = {' * '.join(str(getattr(self, n)) for n in names)}"
            raise ParallelConfigError(
                f"{product} = {self.world_size}, but the world has {world} processes (launch with "
                f"torchrun --nproc-per-node {self.world_size}, or change the dims)"
            )
        if self.world_size > 1:
            self._build_mesh()

    # ------------------------------------------------------------------------------------ mesh
    @property
    def world_size(self) -> int:
        return self.dp_shard * self.cp * self.tp * (1 if self.ep_in_dp else self.ep)

    @property
    def enabled(self) -> bool:
        """Whether any dim is larger than 1 (otherwise parallelize() changes nothing)."""
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _build_mesh(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            backend = "nccl" if self.device_type == "cuda" else "gloo"
            if self.device_type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        if self.ep_in_dp:
            shape, names = (self.dp_shard // self.ep, self.ep, self.cp, self.tp), ("dp_mod_ep", "ep", "cp", "tp")
        else:
            shape, names = tuple(getattr(self, n) for n in DIM_NAMES), DIM_NAMES
        self.mesh = init_device_mesh(self.device_type, shape, mesh_dim_names=names)
        # flattened dims: "dp_shard_cp", the ranks that see different tokens of the batch (FSDP shards over
        # them and losses sum over them); under ep_in_dp also "dp_shard" and "expert_dp"
        batch = ("dp_mod_ep", "ep", "cp") if self.ep_in_dp else ("dp_shard", "cp")
        self._flat = {"dp_shard_cp": self.mesh[batch]._flatten("dp_shard_cp")}
        if self.ep_in_dp:
            self._flat["dp_shard"] = self.mesh["dp_mod_ep", "ep"]._flatten("dp_shard")
            self._flat["expert_dp"] = self.mesh["dp_mod_ep", "cp"]._flatten("expert_dp")

    def submesh(self, *names: str):
        """The mesh over the named dims (e.g. "tp"; "ep", "tp"; or a flattened one: "dp_shard_cp",
        "expert_dp"); None when it has one rank (or, for "expert_dp", without ep_in_dp)."""
        if self.mesh is None or (names == ("expert_dp",) and not self.ep_in_dp):
            return None
        if len(names) == 1:
            sub = self._flat[names[0]] if names[0] in self._flat else self.mesh[names[0]]
        else:
            sub = self.mesh[names]
        return sub if sub.size() > 1 else None

    def group(self, name: str):
        """The process group of one mesh dim (or "dp_shard_cp"); None when that dim is 1."""
        sub = self.submesh(name)
        return None if sub is None else sub.get_group()

    def rank(self, name: str) -> int:
        """This process's coordinate on a mesh dim (0 when the dim is 1)."""
        sub = self.submesh(name)
        return 0 if sub is None else sub.get_local_rank()

    @property
    def is_rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    # ------------------------------------------------------------------------------------ data
    def cp_slice(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous part of the sequence (`torch.tensor_split` over cp; uneven allowed)."""
        return torch.tensor_split(x, self.cp, dim=dim)[self.rank("cp")] if self.cp > 1 else x

    def dp_slice(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's rows of the global batch (`torch.tensor_split` over dp_shard)."""
        return torch.tensor_split(x, self.dp_shard, dim=dim)[self.rank("dp_shard")] if self.dp_shard > 1 else x

    def local_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The rows and sequence part of a global [B, T, ...] batch that this rank feeds the model."""
        return self.cp_slice(self.dp_slice(x))
