"""The one local training loop. Centralized runs, each local-only site and each
federated client call `train()`; it reads top to bottom:

    encode every example once -> per epoch, length-bucketed batches (dynamic
    padding) -> forward/backward, gradient accumulation, clipping, AdamW step,
    warmup + decay -> every `eval_every` steps: validation metrics, early stopping
    on validation loss -> restore the best trainable state.

Seeded and deterministic: the same seed gives the same batches, dropout masks
and final weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler

from fedtune.adapted import AdaptedModel
from fedtune.classify import Feature, to_device
from fedtune.config import TrainConfig
from fedtune.errors import ConfigError
from fedtune.evaluate import Metrics, check_select_by, evaluate_features, selection_key
from fedtune.progress import bars_visible

log = logging.getLogger(__name__)

EvalCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    steps: int
    epochs: float
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per evaluation: step, epoch, train_loss, val_* metrics, lr, seconds."""
    best_step: int = 0
    best_val_loss: float = float("nan")
    """The validation loss of the model kept (the lowest unless `train.select_by` names
    a metric)."""
    best_val_score: float = float("nan")
    """The `train.select_by` value of the model kept."""
    stopped_early: bool = False
    train_seconds: float = 0.0
    """Time spent in forward/backward/optimizer steps (evaluation excluded)."""
    samples_seen: int = 0
    lr_sum: float = 0.0
    """The sum of the learning rates of this call's optimizer steps (SCAFFOLD's K * lr
    when the schedule varies within a round)."""

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds else 0.0


def length_bucketed_batches(
    lengths: list[int], batch_size: int, bucket_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle, sort each chunk of `bucket_size` batches by length, cut into
    batches, shuffle the batches. Batches then hold similar lengths (little
    padding) while their order stays random. Written here because transformers
    keeps its LengthGroupedSampler inside the Trainer internals."""
    order = rng.permutation(len(lengths))
    if bucket_size <= 1:  # plain random batches
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * bucket_size
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort([lengths[i] for i in part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled or not bars_visible(),
        transient=True,
    )


@dataclass
class TrainSession:
    """The loop's state between `train()` calls: optimizer and schedule, the batch
    order (the rest of the current epoch and the shuffling generator), the dropout
    generator and the step counters. A federated site keeps one across rounds, so
    that one site training one epoch per round takes exactly the steps centralized
    training takes; `to_state`/`from_state` turn it into tensors + JSON for a
    Flower `RecordDict` or a checkpoint."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    rng: np.random.Generator
    total_steps: int
    batches_per_epoch: int
    steps: int = 0
    micro_seen: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    torch_rng: torch.Tensor | None = None

    @classmethod
    def new(
        cls, model: AdaptedModel, n_train: int, cfg: TrainConfig, lr: float, seed: int | None,
        total_steps: int | None = None,
    ) -> TrainSession:  # fmt: skip
        """A fresh session; `total_steps` (default: the budget of `cfg`) sets the
        length of the warmup + decay schedule."""
        params = [p for p in model.module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"method {model.method.name!r} left no trainable parameters")
        batches_per_epoch = math.ceil(n_train / cfg.batch_size)
        # The budget counts micro-batches, so `epochs` means passes over the data even
        # when grad_accum does not divide an epoch's batches.
        total = (
            total_steps
            or cfg.max_steps
            or max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))
        )
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(
            cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * total),
            num_training_steps=total,
        )
        if seed is not None:  # None: the caller restores the generators
            torch.manual_seed(seed)  # dropout masks
        return cls(
            optimizer, scheduler, np.random.default_rng(seed or 0), total, batches_per_epoch,
            torch_rng=torch.get_rng_state(),
        )  # fmt: skip

    def next_micro_batch(self, lengths: list[int], cfg: TrainConfig) -> np.ndarray:
        if not self.pending:  # a new epoch: reshuffle
            self.pending = length_bucketed_batches(
                lengths, cfg.batch_size, cfg.bucket_size, self.rng
            )
        return self.pending.pop(0)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) holding everything needed to continue."""
        opt = self.optimizer.state_dict()
        tensors = {
            f"opt/{i}/{k}": v.detach().cpu()
            for i, st in opt["state"].items()
            for k, v in st.items()
            if isinstance(v, torch.Tensor)
        }
        if self.torch_rng is not None:
            tensors["torch_rng"] = self.torch_rng
        meta = {
            "param_groups": opt["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.bit_generator.state,
            "total_steps": self.total_steps,
            "batches_per_epoch": self.batches_per_epoch,
            "steps": self.steps,
            "micro_seen": self.micro_seen,
            "pending": [b.tolist() for b in self.pending],
        }
        return tensors, meta

    @classmethod
    def from_state(
        cls, model: AdaptedModel, cfg: TrainConfig, lr: float,
        tensors: dict[str, torch.Tensor], meta: dict[str, Any],
    ) -> TrainSession:  # fmt: skip
        session = cls.new(model, meta["batches_per_epoch"] * cfg.batch_size, cfg, lr, None,
                          total_steps=meta["total_steps"])  # fmt: skip
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt/"):
                _, i, name = key.split("/", 2)
                state.setdefault(int(i), {})[name] = v
        session.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        session.scheduler.load_state_dict(meta["scheduler"])
        session.rng.bit_generator.state = meta["rng"]
        session.batches_per_epoch = meta["batches_per_epoch"]
        session.steps, session.micro_seen = meta["steps"], meta["micro_seen"]
        session.pending = [np.asarray(b, dtype=np.int64) for b in meta["pending"]]
        session.torch_rng = tensors.get("torch_rng")
        return session


Proximal = tuple[float, dict[str, torch.Tensor]]
"""FedProx: (mu, the global trainable state the round started from)."""


def proximal_term(
    params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 over the trainable tensors."""
    total = params[0].new_zeros(())
    for p, a in zip(params, anchor, strict=True):
        total = total + (p - a).pow(2).sum()
    return mu / 2 * total


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is faster there, far slower elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_warned_bf16 = False


