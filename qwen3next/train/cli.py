"""`qwen3next train` and `qwen3next demo`.

`add_commands(subparsers)` registers both with the main parser (qwen3next/cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import shutil
import sys
import sysconfig
import time

import torch

from ..checkpoint import CheckpointError
from ..config import PRESETS, ConfigError, Qwen3NextConfig
from ..distributed.dims import ParallelConfigError
from ..distributed.launch import add_training_arguments, parallel_dims
from .data import DEFAULT_INCLUDE, DataError, load_tokenizer
from .loop import Corpus, Trainer, TrainingError, TrainSettings
from .state import find_checkpoint, run_directory

DEFAULTS = TrainSettings()


def _log_to(run_dir: str, enabled: bool = True):
    """A logger that prints above the progress bar and appends to run_dir/train.log (when `enabled`:
    under torchrun, on rank 0 only)."""
    from tqdm.auto import tqdm

    def log(line: str) -> None:
        if not enabled:
            return
        tqdm.write(line, file=sys.stdout)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "train.log"), "a") as f:
            f.write(line + "\n")

    return log


def build_model(spec: str, tokenizer_spec: str | None, seed: int, aux_coef: float | None, meta: bool = False):
    """(model, tokenizer, tokenizer spec, fill) from a preset name (fresh weights, seeded; the built-in byte
    tokenizer unless one is given) or a checkpoint directory (its weights and tokenizer). With `meta`
    (a run under torchrun) the model is built on the meta device and `fill(model)` gives the parallelized
    model's shards the same weights (`Trainer`'s fill), so no rank holds the whole; else fill is None."""
    from ..checkpoint import load_model
    from ..model import Qwen3NextForCausalLM

    if meta:
        from ..distributed import materialize
    fill = None
    if spec.lower() in PRESETS:
        tokenizer_spec = tokenizer_spec or "byte"
        tokenizer = load_tokenizer(tokenizer_spec)
        config = Qwen3NextConfig.preset(spec)
        if tokenizer.eos_token_id is not None:
            config.eos_token_id = tokenizer.eos_token_id
        if meta:
            fill = functools.partial(materialize.fill_seeded, seed=seed)
        else:
            torch.manual_seed(seed)
            model = Qwen3NextForCausalLM(config)
    elif os.path.isdir(spec):
        tokenizer_spec = tokenizer_spec or spec
        tokenizer = load_tokenizer(tokenizer_spec)
        if meta:
            config = Qwen3NextConfig.from_pretrained(spec)
            fill = functools.partial(materialize.fill_from_checkpoint, path=spec)
        else:
            model = load_model(spec, dtype=torch.float32)
    else:
        raise ConfigError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    if fill is not None:
        with torch.device("meta"):
            model = Qwen3NextForCausalLM(config)
    if aux_coef is not None:
        model.config.router_aux_loss_coef = aux_coef
    return model, tokenizer, tokenizer_spec, fill


def _settings_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainSettings field; defaults None so that a resumed run can tell what was given."""
    g = p.add_argument_group("training settings (defaults in brackets)")
    d = DEFAULTS
    g.add_argument("--steps", type=int, help=f"optimizer steps [{d.steps}]")
    g.add_argument("--seq-len", type=int, help=f"tokens per packed row [{d.seq_len}]")
    g.add_argument("--batch-size", type=int, help=f"rows per forward pass [{d.batch_size}]")
    g.add_argument("--grad-accum", type=int, help=f"forward passes per optimizer step [{d.grad_accum}]")
    g.add_argument("--lr", type=float, help=f"peak learning rate [{d.lr}]")
    g.add_argument("--min-lr-ratio", type=float, help=f"final lr / peak lr of the cosine [{d.min_lr_ratio}]")
    g.add_argument("--warmup", type=int, help=f"linear warm-up steps [{d.warmup}]")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices [{d.weight_decay}]")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off [{d.grad_clip}]")
    g.add_argument("--seed", type=int, help=f"seed of initialisation and data order [{d.seed}]")
    g.add_argument("--eval-every", type=int, help=f"steps between held-out evaluations, 0 = never [{d.eval_every}]")
    g.add_argument("--eval-rows", type=int, help=f"held-out rows per evaluation [{d.eval_rows}]")
    g.add_argument("--eval-fraction", type=float, help=f"share of documents held out [{d.eval_fraction}]")
    g.add_argument("--save-every", type=int, help=f"steps between checkpoints, 0 = only at the end [{d.save_every}]")
    g.add_argument("--keep-checkpoints", type=int, help=f"newest checkpoints kept, 0 = all [{d.keep_checkpoints}]")
    g.add_argument("--log-every", type=int, help=f"steps between log lines and routing counts [{d.log_every}]")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast with fp32 weights on a GPU, fp32 on the CPU [auto]")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute layer activations in the backward pass (less memory)")
    g.add_argument("--max-time", type=float, help="stop (and save) after this many seconds of training")


