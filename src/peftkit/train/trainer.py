"""peftkit's training loop: AdamW, warmup + cosine / linear schedule, gradient accumulation,
DDP, evaluation, best-checkpoint tracking, early stopping, exact resume and Ctrl-C checkpoints.

Per optimizer step: the global batch (``batch_size × grad_accum × processes`` examples) is cut
into micro-batches; each micro-batch's ``outputs.loss`` (which already holds the adapters'
regularisers while training) is weighted by its share of the global batch's loss units
(examples, or predicted tokens for language modelling), so accumulation and data parallelism
give the same update as one big batch. After ``optimizer.step()`` the trainer calls
``tuned.update(step)`` (``step``: 0-based index of the step just taken) and then zeroes the
gradients. Dropout randomness is re-seeded from (seed, rank, step) at every step, so a resumed
run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import rebuild
from ..core.attention import dropout_attention
from ..core.dropout import fast_dropout
from ..core.protocol import COPY_SLOT
from ..core.targets import head_names
from ..errors import PeftkitError
from . import checkpoint as ckpt
from . import checkpoint_sharded, fsdp
from .batches import (
    answer_logits_only,
    batch_order,
    collate,
    epoch_batches,
    eval_batches,
    micro_batches,
    pool_batches,
    recorded_pool,
    trims_logits,
)
from .config import TrainConfig
from .data import Encoded, Prepared
from .distributed import Dist, all_sum, barrier, no_sync, wrap
from .log import RunLog
from .metrics import classification_metrics, lm_metrics
from .precision import autocast, grad_scaler
from .vocab_loss import VocabLoss

LOWER_IS_BETTER = {"loss", "perplexity"}


class Interrupted(Exception):
    """Ctrl-C (SIGINT / SIGTERM) during training; a resumable checkpoint has been written."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint written to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


class Diverged(PeftkitError, ArithmeticError):
    """The loss, the gradients or the weights became NaN or infinite at optimizer step `step`
    (1-based). Nothing from that step was saved; the last checkpoint is kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class FitResult:
    steps: int
    train_seconds: float
    metrics: dict[str, float]
    best: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_at: int = 0  # the step this process started from (0 unless it resumed a checkpoint)


def resumed_pool(doc: dict[str, Any], group_by_length: bool) -> int | None:
    """The pool size of the run whose checkpoint state is `doc` (None: random batches, or not recorded). A run
    keeps the pool size it started with, should the default have changed since."""
    return recorded_pool(doc.get("identity", {}).get("batch_order")) if group_by_length else None


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step `step`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


@contextlib.contextmanager
def _stop_signals(flag: list[bool]) -> Iterator[None]:
    """SIGINT / SIGTERM set `flag`; a second SIGINT raises KeyboardInterrupt at once."""
    try:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
    except ImportError:  # pragma: no cover
        pass

    def handler(signum: int, frame: Any) -> None:
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = True
        print("\nstopping: finishing this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def adamw(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with PyTorch's fused kernel where it has one for these parameters (CPU and CUDA floats):
    one pass over all of them instead of several per tensor."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # another device or dtype: the default implementation
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


def vocab_loss_for(model: torch.nn.Module, enc: Encoded, pad_id: int) -> VocabLoss | None:
    """The chunked causal-LM loss for `model` on data `enc` (token-level labels), when the model's own
    logits are its output projection's (checked on a sample); None otherwise."""
    if not enc.per_token or len(enc) == 0:
        return None
    vocab = VocabLoss(model)
    return vocab if vocab.usable and vocab.probe(model, collate(enc, [0], pad_id)) else None


def model_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], vocab: VocabLoss | None, tuned: Any) -> torch.Tensor:
    """The training loss of one batch: the model's own, or the chunked vocabulary loss plus the adapters'
    regularisers (which a TunedModel adds to ``outputs.loss`` itself)."""
    if vocab is None:
        return model(**inputs).loss
    _, loss = vocab.loss(model, inputs)
    extra = tuned.regularization_loss() if tuned.training else None
    return loss if extra is None else loss + extra


def head_parameters(tuned: Any, adapter: str = "default") -> list[nn.Parameter]:
    """The trainable parameters of adapter `adapter`'s copy of the task head (e.g. ``classifier``)."""
    heads = {f"{site}.{COPY_SLOT}" for site in head_names(tuned.model)}
    return [p for prefix, delta in tuned.deltas(adapter) if prefix in heads
            for p in delta.trainable_parameters() if p.requires_grad]