def warn_slow_bf16(bf16: bool, device: torch.device) -> None:
    """bf16 autocast on a CPU without native bf16 is emulated: say so, once (training
    and evaluation-only processes, e.g. a federation's server, alike)."""
    global _warned_bf16
    if bf16 and device.type == "cpu" and not _warned_bf16 and not cpu_has_bf16():
        _warned_bf16 = True
        log.warning(
            "train.bf16 = true, but this CPU has no AVX512-BF16 or AMX: bf16 autocast is "
            "emulated here and trains many times slower than fp32 (a SmolLM2 step 15x, "
            "docs/benchmarks.md); set train.bf16 = false (--no-bf16) on this machine"
        )


def train(
    model: AdaptedModel,
    train_feats: list[Feature],
    val_feats: list[Feature] | None,
    cfg: TrainConfig,
    lr: float,
    seed: int = 0,
    on_eval: EvalCallback | None = None,
    description: str = "train",
    session: TrainSession | None = None,
    steps: int | None = None,
    proximal: Proximal | None = None,
    correction: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters on encoded features (see
    `Formulation.encode`). With `val_feats`, evaluates every `eval_every` steps
    (or each epoch), stops early after `patience` evaluations without a lower
    validation loss and restores the best trainable state.

    Federated sites pass their `session` (continued in place) and the number of
    optimizer `steps` this round; `proximal` adds FedProx's (mu/2)·||w - w_global||²;
    `correction` (SCAFFOLD's c - c_i, by parameter name) moves every trainable tensor
    by -lr · correction after each optimizer step."""
    if not train_feats:
        raise ConfigError("no training examples: check data.limit and the split sizes")
    _check(cfg, has_validation=bool(val_feats))
    check_select_by(cfg.select_by, model.formulation.task, has_validation=bool(val_feats))
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        model.to(cfg.device)
        warn_slow_bf16(cfg.bf16, model.device)
        if cfg.gradient_checkpointing:
            _checkpoint_layers(model)
        if session is None:
            session = TrainSession.new(model, len(train_feats), cfg, lr, seed)
        return _train(model, train_feats, val_feats, cfg, session, steps, proximal, correction,
                      on_eval, description)  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)


def _checkpoint_layers(model: AdaptedModel) -> None:
    """transformers' gradient checkpointing on the base model (through a PEFT wrapper).
    Non-reentrant: it needs no input that requires grad, so frozen embeddings under
    LoRA or prompt learning still train."""
    enable = getattr(model.module, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(
            f"train.gradient_checkpointing: the {model.method.name} model has no gradient "
            "checkpointing; set train.gradient_checkpointing = false"
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check(cfg: TrainConfig, has_validation: bool) -> None:
    """Settings that would silently do something else than asked."""
    problems = []
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        problems.append("train.batch_size and train.grad_accum must be >= 1")
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0):
        problems.append("train.epochs must be > 0 (or train.max_steps > 0)")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio = {cfg.warmup_ratio} must be in [0, 1)")
    if cfg.eval_every < 0:
        problems.append("train.eval_every must be >= 0 (0 = once per epoch)")
    if cfg.patience and not has_validation:
        problems.append("train.patience needs a validation set (data.val_size > 0)")
    if problems:
        raise ConfigError("; ".join(problems))


def _train(
    model: AdaptedModel,
    train_feats: list[Feature],
    val_feats: list[Feature] | None,
    cfg: TrainConfig,
    session: TrainSession,
    steps: int | None,
    proximal: Proximal | None,
    correction: dict[str, torch.Tensor] | None,
    on_eval: EvalCallback | None,
    description: str,
) -> TrainResult:
    device = model.device
    if session.torch_rng is not None:
        torch.set_rng_state(session.torch_rng)
    module = model.module
    params = [p for p in module.parameters() if p.requires_grad]
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    lengths = [f["length"] for f in train_feats]
    batches_per_epoch = session.batches_per_epoch
    end_step = min(session.total_steps, session.steps + steps) if steps else session.total_steps
    this_call = end_step - session.steps
    optimizer, scheduler = session.optimizer, session.scheduler
    collate = model.formulation.collate
    loss_fn = model.formulation.loss
    anchor = None
    if proximal and proximal[0] > 0:
        anchor = [proximal[1][n].to(device) for n, _ in named]
    drift = None
    if correction is not None:
        drift = [correction[n].to(device=device, dtype=p.dtype) for n, p in named]

    result = TrainResult(steps=0, epochs=0.0)
    best_state: dict[str, torch.Tensor] | None = None
    best_key = float("inf")  # selection_key of the model kept: lower is better
    bad_evals = 0
    running, running_n = 0.0, 0  # example-weighted train loss since the last evaluation
    start_step = session.steps
    result.epochs = session.micro_seen / batches_per_epoch
    module.train()
    with _progress(cfg.progress) as bar:
        task = bar.add_task(description, total=this_call, info="")
        while session.steps < end_step:
            t0 = time.perf_counter()
            step_batches = [
                [train_feats[i] for i in session.next_micro_batch(lengths, cfg)]
                for _ in range(cfg.grad_accum)
            ]
            n_step = sum(len(mb) for mb in step_batches)
            for mb in step_batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = loss_fn(module, to_device(collate(mb), device))
                # Weighted by examples: a short last batch counts for what it holds.
                running += loss.item() * len(mb)
                running_n += len(mb)
                if anchor is not None:
                    loss = loss + proximal_term([p for _, p in named], anchor, proximal[0])  # type: ignore[index]
                (loss * (len(mb) / n_step)).backward()
            result.samples_seen += n_step
            session.micro_seen += len(step_batches)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr_used = scheduler.get_last_lr()[0]
            optimizer.step()
            if drift is not None:  # SCAFFOLD: decoupled from the optimizer, like AdamW's decay
                with torch.no_grad():
                    for (_, p), d in zip(named, drift, strict=True):
                        p.sub_(d, alpha=lr_used)
            result.lr_sum += lr_used
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            session.steps += 1
            result.steps = session.steps - start_step
            result.train_seconds += time.perf_counter() - t0
            epochs_before, result.epochs = result.epochs, session.micro_seen / batches_per_epoch
            bar.update(task, advance=1, info=f"loss {running / max(running_n, 1):.4f}")

            if cfg.eval_every:
                due = session.steps % cfg.eval_every == 0
            else:  # once per pass over the data
                due = math.floor(result.epochs) > math.floor(epochs_before)
            if not due and session.steps != end_step:
                continue
            record: dict[str, Any] = {
                "step": session.steps,
                "epoch": round(result.epochs, 4),
                "train_loss": running / max(running_n, 1),
                "lr": lr_used,
                "train_seconds": round(result.train_seconds, 3),
            }
            running, running_n = 0.0, 0
            if val_feats:
                m: Metrics = evaluate_features(model, val_feats, cfg.eval_batch_size,
                                               generate=cfg.select_by != "loss", bf16=cfg.bf16)
                record.update({f"val_{k}": v for k, v in m.summary().items()})
                key = selection_key(m, cfg.select_by)
                if result.best_step == 0 or key < best_key:
                    best_key, result.best_step = key, session.steps
                    result.best_val_loss = m.loss
                    result.best_val_score = m.summary().get(cfg.select_by, float("nan"))
                    best_state = model.trainable_state()
                    bad_evals = 0
                else:
                    bad_evals += 1
            result.history.append(record)
            if on_eval:
                on_eval(record)
            if cfg.patience and bad_evals >= cfg.patience:
                result.stopped_early = True
                break
    if best_state is not None and result.best_step != session.steps:
        model.load_trainable_state(best_state)
    session.torch_rng = torch.get_rng_state()
    module.eval()
    return result