def _given_settings(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)
            if getattr(args, f.name, None) is not None}


def idle_cores() -> int:
    """CPU cores not busy with other processes (by the 1-minute load average), at least 1. OpenMP threads
    that outnumber the free cores wait on each other and can make every step several times slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return device


def cmd_train(args) -> int:
    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    launched_here = not dist.is_initialized()
    try:
        dims = parallel_dims(args)  # under torchrun: the process group, and this rank's GPU
        device = _device(args.device)
        given = _given_settings(args)
        if args.resume:
            if args.data or args.config or args.tokenizer or args.aux_coef is not None:
                raise ConfigError("--resume continues a saved run with its own data, model and tokenizer: "
                                  "do not pass DATA, --config, --tokenizer or --aux-coef with it")
            checkpoint = find_checkpoint(args.resume)
            out = args.out or run_directory(checkpoint)
            log = _log_to(out, dims.is_rank0)
            trainer = Trainer.resume(checkpoint, device, out_dir=out, overrides=given, log=log, dims=dims)
            log(f"resuming from step {trainer.step} ({checkpoint})")
        else:
            if not args.data:
                raise DataError("give the training text: files or directories (DATA), or --resume a run")
            if not args.out:
                raise ConfigError("give a run directory with --out")
            if os.path.isdir(os.path.join(args.out, "checkpoints")):
                raise ConfigError(f"{args.out} already holds a run: --resume {args.out} to continue it, "
                                  "or choose another --out")
            settings = TrainSettings(**given)
            settings.validate()
            model, tokenizer, tokenizer_spec, fill = build_model(args.config or "tiny", args.tokenizer, settings.seed,
                                                                 args.aux_coef, meta=dims.enabled)
            corpus = Corpus([os.path.abspath(p) for p in args.data], args.include or list(DEFAULT_INCLUDE),
                            args.exclude_dir or [])
            log = _log_to(args.out, dims.is_rank0)
            trainer = Trainer(model, tokenizer, corpus, settings, args.out, device, tokenizer_spec, log=log,
                              dims=dims, fill=fill)
        result = trainer.fit(progress=not args.no_progress)
    except (ConfigError, DataError, CheckpointError, TrainingError, ParallelConfigError) as e:
        rank = f"[rank {dist.get_rank()}] " if dist.is_initialized() else ""
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    finally:
        if launched_here and dist.is_initialized():
            dist.destroy_process_group()
    log(f"checkpoint: {result['checkpoint']}\nloss curve: {result['plot']}")
    return 130 if result["status"] == "interrupted" else 0


# --------------------------------------------------------------------------------------------- demo
DEMO_SETTINGS = dict(steps=200, seq_len=256, batch_size=8, lr=3e-3, warmup=20, min_lr_ratio=0.1, weight_decay=0.1,
                     eval_every=50, eval_rows=32, eval_fraction=0.02, save_every=100, log_every=25, max_time=170.0)
DEMO_PROMPT = "class "


def stdlib_source() -> Corpus:
    """The Python standard library's own .py files (without site-packages): text on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    return Corpus([root], ["*.py"], ["site-packages", "dist-packages"])


