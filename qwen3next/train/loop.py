"""The training loop: AdamW with warmup + cosine, clipping, accumulation, mixed precision, evaluation,
metrics, routing statistics, checkpoints, exact resume.

Objective per optimizer step, over its `grad_accum` packed batches: the token-weighted mean next-token
cross-entropy of all the step's predicted tokens, plus `router_aux_loss_coef` times the mean of the
batches' load-balancing losses (each over all of its batch's tokens). Weights are fp32 (the master
copy); on a GPU the forward runs under bf16 autocast. On the CPU a run is deterministic: the same seed
gives the same losses, and a run stopped and resumed from a checkpoint gives the same per-step losses
as one that never stopped.

Under a parallel layout (`dims`, launched with torchrun; see `distributed/training.py`) every rank
runs the loop on its share of each global batch, the losses and the gradient norm are those of one
process on the same batches, checkpoints are sharded, and rank 0 alone logs and writes the run files.

Run directory:
    metrics.csv        one row per step: loss, aux_loss, lr, grad_norm, tokens/s, routing balance, eval loss
    train.log          the log: progress lines, evaluations, per-expert routing counts of each MoE layer
    loss.png           the loss curve (written at each evaluation and at the end)
    checkpoints/       see state.py
    tensorboard/       when the tensorboard package is installed
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..distributed import training as parallel
from ..files import atomic_open, atomic_write
from ..model import causal_lm_loss
from .data import (
    DEFAULT_INCLUDE, Batch, DataError, PackedCorpus, ShuffledRows, TextTokenizer, list_files, load_tokenizer, make_batch,
    tokenizer_vocab_size,
)
from .state import (
    find_checkpoint, is_sharded, load_checkpoint, load_optimizer_tensors, load_sharded_state, restore_rng,
    run_directory, save_checkpoint, save_sharded_checkpoint,
)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, settings that contradict the model)."""


