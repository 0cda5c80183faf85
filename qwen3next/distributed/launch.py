"""Command-line glue for runs launched with torchrun: the parallel-layout flags and their setup.

    torchrun --nproc-per-node 4 -m qwen3next train corpus/ --out runs/a --tp 2 --dp-shard 2
    torchrun --nproc-per-node 2 -m qwen3next generate --model DIR --prompt "..." --tp 2

Every rank builds the model on the meta device, parallelizes it and fills only its own shards (from the
checkpoint, the seed of a fresh run, or a resumed run's DCP shards; `materialize.py`), so a model larger
than one device can be trained or decoded; rank 0 prints.
"""

from __future__ import annotations

from .dims import DIM_NAMES, ParallelConfigError, ParallelDims

FLAGS = {
    "dp_shard": "data-parallel ranks: each takes its rows of the batch; parameters FSDP2-sharded",
    "cp": "context-parallel ranks: each takes its part of every row's sequence",
    "ep": "expert-parallel ranks (routed experts split)",
    "tp": "tensor-parallel ranks (heads, vocab and experts split)",
}


def add_parallel_arguments(parser, names, title: str) -> None:
    """Flags --dp-shard, --cp, --ep, --tp (those in `names`), each defaulting to 1."""
    group = parser.add_argument_group(title)
    for name in names:
        group.add_argument(f"--{name.replace('_', '-')}", type=int, default=1, help=FLAGS[name])


def add_generation_arguments(parser) -> None:
    add_parallel_arguments(parser, ("tp", "ep"), "parallel decoding (launch with torchrun --nproc-per-node TP*EP)")


def add_training_arguments(parser) -> None:
    add_parallel_arguments(parser, DIM_NAMES, "parallel training (launch with torchrun --nproc-per-node "
                                              "DP_SHARD*CP*EP*TP, or DP_SHARD*CP*TP with --ep-in-dp; "
                                              "--batch-size is the global batch)")
    parser.add_argument("--ep-in-dp", action="store_true",
                        help="the ep ranks are dp_shard ranks, each with its own rows (as Megatron-core and "
                             "torchtitan; ep must divide dp_shard): no duplicate mixer work")


def parallel_dims(args) -> ParallelDims:
    """The layout asked for by the flags (initialises the process group and this rank's CUDA device
    when it has more than one rank); ParallelConfigError when it does not match the world."""
    return ParallelDims(**{name: getattr(args, name, 1) for name in DIM_NAMES},
                        ep_in_dp=getattr(args, "ep_in_dp", False))


def generation_dims(args) -> ParallelDims:
    try:
        return parallel_dims(args)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None


def load_for_generation(path, dims: ParallelDims, args, device):
    """The checkpoint's model for decoding in `args.dtype` on `device`: loaded whole in one process;
    under --tp/--ep built on the meta device, parallelized, and only this rank's shards read from the
    files (`materialize`). The eager decode loop is the one that runs sharded (the static and
    CUDA-graph loops call the layers' graph-safe steps, which are not parallelized)."""
    from ..checkpoint import load_model, resolve_dtype
    from ..config import Qwen3NextConfig

    if not dims.enabled:
        return load_model(path, dtype=args.dtype, device=device)
    if args.decode in ("graph", "static"):
        raise SystemExit(f"error: --decode {args.decode} runs on one device; with --tp/--ep use auto or eager")
    args.decode = "eager"
    from .materialize import build_sharded, fill_from_checkpoint

    config = Qwen3NextConfig.from_pretrained(path)
    try:
        model = build_sharded(config, dims, device, resolve_dtype(args.dtype, config), param_dtype=None,
                              reduce_dtype=None)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    fill_from_checkpoint(model, path)
    return model.eval()