def cmd_demo(args) -> int:
    from ..generate import generate

    started = time.perf_counter()
    settings = TrainSettings(**{**DEMO_SETTINGS, **_given_settings(args)})
    try:
        settings.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out
    marker = os.path.join(out, "DEMO")
    if os.path.exists(out):
        if not os.path.isfile(marker):
            print(f"error: {out} exists and is not a demo run directory; pass another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    os.makedirs(out)
    open(marker, "w").close()
    torch.set_num_threads(args.threads or idle_cores())
    log = _log_to(out)
    corpus = stdlib_source()
    log(f"qwen3next demo: training the 'tiny' preset from scratch on this CPU (threads: {torch.get_num_threads()}), "
        f"on the Python standard library's source ({corpus.paths[0]}), with the built-in byte-level tokenizer.")
    model, tokenizer, spec, _ = build_model("tiny", "byte", settings.seed, None)
    trainer = Trainer(model, tokenizer, corpus, settings, out, "cpu", spec, log=log)
    result = trainer.fit(progress=not args.no_progress)

    steps = [r for r in trainer.history if r.get("loss") is not None]
    first = sum(r["loss"] for r in steps[:10]) / len(steps[:10])
    held_out = result["eval_loss"]
    log(f"\nloss of the first {len(steps[:10])} steps: {first:.3f} nats/token; held-out loss after "
        f"{result['step']} steps: {held_out:.3f} (perplexity {math.exp(held_out):.2f}; "
        f"{held_out / math.log(2):.2f} bits per byte)")
    model = trainer.model.eval()
    prompt = torch.tensor([list(tokenizer.encode(DEMO_PROMPT))])
    generator = torch.Generator().manual_seed(0)
    sample = generate(model, prompt, max_new_tokens=160, do_sample=True, temperature=0.8, top_k=40,
                      eos_token_id=tokenizer.eos_token_id, generator=generator)
    text = tokenizer.decode(sample[0].tolist(), skip_special_tokens=True).rstrip()
    log(f"\nsample (temperature 0.8) after the prompt {DEMO_PROMPT!r}:\n{'-' * 60}\n{text}\n{'-' * 60}")
    log(f"checkpoint (Hugging Face layout, resumable): {result['checkpoint']}\n"
        f"loss curve: {result['plot']}\nmetrics: {os.path.join(out, 'metrics.csv')}  log: {os.path.join(out, 'train.log')}\n"
        f"try: qwen3next generate --model {result['checkpoint']} --prompt 'import '\n"
        f"demo finished in {time.perf_counter() - started:.0f} s ({result['status']})")
    return 0


# --------------------------------------------------------------------------------------------- parser
def add_commands(subparsers) -> None:
    """Register `train` and `demo` on the main parser's subparsers."""
    p = subparsers.add_parser("train", help="pre-train or fine-tune on text files; resumable checkpoints",
                              formatter_class=argparse.RawDescriptionHelpFormatter, description=(
                                  "Train on text files or directories (*.jsonl: one {'text': ...} per line)."
                                  "\nexamples:\n  qwen3next train corpus/ --config tiny --out runs/a --steps 2000"
                                  "\n  qwen3next train --resume runs/a"))
    p.add_argument("data", nargs="*", help="text files or directories")
    p.add_argument("--config", help="preset (tiny, 80b-a3b) for fresh weights, or a checkpoint directory to fine-tune [tiny]")
    p.add_argument("--tokenizer", help="'byte' (built-in, default for presets) or a directory with tokenizer.json "
                                       "(default for a checkpoint: its own)")
    p.add_argument("--out", help="run directory (metrics, log, plot, checkpoints)")
    p.add_argument("--resume", metavar="DIR", help="continue a run: its directory or one of its checkpoints")
    p.add_argument("--include", nargs="+", help="file-name globs read from directories [*.txt *.md *.rst *.py *.jsonl]")
    p.add_argument("--exclude-dir", nargs="+", help="directory names to skip")
    p.add_argument("--aux-coef", type=float, help="router_aux_loss_coef (load-balancing loss weight) [the config's]")
    p.add_argument("--device", help="cpu or cuda [cuda when available]")
    p.add_argument("--threads", type=int, help="CPU threads [torch's default]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    _settings_args(p)
    add_training_arguments(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("demo", help="train the tiny preset on the CPU for a few minutes, evaluate, sample")
    p.add_argument("--out", default="qwen3next-demo", help="run directory, replaced if it holds an earlier demo [qwen3next-demo]")
    p.add_argument("--steps", type=int, help=f"optimizer steps [{DEMO_SETTINGS['steps']}]")
    p.add_argument("--max-time", type=float, help=f"seconds of training at most [{DEMO_SETTINGS['max_time']:.0f}]")
    p.add_argument("--threads", type=int, help="CPU threads [the cores that other processes leave idle]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=cmd_demo)
