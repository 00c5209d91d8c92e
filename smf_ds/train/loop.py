"""The training loop: dense parameters through the engine (DeepSpeed), value rows through the
SMF updater after the last micro-batch of each optimizer step; TensorBoard and checkpoints.

Methods: smf (memory injected; `train.scope` says what trains), lora (peft), full.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, InputError, SMFConfig, save_config
from ..files import naming_write_errors
from ..memory.adapter import base_fingerprint, memory_fingerprint
from ..memory.inject import value_tables
from ..parallel.layout import MemoryLayout
from ..parallel.process_group import collective_device, get_rank, get_world_size, is_distributed
from ..sparse.background import BackgroundStats
from ..sparse.optim import schedule_factor
from ..sparse.step import SparseMemoryUpdater
from .batches import GlobalBatchOrder, collate, examples_digest
from .checkpoint import (check_run_identity, complete_tags, latest_tag, load_memory_checkpoint, mark_latest,
                         prune_checkpoints, save_memory_checkpoint, save_run_identity, saved_run, verify_checkpoint,
                         write_checkpoint_manifest)
from .dense_state import load_dense_state, needs_dense_file, save_dense_state
from .ds_config import build_ds_config
from .engine import build_engine, release_engine
from .health import UnhealthyModelError, flags, last_healthy_checkpoint, likely_cause, nonfinite_tensors
from .methods import method_of
from . import stop
from .stop import RunStopped

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0  # non-padding input tokens over all ranks and micro-batches
    health: list[str] = field(default_factory=list)  # why the finished model is not healthy ([] if it is)


def trainable_parameters(model: nn.Module, cfg: SMFConfig) -> tuple[nn.Module, list[nn.Parameter]]:
    """Apply the method: returns the (possibly wrapped) model and its dense trainable params."""
    return method_of(cfg).trainable(model, cfg)


def check_tables_span_ranks(tables, world: int) -> None:
    """With several ranks, every value table must be laid out over all of them (shard_memory):
    an unsharded local table would take only its own rank's reads and gradients, and the ranks'
    copies would drift apart without an error."""
    for layer, table in tables:
        spanned = 1
        for group in (table.row_group, table.col_group, table.replica_group):
            if group is not None:
                spanned *= dist.get_world_size(group)
        if spanned != world:
            raise ConfigError(f"memory layer {layer}: its value table spans {spanned} of the {world} ranks; apply "
                              f"smf_ds.parallel.shard.shard_memory(model, None, cfg.memory.sharding) before "
                              f"Trainer (smf_ds.train.build.load_run_model does)")


class NonFiniteLossError(InputError):
    """Training stopped on a NaN or infinite loss (almost always a setting: said in the message)."""


@dataclass
class StepResult:
    loss: float  # averaged over micro-batches and ranks
    tokens: int  # non-padding input tokens of all ranks
    smf: dict  # the SMF updater's metrics
    grad_norm: float | None  # dense gradients, before clipping; None when not measured
    stop: bool = False  # a rank got a stop signal: every rank stops after this step


def _sum_over_ranks(*values: float) -> list[float]:
    """One all-reduce for the step's few scalars."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def _peak_memory(device: torch.device) -> tuple[str, float]:
    """(TensorBoard tag, GiB): the accelerator's allocation peak, or on CPU the process's peak RSS."""
    if device.type == "cuda":
        return "perf/peak_gpu_allocated_gib", torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return "perf/peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: SMFConfig, model: nn.Module, examples: list[dict], pad_id: int,
                 background: BackgroundStats | None = None, run_dir: str | Path | None = None,
                 examples_field: str = "data.train", derived_keys: tuple[str, ...] = ()) -> None:
        """examples_field: the setting the examples were read from; derived_keys: settings that
        follow from others (a retrofit's train.lr from retrofit.lr): both for resume's messages."""
        self.cfg, self.examples, self.pad_id = cfg, examples, pad_id
        self.examples_field, self.derived_keys = examples_field, derived_keys
        if cfg.train.micro_batch_size > len(examples):  # each micro-batch would hold examples several times
            raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size}: more than the {len(examples)} "
                              f"training examples of {examples_field}; expected at most {len(examples)}")
        self.run_dir = Path(run_dir or cfg.out_dir)
        self.rank, self.world = get_rank(), get_world_size()
        torch.manual_seed(cfg.train.seed)
        # Which memory the run starts from (checked on resume); before ZeRO-3 partitions it.
        self.memory = memory_fingerprint(model) if method_of(cfg).uses_memory else None
        # Which base weights: checked on resume, since checkpoints leave the frozen ones out.
        self.base = model.smf_base_fingerprint = base_fingerprint(model)
        # What it reads, checked on resume by content (the files may have moved, or changed).
        self.inputs = {"examples": {"count": len(examples), "digest": examples_digest(examples)},
                       "background": None if background is None else
                       {"num_batches": background.num_batches, "digest": background.digest()}}
        self.model, params = trainable_parameters(model, cfg)
        self.engine = build_engine(self.model, params, build_ds_config(cfg), cfg.train.grad_accum)
        self.tables = value_tables(self.model) if method_of(cfg).uses_memory else []
        if self.world > 1:
            check_tables_span_ranks(self.tables, self.world)
        self.updater = None
        # Where the tables live (smf_ds.parallel.layout); a model sharded by hand: split over every rank.
        split_over = 1 if cfg.memory.sharding == "replicated" else self.world
        self.layout = getattr(model, "smf_layout", None) or MemoryLayout(cfg.memory.sharding, self.world, split_over)
        self.lr_factor = None
        if cfg.train.lr_schedule != "constant" or cfg.train.warmup_steps:
            t = cfg.train
            if t.warmup_steps >= t.steps:
                log.warning("train.warmup_steps=%d is not below train.steps=%d: the learning rates only rise",
                            t.warmup_steps, t.steps)
            self.lr_factor = functools.partial(schedule_factor, t.lr_schedule, t.warmup_steps, t.steps)
        if self.tables:
            self.updater = SparseMemoryUpdater(self.tables, cfg.sparse, cfg.memory.value_lr, background,
                                               grad_divisor=self.layout.dp_size, lr_factor=self.lr_factor)
            # The paper's code counted padded tokens' reads: the memory layers then get no token mask.
            self.model._smf_count_padding = cfg.sparse.count_padding
        self.order = GlobalBatchOrder(len(examples), cfg.train.micro_batch_size, cfg.train.grad_accum,
                                      self.world, cfg.train.seed)
        self.step = 0
        self.writer = None
        stop.listen(cfg.cluster.stop_signals)
        self.saved_step: int | None = None  # the step of the checkpoint this trainer last wrote or resumed from

    def _open_run_record(self) -> None:
        """Rank 0: config.yaml and the TensorBoard writer, once the run is sure to go on (after a
        resume was accepted). Events already in the run's TensorBoard dir from this step on (a
        resumed run's steps past its checkpoint; a killed run's before any checkpoint) are dropped:
        they are logged again."""
        if self.rank != 0 or self.writer is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _batch(self, step: int, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        """The micro-batch on the model's device, and its non-padding tokens (counted on the host:
        no device sync)."""
        idx = self.order.indices(step, self.rank, micro)
        batch = collate([self.examples[i] for i in idx], self.pad_id)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}, int(batch["attention_mask"].sum())

    def train_step(self, log: bool = False) -> StepResult:
        """One optimizer step. `log`: also measure the dense gradients' norm (before clipping)."""
        self.engine.train()
        # DeepSpeed keeps the norm where its optimizer wrapper computes one (ZeRO 1-3, bf16; the
        # gradients are partitioned there); with a plain torch optimizer (ZeRO-0, fp32) the loop does.
        measure_norm = log and not hasattr(getattr(self.engine, "optimizer", None), "_global_grad_norm")
        losses, tokens, grad_norm = [], 0, None
        if self.lr_factor is not None:
            self._set_dense_lr(self.cfg.train.lr * self.lr_factor(self.step))
        mean = self.cfg.train.accum_reduction == "mean"
        for micro in range(self.cfg.train.grad_accum):
            batch, batch_tokens = self._batch(self.step, micro)
            loss = self.engine(**batch).loss
            self.engine.backward(loss, scale_wrt_gas=mean)
            if self.updater is not None:
                self.updater.after_backward()
            if measure_norm and micro == self.cfg.train.grad_accum - 1:
                grad_norm = self._dense_grad_norm()  # before the step clips and zeroes the gradients
            self.engine.step()
            losses.append(float(loss.detach()))
            tokens += batch_tokens
        if log and not measure_norm:
            grad_norm = self.engine.get_global_grad_norm()
        metrics = self.updater.step() if self.updater is not None else {}
        self.step += 1
        # The stop flag rides on the step's one all-reduce: every rank learns of any rank's signal
        # at the same step boundary.
        loss_sum, tokens, stops = _sum_over_ranks(sum(losses) / len(losses), tokens, float(stop.requested() is not None))
        return StepResult(loss_sum / self.world, int(tokens), metrics,
                          None if grad_norm is None else float(grad_norm), stop=stops > 0)

    def _set_dense_lr(self, lr: float) -> None:
        """The dense optimizer's lr for this step (set from the step count: resume needs no scheduler state)."""
        for group in getattr(getattr(self.engine, "optimizer", None), "param_groups", []):
            group["lr"] = lr

    def _dense_grad_norm(self) -> float | None:
        """The 2-norm of the dense gradients, whole in every parameter after the boundary backward
        has averaged them over ranks; None with no dense parameter (SMF on value rows alone)."""
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _perf_metrics(self, outcome: StepResult, seconds: float) -> dict:
        """Throughput, step time, the dense gradients' norm and peak memory."""
        perf = {"train/tokens": outcome.tokens, "perf/step_seconds": seconds,
                "perf/tokens_per_second": outcome.tokens / seconds}
        if outcome.grad_norm is not None:
            perf["train/grad_norm"] = outcome.grad_norm
        tag, gib = _peak_memory(next(self.model.parameters()).device)
        perf[tag] = gib
        return perf

    def _log(self, loss: float, metrics: dict, perf: dict) -> None:
        if self.writer is None:
            return
        with naming_write_errors("", self.run_dir / "tensorboard", self._intact()):
            self._write_scalars(loss, metrics, perf)

    def _write_scalars(self, loss: float, metrics: dict, perf: dict) -> None:
        self.writer.add_scalar("train/loss", loss, self.step)
        for key, value in metrics.items():
            if not math.isnan(value):
                self.writer.add_scalar(f"smf/{key}", value, self.step)
        for tag, value in perf.items():
            self.writer.add_scalar(tag, value, self.step)

    def _probe_loss(self) -> float:
        """The loss of the last step's first micro-batch under the weights as they are now (no
        gradient; the reads it makes are not counted)."""
        batch, _ = self._batch(self.step - 1, 0)
        self.engine.module.eval()
        with torch.no_grad():
            loss = float(self.engine(**batch).loss)
        self.engine.train()
        for _, table in self.tables:
            table.sink.clear()
        return loss

    def _agreed(self, value):
        """Rank 0's `value`, on every rank: what decides which collectives run must be the same
        everywhere (each rank reading a file itself can see a stale directory listing)."""
        if not is_distributed():
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _healthy_checkpoint(self) -> str:
        """The newest checkpoint whose tensors are all finite (read back), on every rank."""
        found = self._agreed(last_healthy_checkpoint(self.checkpoint_dir, complete_tags) if self.rank == 0 else None)
        return str(found) if found else "none"

    def check_health(self) -> None:
        """Before anything is saved: trained tensors finite, and a finite loss under the new weights."""
        bad = nonfinite_tensors(self.engine.module, self.tables, self.updater)
        probe = self._probe_loss() if self.step > 0 else 0.0
        n_bad, probe_sum = _sum_over_ranks(float(len(bad)), probe)
        if n_bad == 0 and math.isfinite(probe_sum):
            return
        what = (f"non-finite values in {', '.join(bad[:4]) or 'another rank'}" if n_bad else
                f"a forward pass with the new weights gives the loss {probe_sum / self.world}")
        raise UnhealthyModelError(
            f"train: the model is not healthy after step {self.step} ({what}); nothing was saved for it. Likely "
            f"cause: {likely_cause(self.cfg)}. The last healthy checkpoint (every tensor finite, read back): "
            f"{self._healthy_checkpoint()}")

    def health_flags(self, losses: list[float]) -> list[str]:
        """Reasons the finished run is not healthy though finite (the same on every rank)."""
        reasons = flags(losses, getattr(getattr(self.engine.module, "config", None), "vocab_size", None), self.tables)
        if is_distributed():  # a table part on another rank may be the exploded one
            parts = [None] * self.world
            dist.all_gather_object(parts, reasons)
            reasons = list(dict.fromkeys(r for part in parts for r in part))
        return reasons

    def _intact(self) -> str:
        """For a failed write: which checkpoint still holds the run."""
        latest = latest_tag(self.checkpoint_dir)
        return (f"; the latest complete checkpoint, {self.checkpoint_dir / latest if latest else 'none'}, is intact "
                f"(resume from it with --resume auto once the cause is fixed)")

    def save(self) -> None:
        self.check_health()  # an unhealthy model raises here: nothing of it is written or marked latest
        with naming_write_errors("", self.checkpoint_dir / self.tag,
                                 f"; the checkpoint of step {self.step} is incomplete and will not be resumed from"
                                 + self._intact()):
            self._save()

    def _save(self) -> None:
        tag = self.tag
        stale = self.checkpoint_dir / tag  # left by a save cut off earlier: its files must not mix with these
        if self.rank == 0 and stale.exists():
            import shutil

            shutil.rmtree(stale)
        if is_distributed():
            dist.barrier()
        # Without the frozen parameters: resume reloads them from the base model and adapter (the
        # base and memory fingerprints check they are the same), so retrofit, LoRA and
        # memory-scope runs do not write a copy of the backbone at every save.
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag, client_state={"step": self.step},
                                    exclude_frozen_parameters=True)
        save_dense_state(self.engine, self.checkpoint_dir / tag)  # ZeRO 1-3: resumable on another world size
        save_memory_checkpoint(self.checkpoint_dir, tag, self.tables,
                               self.updater.state_dict() if self.updater else None)
        save_run_identity(self.checkpoint_dir, tag, self.cfg, self.memory, self.base, self.inputs, self.step,
                          self.layout.describe())
        write_checkpoint_manifest(self.checkpoint_dir, tag)
        mark_latest(self.checkpoint_dir, tag)
        self.saved_step = self.step
        if self.rank == 0 and self.cfg.train.keep_checkpoints:  # only once the new one is complete
            prune_checkpoints(self.checkpoint_dir, self.cfg.train.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in the run dir; False when there is none."""
        tag = self._agreed(latest_tag(self.checkpoint_dir))  # rank 0's view: a stale listing must not split ranks
        if tag is None:
            log.info("resume: no checkpoint in %s: starting from step 0", self.checkpoint_dir)
            return False
        verify_checkpoint(self.checkpoint_dir, tag)  # its files are what was written, or it is refused by name
        check_run_identity(self.checkpoint_dir, tag, self.cfg, self.memory, self.base, self.inputs,
                           self.examples_field, self.derived_keys)
        saved_world = saved_run(self.checkpoint_dir, tag).get("processes")
        elastic = saved_world not in (None, self.world) and needs_dense_file(self.engine)
        try:
            if elastic:  # DeepSpeed's ZeRO files load only on the world size that wrote them
                load_dense_state(self.engine, self.checkpoint_dir / tag, self.cfg.train.grad_accum)
                step = int(saved_run(self.checkpoint_dir, tag).get("step") or tag[len("step"):])
            else:
                # Non-strict: the frozen parameters are absent by design.
                _, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag, load_module_strict=False)
                if client_state is None:  # DeepSpeed's way of saying it found no files
                    raise FileNotFoundError("the engine's files are missing")
                step = int(client_state["step"])
            state = load_memory_checkpoint(self.checkpoint_dir, tag, self.tables)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised as what the user can do about it
            others = [t for t in complete_tags(self.checkpoint_dir) if t != tag]
            raise ConfigError(f"resume: {self.checkpoint_dir / tag} cannot be read ({type(err).__name__}: {err}); the "
                              f"checkpoint is damaged. To resume from an earlier complete one, write its tag into "
                              f"{self.checkpoint_dir / 'latest_memory'} (complete: {', '.join(others) or 'none'})") from err
        if self.updater is not None:
            self.updater.load_state_dict(state)
        self.step = self.saved_step = step
        if saved_world not in (None, self.world):
            log.info("resumed from %s at step %d on %d processes (written by %d)", tag, self.step, self.world,
                     saved_world)
        else:
            log.info("resumed from %s at step %d", tag, self.step)
        return True

    def _fit_step(self, result: TrainResult, total: int, save_every: int) -> StepResult:
        """One optimizer step of fit: train, check the loss, log, save when due."""
        step_start = time.perf_counter()
        outcome = self.train_step(log=(self.step + 1) % self.cfg.train.log_every == 0)
        loss, metrics = outcome.loss, outcome.smf
        seconds = time.perf_counter() - step_start
        result.tokens += outcome.tokens
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"train: the loss is {loss} at step {self.step}; stopped without saving this step. Common causes: "
                f"no answer token left to learn from (train.max_length={self.cfg.train.max_length} cuts the "
                f"answers off), {likely_cause(self.cfg)}. The last healthy checkpoint (every tensor finite, read "
                f"back): {self._healthy_checkpoint()}")
        if self.updater is not None and self.step % self.cfg.train.log_every == 0:
            metrics.update(self.updater.usage_metrics())
        result.losses.append(loss)
        result.metrics.append(metrics)
        if self.step % self.cfg.train.log_every == 0:
            self._log(loss, metrics, self._perf_metrics(outcome, seconds))
        if save_every and self.step % save_every == 0 and self.step < total:
            self.save()
        return outcome

    def _stop_saved(self) -> None:
        """On an agreed stop: the checkpoint of this step (unless just written), a record in
        TensorBoard, then RunStopped on every rank."""
        if self.saved_step != self.step:
            self.save()
        name = self._agreed_signal()
        if self.writer is not None:
            self.writer.add_scalar("run/stopped_on_signal", 1, self.step)
            self.writer.add_text("run/stopped", f"stopped on {name} at step {self.step}; checkpoint {self.tag}",
                                 self.step)
            self.writer.flush()
        raise RunStopped(self.step, name, str(self.checkpoint_dir / self.tag))

    def _agreed_signal(self) -> str:
        """The signal that stopped the run, the same on every rank (some may have got none)."""
        import signal

        number = signal.Signals[stop.requested()].value if stop.requested() else 0
        if is_distributed():
            t = torch.tensor([number], dtype=torch.int64, device=collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            number = int(t.item())
        return signal.Signals(number).name

    @property
    def tag(self) -> str:
        """The checkpoint tag of the current step."""
        return f"step{self.step:07d}"

    def fit(self, steps: int | None = None, progress: bool = False) -> TrainResult:
        total = steps if steps is not None else self.cfg.train.steps
        first_step = self.step
        self._open_run_record()
        result = TrainResult()
        start = time.time()
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", unit="step")
        save_every = self.cfg.train.save_every
        while self.step < total:
            outcome = self._fit_step(result, total, save_every)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{outcome.loss:.4f}")
            if outcome.stop and self.step < total:
                if bar is not None:
                    bar.close()
                self._stop_saved()
        if bar is not None:
            bar.close()
        # Nothing trained (a resume at or past train.steps): the checkpoint it resumed from is
        # this state; saving it again in place could leave it half-written if killed.
        if self.step > first_step or self.saved_step is None:
            self.save()
        result.health = self.health_flags(result.losses)
        if result.health:
            log.warning("train: the run is not healthy: %s", "; ".join(result.health))
        if self.writer is not None:
            self.writer.add_scalar("health/healthy", float(not result.health), self.step)
            if result.health:
                self.writer.add_text("health/reasons", "; ".join(result.health), self.step)
            self.writer.flush()
        result.steps, result.seconds = self.step, time.time() - start
        return result

    def close(self) -> None:
        """After the run is saved: close its TensorBoard file and let DeepSpeed free the model
        (an experiment trains many runs in one process)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        release_engine(self.engine)
