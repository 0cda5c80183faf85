"""Command-line glue for runs launched with torchrun: the parallel-layout flags and their setup.

    torchrun --nproc-per-node 2 -m qwen3next generate --model DIR --prompt "..." --tp 2

Every rank loads the checkpoint and cuts its shards from it; rank 0 prints. (Loading straight into
shards on the meta device, for models larger than one device, is not wired into the CLI yet.)
"""

from __future__ import annotations

from .dims import ParallelConfigError, ParallelDims


def add_generation_arguments(parser) -> None:
    group = parser.add_argument_group("parallel decoding (launch with torchrun --nproc-per-node TP*EP)")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (heads, vocab and experts split)")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (routed experts split)")


def generation_dims(args) -> ParallelDims:
    """The layout asked for (initialises the process group and this rank's CUDA device when > 1)."""
    try:
        return ParallelDims(tp=args.tp, ep=args.ep)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None


def parallelize_for_generation(model, dims: ParallelDims, args):
    """Shard a loaded model for decoding; the eager decode loop is the one that runs sharded (the static
    and CUDA-graph loops call the layers' graph-safe steps, which are not parallelized)."""
    if not dims.enabled:
        return model
    if args.decode in ("graph", "static"):
        raise SystemExit(f"error: --decode {args.decode} runs on one device; with --tp/--ep use auto or eager")
    args.decode = "eager"
    from .apply import parallelize

    try:
        return parallelize(model, dims, param_dtype=None, reduce_dtype=None)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