@dataclass
class TrainSettings:
    """Everything that decides what a run computes (saved in every checkpoint, restored on resume)."""

    steps: int = 1000              # optimizer steps
    seq_len: int = 256             # tokens per packed row
    batch_size: int = 8            # rows per forward pass (packed into one row of batch_size * seq_len)
    grad_accum: int = 1            # forward passes per optimizer step
    lr: float = 1e-3               # peak learning rate
    min_lr_ratio: float = 0.1      # the cosine ends at lr * min_lr_ratio
    warmup: int = 100              # steps of linear warm-up (>= steps: the whole run is warm-up, noted in the log)
    weight_decay: float = 0.1      # on matrices only (not on norms, biases, gates' scalars)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0         # max global gradient norm; 0 = no clipping
    seed: int = 0
    eval_every: int = 100          # steps between evaluations (also at step 0 and at the end); 0 = never
    eval_rows: int = 32            # held-out rows per evaluation
    eval_fraction: float = 0.02    # share of documents held out
    shuffle_buffer: int = 1024     # rows the training order is drawn from at random (1 = reading order)
    save_every: int = 500          # steps between checkpoints (and one at the end); 0 = only at the end
    keep_checkpoints: int = 2      # newest checkpoints kept; 0 = all
    log_every: int = 10            # steps between log lines and routing statistics
    precision: str = "auto"        # auto (bf16 autocast on a GPU, fp32 on the CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    max_time: float | None = None  # seconds of training in this invocation; then save and stop

    def validate(self) -> None:
        errors = []
        for name in ("steps", "batch_size", "grad_accum", "eval_rows", "log_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            errors.append(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"need lr > 0 and 0 <= min_lr_ratio <= 1; got {self.lr}, {self.min_lr_ratio}")
        for name in ("weight_decay", "eps", "grad_clip"):
            if not getattr(self, name) >= 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.eval_fraction < 1:
            errors.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_time is not None and not self.max_time > 0:
            errors.append(f"max_time must be > 0 seconds (or None), got {self.max_time}")
        if self.precision not in ("auto", "bf16", "fp32"):
            errors.append(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.eval_every and not self.eval_fraction > 0:
            errors.append("eval_every > 0 needs eval_fraction > 0 (a held-out split); or set eval_every 0")
        if errors:
            raise ConfigError("invalid training settings:\n  - " + "\n  - ".join(errors))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training settings: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class Corpus:
    """Which files a run reads: paths (files or directories), file-name globs, directory names to skip."""

    paths: list[str]
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude_dirs: list[str] = field(default_factory=list)

    def files(self) -> list[str]:
        return list_files(self.paths, self.include, self.exclude_dirs)


def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr` over `warmup` steps,
    then a cosine from `lr` down to `lr * min_lr_ratio` at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(s.steps - s.warmup - 1, 1)
    progress = min((step - s.warmup) / span, 1.0)
    floor = s.lr * s.min_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over two groups: matrices (>= 2-D, weight decay) and the rest (none), each split by the
    device mesh of its parameters in a parallelized model (one fused step takes tensors of one mesh).
    The fused kernel where this torch has it for the device, else the multi-tensor one."""
    split: dict[tuple, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            split.setdefault((p.dim() < 2, getattr(p, "device_mesh", None)), []).append(p)
    groups = [{"params": params, "weight_decay": 0.0 if no_decay else s.weight_decay}
              for (no_decay, _), params in sorted(split.items(), key=lambda item: item[0][0])]
    try:
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, foreach=device.type != "cpu")


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them (less
    memory, about a third more compute). Applied from outside: parameter names do not change. A
    parallelized model's layers are recomputed in the layout state of their own forward call."""
    parallel = getattr(model, "parallel", None)
    options = {} if parallel is None else {"context_fn": parallel.recompute_contexts}
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, **options)


def routing_counts(router_logits, top_k: int) -> torch.Tensor:
    """Top-k assignments per expert of each MoE layer: [layers, E] (what the router chose)."""
    return torch.stack([
        torch.bincount(logits.detach().topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
        for logits in router_logits
    ])


def load_ratio(counts: torch.Tensor) -> float:
    """Mean over layers of max/mean expert load (1.0 = perfectly balanced)."""
    counts = counts.double()
    return float((counts.max(-1).values / counts.mean(-1).clamp(min=1e-12)).mean())


CSV_FIELDS = ["step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "load_max_over_mean",
              "eval_loss", "eval_ppl", "elapsed_s"]


class Trainer:
    """One training run: `Trainer(model, tokenizer, corpus, settings, out_dir).fit()`, or
    `Trainer.resume(checkpoint_or_run_dir).fit()` to continue a saved run exactly. With `dims` (a
    `distributed.ParallelDims`; every rank constructs the same trainer on the same model) the model is
    parallelized and each rank trains on its share of every batch. A model on the meta device (too
    large for one device) is parallelized first and only this rank's shards are made, which
    `fill(model)` fills (see `distributed.materialize`; `train.cli.build_model` gives both)."""

    def __init__(self, model, tokenizer: TextTokenizer, corpus: Corpus, settings: TrainSettings, out_dir: str,
                 device: str | torch.device = "cpu", tokenizer_spec: str = "byte", log=None, dims=None, fill=None):
        settings.validate()
        config = model.config
        if settings.seq_len > config.max_position_embeddings:
            raise ConfigError(f"seq_len {settings.seq_len} exceeds the model's max_position_embeddings "
                              f"({config.max_position_embeddings})")
        vocab = tokenizer_vocab_size(tokenizer)
        if vocab > config.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}")
        self.dims = dims if dims is not None and dims.enabled else None
        self.is_rank0 = self.dims is None or self.dims.is_rank0
        self.device = torch.device(device)
        self.settings, self.corpus, self.out_dir = settings, corpus, out_dir
        self.tokenizer, self.tokenizer_spec = tokenizer, tokenizer_spec
        self.autocast_dtype = self._autocast_dtype()
        if self.dims is not None:
            parallel.check_settings(settings, config, self.dims)
        self.model = parallel.place_model(model, self.device, self.dims, self.autocast_dtype, fill).train()
        if settings.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        files = corpus.files()
        self.corpus_fingerprint = {"files": len(files), "crc32": zlib.crc32("\n".join(files).encode())}
        self.train_data = PackedCorpus(files, tokenizer, settings.seq_len, "train", settings.eval_fraction, settings.seed)
        self.stream = ShuffledRows(self.train_data, settings.shuffle_buffer, settings.seed)
        self.eval_data = (PackedCorpus(files, tokenizer, settings.seq_len, "eval", settings.eval_fraction)
                          if settings.eval_every else None)
        self._eval_batches: list[Batch] | None = None
        self.optimizer = build_optimizer(self.model, settings, self.device)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.history: list[dict] = []  # one dict per step (CSV_FIELDS)
        self._log = log if log is not None and self.is_rank0 else (lambda line: None)
        self._stop_requested = False
        self._fresh = True

    # ----------------------------------------------------------------------------------------- setup
    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.settings.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    @classmethod
    def resume(cls, path: str, device: str | torch.device = "cpu", out_dir: str | None = None,
               overrides: dict | None = None, log=None, dims=None) -> "Trainer":
        """Rebuild a run from a checkpoint directory (or a run directory's latest checkpoint); it goes on
        writing to `out_dir`, by default the run directory the checkpoint is in. The saved settings are
        used; `overrides` may change steps, max_time, eval/save/log intervals. A checkpoint written
        under a parallel layout resumes under any layout `dims`, or in one process."""
        directory = find_checkpoint(path)
        sharded = is_sharded(directory)
        if dims is not None and dims.enabled and not sharded:
            raise CheckpointError(f"{directory} was written by a one-process run: resume it in one process, or "
                                  f"start a run under torchrun from its weights (--config {directory})")
        model, state, tensors = load_checkpoint(directory, device)
        settings = TrainSettings.from_dict(state["settings"])
        allowed = {"steps", "max_time", "eval_every", "save_every", "log_every", "keep_checkpoints"}
        for key, value in (overrides or {}).items():
            if key not in allowed:
                raise ConfigError(f"{key} cannot change when resuming (it would change what the run computes); "
                                  f"these can: {sorted(allowed)}")
            setattr(settings, key, value)
        if state["step"] >= settings.steps:
            raise ConfigError(f"{directory} is at step {state['step']} of a run of {settings.steps} steps: nothing "
                              f"to train; give more steps (--steps N, N > {state['step']}) to go on")
        corpus = Corpus(**state["corpus"])
        trainer = cls(model, load_tokenizer(directory), corpus, settings, out_dir or run_directory(directory), device,
                      tokenizer_spec=state["tokenizer"], log=log, dims=dims)
        if trainer.corpus_fingerprint != state["corpus_fingerprint"]:
            raise DataError(f"the corpus changed since the checkpoint was written ({state['corpus_fingerprint']['files']}"
                            f" files then, {trainer.corpus_fingerprint['files']} now): the data position would not match")
        if sharded:
            load_sharded_state(directory, trainer.model, trainer.optimizer)
        else:
            names = {id(p): n for n, p in trainer.model.named_parameters()}
            load_optimizer_tensors(trainer.optimizer, names, tensors, state["optimizer_groups"])
        restore_rng(tensors)
        trainer.step, trainer.tokens, trainer.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        trainer.stream.restore(state["data"], tensors)
        trainer.history = [row for row in read_metrics(trainer.out_dir) if row["step"] <= trainer.step]
        trainer._fresh = False
        return trainer

    # ----------------------------------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _layout(self, rows) -> Batch:
        """Rows of a batch as this process's forward passes (under a parallel layout: its share)."""
        return make_batch(rows) if self.dims is None else parallel.shard_batch(rows, self.dims)

    def batch_loss(self, batch: Batch):
        """(mean cross-entropy over the batch's predicted tokens, load-balancing loss over all its tokens
        or None, routing counts [MoE layers, E] or None), however many forward passes it takes (see
        `make_batch`)."""
        if self.dims is not None:
            return parallel.batch_loss(self.model, batch, self.device, self._autocast)
        config = self.model.config
        ce, router_logits = None, []
        for part in batch.parts:
            ids = part.input_ids.to(self.device)
            cu = part.cu_seqlens.to(self.device) if part.cu_seqlens is not None else None
            with self._autocast():
                out = self.model(ids, cu_seqlens=cu)
            term = causal_lm_loss(out.logits, ids, cu) * (part.targets / batch.targets)
            ce = term if ce is None else ce + term
            router_logits.append(out.router_logits)
        if not router_logits[0]:
            return ce, None, None
        pooled = [torch.cat(layer) for layer in zip(*router_logits)]  # each MoE layer's logits of every pass
        aux = ops.load_balancing_loss(pooled, config.num_experts_per_tok)
        return ce, aux, routing_counts(pooled, config.num_experts_per_tok)

    def train_step(self, batches: list[Batch]) -> dict:
        """One optimizer step over `batches` (gradient accumulation); returns the step's metrics."""
        s, config = self.settings, self.model.config
        lr = lr_at(self.step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_targets = sum(b.targets for b in batches)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        counts = None
        for batch in batches:
            ce, aux, c = self.batch_loss(batch)
            objective = ce * (batch.targets / total_targets)
            if aux is not None:
                objective = objective + config.router_aux_loss_coef * aux / len(batches)
                aux_sum += aux.detach() / len(batches)
                counts = c if counts is None else counts + c
            objective.backward()
            loss_sum += ce.detach() * (batch.targets / total_targets)
        clip = torch.nn.utils.clip_grad_norm_ if self.dims is None else parallel.clip_grad_norm_
        grad_norm = clip(self.model.parameters(), s.grad_clip or float("inf"))
        loss, aux_loss, grad_norm = torch.stack([loss_sum, aux_sum, grad_norm.float()]).tolist()  # one host sync
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {self.step + 1}; lower --lr or raise --warmup")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += sum(b.tokens for b in batches)
        return {"loss": loss, "aux_loss": aux_loss if counts is not None else None, "lr": lr,
                "grad_norm": grad_norm, "routing": counts}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy over the first `eval_rows` held-out rows (the same every time)."""
        if self._eval_batches is None:
            rows = self.eval_data.rows()
            taken = [row for _, row in zip(range(self.settings.eval_rows), rows)]
            if self.dims is not None:  # every data-parallel rank evaluates as many rows
                taken = taken[: len(taken) - len(taken) % self.dims.dp_shard]
            if not taken:
                raise DataError(f"the held-out split has no complete row of {self.settings.seq_len} tokens"
                                + (f" for each of {self.dims.dp_shard} data-parallel ranks"
                                   if self.dims is not None and self.dims.dp_shard > 1 else "")
                                + ": raise eval_fraction, lower seq_len, or turn evaluation off (eval_every 0)")
            B = self.settings.batch_size
            self._eval_batches = [self._layout(taken[i:i + B]) for i in range(0, len(taken), B)]
        self.model.eval()
        total, count = 0.0, 0
        for batch in self._eval_batches:
            ce, _, _ = self.batch_loss(batch)
            total += float(ce) * batch.targets
            count += batch.targets
        self.model.train()
        return total / count

    # ----------------------------------------------------------------------------------------- saving
    def save(self) -> str:
        data_state, data_tensors = self.stream.state()
        state = {
            "tokens": self.tokens, "elapsed_s": self.elapsed, "data": data_state,
            "settings": dataclasses.asdict(self.settings), "corpus": dataclasses.asdict(self.corpus),
            "corpus_fingerprint": self.corpus_fingerprint, "tokenizer": self.tokenizer_spec,
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        }
        save = save_checkpoint if self.dims is None else save_sharded_checkpoint
        return save(self.out_dir, self.step, self.model, self.optimizer, self.tokenizer, state, data_tensors,
                    keep=self.settings.keep_checkpoints)

    # ----------------------------------------------------------------------------------------- the loop
    def fit(self, callback=None, progress: bool = True) -> dict:
        """Train up to `settings.steps`. `callback(trainer, metrics)` runs after every step. Ctrl-C (the
        first; a second one aborts) or `max_time` end the run early after saving.
        Returns {"status": "done" | "interrupted" | "time limit", "step", "checkpoint", "eval_loss"}."""
        from tqdm.auto import tqdm

        s = self.settings
        if self.is_rank0:
            os.makedirs(self.out_dir, exist_ok=True)
        metrics = MetricsWriter(self.out_dir, self.history) if self.is_rank0 else _NoMetrics()
        if self._fresh:
            torch.manual_seed(s.seed)
        layout = "" if self.dims is None else f" x {self.dims.world_size} ranks ({self.dims})"
        self._log(f"training {self.model.num_parameters() / 1e6:.2f}M parameters on {self.device}{layout}"
                  f" ({'bf16 autocast' if self.autocast_dtype else 'fp32'}, CPU threads: {torch.get_num_threads()})"
                  f"; {self.corpus_fingerprint['files']} files; step {self.step} -> {s.steps};"
                  f" {s.batch_size * s.grad_accum * s.seq_len} tokens per step; run directory {self.out_dir}")
        if s.warmup >= s.steps:
            self._log(f"note: the warm-up ({s.warmup} steps) lasts the whole run ({s.steps} steps): the learning rate "
                      f"rises to {lr_at(s.steps - 1, s):.2e} and never reaches lr {s.lr:.2e}")
        eval_loss = None
        if self._fresh and s.eval_every:
            eval_loss = self.evaluate()
            self._log(f"step {self.step}: held-out loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.1f})")
            metrics.write({"step": 0, "tokens": 0, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss),
                           "elapsed_s": 0.0})
        status, routing, started = "done", None, time.perf_counter()
        self._stop_requested = False
        previous_handler = self._install_sigint()
        previous_determinism = _deterministic(self.device.type == "cpu")
        bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not progress or not self.is_rank0, file=sys.stderr)
        try:
            while self.step < s.steps:
                t0 = time.perf_counter()
                out = self.train_step([self._layout([self.stream.next_row() for _ in range(s.batch_size)])
                                       for _ in range(s.grad_accum)])
                dt = time.perf_counter() - t0
                self.elapsed += dt
                tok_s = s.batch_size * s.grad_accum * s.seq_len / dt
                if out["routing"] is not None:
                    routing = out["routing"] if routing is None else routing + out["routing"]
                row = {"step": self.step, "tokens": self.tokens, "loss": out["loss"], "aux_loss": out["aux_loss"],
                       "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens_per_s": tok_s,
                       "load_max_over_mean": load_ratio(out["routing"]) if out["routing"] is not None else None,
                       "elapsed_s": self.elapsed}
                bar.set_postfix(loss=f"{out['loss']:.3f}", aux=f"{out['aux_loss'] or 0:.3f}", lr=f"{out['lr']:.2e}",
                                gnorm=f"{out['grad_norm']:.2f}", tok_s=f"{tok_s:.0f}", refresh=False)
                bar.update(1)
                timed_out = s.max_time is not None and time.perf_counter() - started >= s.max_time
                stopping = self._agreed(self._stop_requested or timed_out)
                last = self.step == s.steps or stopping
                if self.step % s.log_every == 0 or last:
                    self._log(f"step {self.step}/{s.steps}: loss {out['loss']:.4f}"
                              + (f"  aux {out['aux_loss']:.4f}" if out["aux_loss"] is not None else "")
                              + f"  lr {out['lr']:.2e}  grad norm {out['grad_norm']:.3f}  {tok_s:.0f} tok/s")
                    if routing is not None:
                        self._log_routing(routing)
                        routing = None
                if s.eval_every and (self.step % s.eval_every == 0 or last):
                    eval_loss = self.evaluate()
                    row.update(eval_loss=eval_loss, eval_ppl=math.exp(eval_loss))
                    self._log(f"step {self.step}: held-out loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.1f})")
                metrics.write(row)
                if row.get("eval_loss") is not None:
                    metrics.plot()
                if callback is not None:
                    callback(self, row)
                if stopping or self._agreed(self._stop_requested):
                    status = "interrupted" if self._stop_requested else "time limit"
                    break
                if s.save_every and self.step % s.save_every == 0 and not last:
                    self.save()
        finally:
            bar.close()
            self._restore_sigint(previous_handler)
            _deterministic(*previous_determinism)
        checkpoint_path = self.save()
        metrics.plot()
        metrics.close()
        if status != "done":
            self._log(f"{status} at step {self.step}: saved {checkpoint_path}")
        return {"status": status, "step": self.step, "checkpoint": checkpoint_path, "eval_loss": eval_loss,
                "plot": metrics.plot_path}

    def _agreed(self, flag: bool) -> bool:
        """`flag` on any rank (every rank stops at the same step); in one process, `flag`."""
        return flag if self.dims is None else parallel.any_rank(flag)

    def _log_routing(self, counts: torch.Tensor) -> None:
        moe_layers = [i for i in range(self.model.config.num_hidden_layers) if self.model.config.is_moe_layer(i)]
        for layer, c in zip(moe_layers, counts.tolist()):
            mean = sum(c) / len(c)
            self._log(f"  routing layer {layer}: max/mean {max(c) / mean:.2f}  counts {' '.join(map(str, c))}")

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self._log("Ctrl-C: finishing this step, then saving a checkpoint (press again to abort without saving)")

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _deterministic(enabled: bool, fill_memory: bool = False) -> tuple[bool, bool]:
    """Switch torch's deterministic algorithms (returns the previous setting). On the CPU some
    backward passes (e.g. of `x[index]`) add in a thread-dependent order unless it is on; filling
    fresh memory with NaN, which it also turns on by default, only costs time here."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = fill_memory
    return previous


# --------------------------------------------------------------------------------------------- metrics
class _NoMetrics:
    """What ranks other than 0 write: nothing."""

    plot_path = None

    def write(self, row: dict) -> None:
        pass

    def plot(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(out_dir: str) -> list[dict]:
    """The rows of `out_dir/metrics.csv` (numbers parsed, blanks as None); [] when there is none."""
    path = os.path.join(out_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{k: (None if v == "" else int(v) if k in ("step", "tokens") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


class MetricsWriter:
    """metrics.csv (rewritten from `history` when a run resumes, then appended), TensorBoard scalars
    when tensorboard is installed, and the loss-curve PNG."""

    def __init__(self, out_dir: str, history: list[dict]):
        self.out_dir, self.history = out_dir, history
        self.plot_path = os.path.join(out_dir, "loss.png")
        path = os.path.join(out_dir, "metrics.csv")
        with atomic_open(path, newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        self.file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.file, CSV_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard (or one of its dependencies) is not installed: CSV only
            self.tensorboard = None
        else:  # a resumed run hides what an earlier attempt logged after its checkpoint
            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                             purge_step=history[-1]["step"] + 1 if history else None)

    def write(self, row: dict) -> None:
        row = {k: row.get(k) for k in CSV_FIELDS}
        self.history.append(row)
        self.csv.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "tokens") and value is not None:
                    self.tensorboard.add_scalar(key, value, row["step"])

    def plot(self) -> None:
        """Training loss (and its running mean) and held-out loss against step, as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [(r["step"], r["loss"]) for r in self.history if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in self.history if r.get("eval_loss") is not None]
        fig = Figure(figsize=(7, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
            window = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss (mean of {window})")
        if evals:
            ax.plot(*zip(*evals), "o-", color="tab:red", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, format="png"))

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