def param_groups(tuned: Any, params: list[nn.Parameter], adapter: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups, each with its peak ``lr``: the task head at ``cfg.head_lr`` when that differs,
    everything else at ``cfg.lr``.

    A fresh head on frozen features can need a higher rate than the adapter under it: methods that
    leave the features almost unchanged at init (prefixes, soft prompts) otherwise wait on the head.
    """
    head_ids = set()
    if cfg.head_lr is not None and cfg.head_lr != cfg.lr:
        head_ids = {id(p) for p in head_parameters(tuned, adapter)}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in head_ids], "lr": cfg.head_lr}]
    return [g for g in groups if g["params"]]


class Trainer:
    """Trains adapter `adapter` of `tuned` on `data` as configured by `cfg` (already resolved)."""

    def __init__(self, tuned: Any, data: Prepared, cfg: TrainConfig, *, out: Path, pad_id: int,
                 dist: Dist | None = None, adapter: str = "default", log: RunLog | None = None,
                 save_best: Callable[[], None] | None = None, sharded: fsdp.Sharded | None = None) -> None:
        self.tuned, self.data, self.cfg, self.out = tuned, data, cfg, out
        self.pad_id, self.adapter = pad_id, adapter
        self.dist = dist or Dist()
        self.log = log or RunLog(None)
        self.save_best = save_best
        self.device = self.dist.device
        if self.dist.sharded and sharded is None:
            sharded = fsdp.shard(tuned, self.dist)  # before the optimizer: sharding replaces the parameters
        self.sharded = sharded
        params = [p for p in tuned.parameters() if p.requires_grad]
        if not params:
            raise PeftkitError("the model has no trainable parameters; attach an adapter first.")
        self.params = params
        groups = param_groups(tuned, params, adapter, cfg)
        self.peak_lrs = [g["lr"] for g in groups]  # from the config, so a resumed run follows its flags
        self.optimizer = adamw(groups, cfg.weight_decay)
        self.model = wrap(tuned, self.dist)
        self.pieces = cfg.grad_accum * self.dist.world
        self.global_batch = cfg.batch_size * self.pieces
        n = len(data.train)
        self.steps_per_epoch = max(1, len(epoch_batches(data.train.lengths, self.global_batch, cfg.seed, 0,
                                                        group_by_length=False, min_size=self.pieces)))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        w = cfg.warmup
        self.warmup_steps = int(w) if w >= 1 else int(round(w * self.total_steps))
        self.metric = cfg.metric or ("accuracy" if data.task == "classification" else "loss")
        self.state: dict[str, Any] = {"step": 0, "best": None, "bad_evals": 0, "history": [], "elapsed": 0.0,
                                      "finished": False, "stopped_early": False}
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.last_checkpoint: tuple[Path, int] | None = None  # (folder, step) last written or resumed from
        self.pool = pool_batches(data.train.per_token)
        self.trim_logits = trims_logits(tuned, data.train)
        self.vocab = vocab_loss_for(tuned, data.train, pad_id) if cfg.chunked_loss else None
        self.scaler = grad_scaler(cfg.precision, self.device)
        if n < self.pieces:
            raise PeftkitError(f"only {n} training examples for {self.pieces} micro-batches per step; "
                                    "lower --batch-size / --grad-accum or add data.")

    # -- checkpoint identity ---------------------------------------------------------------------
    def _identity(self, pool: int | None = None) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "data": c.data, "task": self.data.task, "method": c.method,
                "method_options": c.method_options, "seed": c.seed, "global_batch": self.global_batch,
                "train_examples": len(self.data.train), "quantize": c.quantize,
                "batch_order": batch_order(c.group_by_length, pool or self.pool)}

    def save_checkpoint(self, folder: Path | None = None) -> Path:
        folder = folder or self.out / "checkpoint"
        controllers, state = {}, {}
        if self.dist.main or self.sharded is not None:
            for name, ctl in getattr(self.tuned, "_controllers", {}).items():
                if hasattr(ctl, "state_dict"):
                    controllers[name] = ctl.state_dict()
            state = {**self.state, "identity": self._identity(), "total_steps": self.total_steps,
                     "epoch": self.state["step"] // self.steps_per_epoch,
                     "batch_in_epoch": self.state["step"] % self.steps_per_epoch,
                     "run": {"config": self.cfg.to_dict()}}  # `--resume FOLDER` restores these settings
        if self.sharded is not None:  # every process writes its shards
            checkpoint_sharded.save(folder, self.tuned, self.adapter, self.optimizer, state, controllers, self.dist,
                                    self.sharded)
        elif self.dist.main:
            ckpt.save(folder, self.tuned, self.adapter, self.optimizer, state, controllers)
        self.last_checkpoint = (folder, self.state["step"])
        barrier(self.dist)
        return folder

    def resume(self, folder: Path) -> None:
        doc = ckpt.read(folder)
        theirs_all = doc.get("identity", {})
        pool = resumed_pool(doc, self.cfg.group_by_length) or self.pool
        mine = self._identity(pool)
        diff = [k for k in mine if theirs_all.get(k) != mine[k] and not _same_file(theirs_all.get(k), mine[k])]
        if diff:
            k = diff[0]
            theirs = doc.get("identity", {}).get(k, "not recorded, an older peftkit")
            raise ckpt.CheckpointError(f"checkpoint {folder} was written by a different run ({k}: {theirs!r}, now "
                                       f"{mine[k]!r}); resume with the same settings or start a new run with "
                                       "another --out.")
        if ckpt.is_sharded(doc):
            controllers = checkpoint_sharded.restore(folder, doc, self.tuned, self.optimizer)
        elif self.sharded is not None:
            raise ckpt.CheckpointError(f"checkpoint {folder} holds whole tensors (written by a run without --strategy "
                                       "fsdp); resume it with --strategy ddp, or start a new run with another --out.")
        else:
            controllers = ckpt.restore(folder, doc, self.tuned, self.adapter, self.optimizer)
        for name, state in controllers.items():
            ctl = getattr(self.tuned, "_controllers", {}).get(name)
            if ctl is not None and hasattr(ctl, "load_state_dict"):
                ctl.load_state_dict(state)
        for key in ("step", "best", "bad_evals", "history", "elapsed", "stopped_early"):
            self.state[key] = doc.get(key, self.state[key])
        self.pool, self._epoch_cache = pool, None
        self.last_checkpoint = (folder, self.state["step"])

    # -- batches ----------------------------------------------------------------------------------
    def _batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(self.data.train.lengths, self.global_batch, self.cfg.seed, epoch,
                                    group_by_length=self.cfg.group_by_length, pool=self.pool,
                                    min_size=self.pieces)
            self._epoch_cache = (epoch, batches)
        batches = self._epoch_cache[1]
        return batches[pos % len(batches)]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- one optimizer step -----------------------------------------------------------------------
    def _step(self, step: int) -> tuple[float, int]:
        enc = self.data.train
        batch = self._batch(step)
        parts = micro_batches(batch, self.pieces)
        total_units = max(1, int(enc.units[batch].sum()))
        torch.manual_seed(self.cfg.seed * 1_000_003 + step * 4099 + self.dist.rank)
        loss_sum, tokens = 0.0, 0
        self.model.train()
        for j in range(self.cfg.grad_accum):
            index = parts[j * self.dist.world + self.dist.rank]
            inputs = self._to_device(collate(enc, index, self.pad_id))
            if self.trim_logits:
                inputs = answer_logits_only(inputs)
            sync = j == self.cfg.grad_accum - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else no_sync(self.model, self.dist):
                with autocast(self.cfg.precision, self.device):
                    batch_loss = model_loss(self.model, inputs, self.vocab, self.tuned)
                share = float(enc.units[index].sum()) / total_units
                scaled = batch_loss * (share * self.dist.world)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += float(batch_loss.detach()) * share
            tokens += int(inputs["attention_mask"].sum())
        if self.dist.enabled:  # each process summed its own share of the global batch's loss
            loss_sum = float(all_sum(self.dist, torch.tensor([loss_sum], dtype=torch.float64)))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        if self.cfg.max_grad_norm:
            norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)))
        else:
            norm = float(fsdp.full(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])))
        overflow = self.scaler is not None and math.isfinite(loss_sum) and not math.isfinite(norm)
        if overflow:  # fp16 loss scaling: the scaler skips this step and lowers its scale; not a divergence
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return loss_sum, tokens * self.dist.world
        if self._any_process(not (math.isfinite(loss_sum) and math.isfinite(norm))):  # before the update: weights stay good
            what = f"loss became {loss_sum}" if not math.isfinite(loss_sum) else f"gradient norm became {norm}"
            raise Diverged(self._diverged(step, what), step + 1)
        factor = lr_factor(step, self.total_steps, self.warmup_steps, self.cfg.schedule)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * factor
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        finite = bool(torch.stack([torch.isfinite(fsdp.local(p.detach())).all() for p in self.params]).all())
        if self._any_process(not finite):  # an update too large for the dtype: never saved
            raise Diverged(self._diverged(step, "weights became NaN or infinite after the update"), step + 1)
        self.tuned.update(step)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, tokens * self.dist.world

    def _any_process(self, flag: bool) -> bool:
        """`flag` from every process: true when it is true on any (all stop at the same step)."""
        if not self.dist.enabled:
            return flag
        return bool(all_sum(self.dist, torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def _diverged(self, step: int, what: str) -> str:
        kept = "no checkpoint had been written yet"
        if self.last_checkpoint is not None:
            folder, at = self.last_checkpoint
            kept = f"the last checkpoint ({folder}, step {at}) is kept and --resume continues from it"
        clip = "" if self.cfg.max_grad_norm else ", turn gradient clipping back on (--max-grad-norm 1.0)"
        return (f"training diverged at step {step + 1}: the {what}. Nothing from this step was applied or saved; "
                f"{kept}. Lower --lr (now {self.cfg.lr:g}){clip}, or check the data for broken examples.")

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, enc: Encoded | None = None) -> dict[str, float]:
        """Held-out metrics (see `evaluate`)."""
        enc = enc if enc is not None else self.data.eval
        return evaluate(self.tuned, enc, self.data.task, num_labels=self.data.num_labels, pad_id=self.pad_id,
                        batch_size=self.cfg.eval_batch_size, dist=self.dist,
                        progress=self.cfg.progress and self.dist.main, chunked=self.cfg.chunked_loss,
                        precision=self.cfg.precision)

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.metric in LOWER_IS_BETTER else value > best

    def _after_eval(self, step: int, metrics: dict[str, float]) -> bool:
        """Track the best checkpoint; True when early stopping says stop."""
        self.state["history"].append({"step": step, **metrics})
        self.log.write({"step": step, "eval": metrics})
        value = metrics.get(self.metric)
        if value is None:
            return False
        best = self.state["best"]
        if self._better(value, None if best is None else best["value"]):
            self.state["best"] = {"step": step, "metric": self.metric, "value": value}
            self.state["bad_evals"] = 0
            if self.save_best is not None and (self.dist.main or self.sharded is not None):  # sharded: gathered by all
                self.save_best()
            barrier(self.dist)
            return False
        self.state["bad_evals"] += 1
        patience = self.cfg.early_stopping
        return patience is not None and self.state["bad_evals"] >= patience

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg = self.cfg
        save_every = cfg.save_every or cfg.eval_every or 200
        flag = [False]
        start = self.state["step"]
        elapsed0 = self.state["elapsed"]
        t0 = time.perf_counter()
        bar = self._progress(start)
        stopped_early = self.state["stopped_early"]
        end = start if stopped_early else self.total_steps
        window_tokens, window_t = 0, time.perf_counter()
        with _stop_signals(flag), contextlib.ExitStack() as cheaper:
            if cfg.fast_dropout:  # the model's own dropout layers, and the attention-probability dropout
                cheaper.enter_context(fast_dropout(self.model))
                cheaper.enter_context(dropout_attention(self.model))
            if not cfg.rebuild_inputs:
                cheaper.enter_context(rebuild.disabled())
            for step in range(start, end):
                loss, tokens = self._step(step)  # raises Diverged, saving nothing, on NaN / inf
                self.state["step"] = step + 1
                self.state["elapsed"] = elapsed0 + time.perf_counter() - t0
                window_tokens += tokens
                now = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                tps = window_tokens / max(now - window_t, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                if (step + 1) % 10 == 0 or step + 1 == self.total_steps:
                    self.log.write({"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4),
                                    "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1)})
                    window_tokens, window_t = 0, now
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < self.total_steps:
                    stopped_early = self._after_eval(step + 1, self.evaluate())
                stop = self._agree(flag[0])
                if stop or stopped_early or (step + 1) % save_every == 0:
                    self.save_checkpoint()
                if stop:
                    if bar is not None:
                        bar.close()
                    raise Interrupted(step + 1, self.out / "checkpoint")
                if stopped_early:
                    break
            if bar is not None:
                bar.close()
            train_seconds = self.state["elapsed"]
            metrics = self.evaluate()  # a Ctrl-C from here on lets the run finish: little is left
            if metrics:
                self._after_eval(self.state["step"], metrics)
            self.state["finished"], self.state["stopped_early"] = True, stopped_early
            self.save_checkpoint()
        return FitResult(self.state["step"], train_seconds, metrics, self.state["best"], self.state["history"],
                         stopped_early, resumed_at=start)

    def _agree(self, local: bool) -> bool:
        """Every process stops at the same step when any of them was signalled."""
        if not self.dist.enabled:
            return local
        return bool(all_sum(self.dist, torch.tensor([1.0 if local else 0.0])).item() > 0)

    def _progress(self, start: int) -> Any:
        if not (self.cfg.progress and self.dist.main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=start, desc="train", unit="step", file=sys.stderr,
                    dynamic_ncols=True, mininterval=1.0, leave=False)


def _same_file(a: Any, b: Any) -> bool:
    """Two spellings of one local path (older checkpoints recorded them relative)."""
    return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(a).resolve() == Path(b).resolve()


def _eval_bar(batches: list[list[int]], show: bool) -> Any:
    """`batches`, with a progress bar on stderr when `show` (the training bar's style)."""
    if not show:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="eval", unit="batch", file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                leave=False)


def evaluate(model: torch.nn.Module, enc: Encoded | None, task: str, *, num_labels: int | None, pad_id: int,
             batch_size: int = 128, dist: Dist | None = None, progress: bool = False,
             chunked: bool = True, precision: str = "fp32") -> dict[str, float]:
    """Held-out metrics of `model` on `enc`: accuracy, macro-F1 and loss for classification; loss
    and perplexity otherwise (`config.METRICS`). Length-sorted batches; with `dist`, each process
    takes a share and the counts are summed. `progress`: a progress bar on stderr. `chunked`: a causal
    LM's loss in vocabulary chunks (`vocab_loss.py`)."""
    dist = dist or Dist()
    if enc is None or len(enc) == 0:
        return {}
    # FSDP keeps the gathered parameters' storage between forwards: inference tensors there would break training
    with torch.no_grad() if dist.sharded else torch.inference_mode():
        return _evaluate(model, enc, task, num_labels=num_labels, pad_id=pad_id, batch_size=batch_size, dist=dist,
                         progress=progress, chunked=chunked, precision=precision)


def _evaluate(model: torch.nn.Module, enc: Encoded, task: str, *, num_labels: int | None, pad_id: int,
              batch_size: int, dist: Dist, progress: bool, chunked: bool, precision: str) -> dict[str, float]:
    was_training = model.training
    model.eval()
    k = max(num_labels or 1, 1)
    confusion = torch.zeros(k, k, dtype=torch.float64)
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of loss × units, units)
    trim = trims_logits(model, enc)
    vocab = vocab_loss_for(model, enc, pad_id) if chunked else None
    batches = eval_batches(enc, batch_size, dist.rank, dist.world)
    counted = len(batches)
    if dist.sharded:  # each forward all-gathers the blocks: every process runs as many (rank 0's share is the largest)
        batches += [batches[-1] if batches else [0]] * (len(eval_batches(enc, batch_size, 0, dist.world)) - counted)
    for i, index in enumerate(_eval_bar(batches, progress)):
        inputs = {key: v.to(dist.device) for key, v in collate(enc, index, pad_id).items()}
        if trim:
            inputs = answer_logits_only(inputs)
        with autocast(precision, dist.device):
            if vocab is not None:
                out, loss = vocab.loss(model, inputs)
            else:
                out = model(**inputs)
                loss = out.loss
        if i >= counted:  # a repeat that only keeps the processes in step
            continue
        units = float(enc.units[index].sum())
        loss_sum += torch.tensor([float(loss) * units, units], dtype=torch.float64)
        if task == "classification":
            pred = out.logits.argmax(-1).cpu()
            confusion.index_put_((inputs["labels"].cpu(), pred), torch.ones(len(index), dtype=torch.float64),
                                 accumulate=True)
    if dist.sharded:
        fsdp.reshard(model)
    confusion, loss_sum = all_sum(dist, confusion), all_sum(dist, loss_sum)
    model.train(was_training)
    loss = float(loss_sum[0] / max(loss_sum[1], 1))
    if task == "classification":
        return {**classification_metrics(confusion), "loss": loss}
    return lm_metrics(loss)
