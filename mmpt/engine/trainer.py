"""The training loop: DeepSpeed engine, weighted objective sum, logging, checkpoints, periodic eval.

The trainer knows models only through the protocol (forward -> ModelOutput, encode_*), so a new
architecture or objective never edits this file.
"""
from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mmpt import distributed as mdist
from mmpt.data.batch import Batch, MixedBatch
from mmpt.data.pipeline import BatchLoader
from mmpt.data.stream_state import LoaderState, resume_problem
from mmpt.data.tokenizer import TextTokenizer
from mmpt.engine import checkpoint
from mmpt.engine.compile import compile_blocks
from mmpt.engine.config import ConfigError, TrainConfig
from mmpt.engine.divergence import DivergenceGuard
from mmpt.engine.dist_env import DistEnv
from mmpt.engine.ds_config import global_batch_size
from mmpt.engine.engine_init import initialize_engine
from mmpt.engine.engine_step import backward_and_step
from mmpt.engine.grad_cache import GradCacheAccumulator
from mmpt.engine.loggers import RunLogger
from mmpt.engine.mfu import peak_tflops
from mmpt.engine.optim import build_optimizer, build_scheduler
from mmpt.engine.precision_hint import bf16_hint
from mmpt.engine.preemption import PreemptionWatch
from mmpt.engine.progress import default_console_keys
from mmpt.engine.run_setup import build_eval_loader_for, build_train_loader_for
from mmpt.eval.runner import evaluate_model
from mmpt.eval.zeroshot import enabled as zeroshot_enabled
from mmpt.models.freezing import apply_freeze
from mmpt.models.protocol import ModelOutput, PretrainModel, step_flops
from mmpt.models.pretrained import apply_init
from mmpt.models.registry import build_model

log = logging.getLogger("mmpt")

COUNTED = "_counted"  # IntervalStats: how many micro-batches the means are over
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def micro_step(engine: Any, batch: Batch | MixedBatch, weights: dict[str, float], grad_clip: float = 0.0,
               poison: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[ModelOutput, torch.Tensor]:
    """forward -> one weighted sum of the objectives -> ONE backward (ZeRO-2 drops grads of a second) -> step.

    engine.step() is called every micro-batch; DeepSpeed only updates at accumulation boundaries. grad_clip > 0:
    mmpt clips at the boundary (engine_step.backward_and_step, also GradCache's backward). poison: the
    divergence guard's loss check (divergence.DivergenceGuard.poison), applied to the loss backward sees.
    """
    out: ModelOutput = engine(batch)
    total = sum(weights[name] * loss for name, loss in out.losses.items())
    backward_and_step(engine, total if poison is None else poison(total), grad_clip)
    return out, total


@dataclass
class IntervalStats:
    """Sums since the last log line, kept on device so the hot path never syncs with the host."""

    rows: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)  # key set -> summed rows
    micro_steps: int = 0
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    skipped: dict[str, int] = field(default_factory=dict)
    grad_norms: list[float | torch.Tensor] = field(default_factory=list)
    flops: float = 0.0  # this rank's training FLOPs (model.flops_per_sample), for train/tflops and train/mfu

    def add_grad_norm(self, norm: float | torch.Tensor | None) -> None:
        """The engine's pre-clipping global gradient norm of one optimizer step (None when it has none)."""
        if norm is not None:
            self.grad_norms.append(norm.detach().float() if isinstance(norm, torch.Tensor) else float(norm))

    def grad_norm_summary(self) -> dict[str, float]:
        """Mean and max over the interval: a mean above `trainer.grad_clip` means clipping shrinks most steps."""
        if not self.grad_norms:
            return {}
        norms = [float(n) for n in self.grad_norms]
        return {"grad_norm": sum(norms) / len(norms), "grad_norm_max": max(norms)}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """A micro-batch whose loss is non-finite (its step is skipped: divergence.py) adds nothing to the means.
        One stacked row per micro-batch (a handful of ops whatever the number of metrics)."""
        keys = (*values, COUNTED)
        row = torch.stack([v.detach().float() for v in values.values()])
        counted = torch.isfinite(row[keys.index("loss")])
        row = torch.where(counted, torch.cat([row, torch.ones_like(row[:1])]), 0.0)
        self.rows[keys] = self.rows[keys] + row if keys in self.rows else row
        self.micro_steps += 1

    def reduce(self) -> dict[str, float]:
        """Collective: averages over counted micro-steps and ranks, one host sync per log line."""
        sums: dict[str, torch.Tensor] = {}
        for row_keys, row in self.rows.items():
            for key, value in zip(row_keys, row):
                sums[key] = sums[key] + value if key in sums else value
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys])
        if mdist.is_dist():
            torch.distributed.all_reduce(stacked)
        stacked = stacked / stacked[keys.index(COUNTED)]  # nan when every micro-batch of the interval was bad
        return {k: v for k, v in zip(keys, stacked.tolist()) if k != COUNTED}


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    last_checkpoint: Path | None
    eval_metrics: dict[str, float]
    wandb_location: str | None
    wandb_run_id: str
    preempted_by: str | None = None  # the signal's name when the run stopped early to be requeued
    start_step: int = 0  # where this process started (after a resume)
    train_s: float = 0.0  # seconds in this process's training loop


class Trainer:
    def __init__(self, cfg: TrainConfig, resolved: dict[str, Any], env: DistEnv, device: torch.device,
                 run_dir: Path, tokenizer: TextTokenizer):
        self.cfg, self.env, self.device, self.run_dir, self.tokenizer = cfg, env, device, run_dir, tokenizer
        self.ckpt_root = run_dir / "checkpoints"
        torch.manual_seed(cfg.trainer.seed)  # identical init on every rank
        model = self._build_model()
        optimizer = build_optimizer(model, cfg.optimizer)  # from requires_grad parameters only
        scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.trainer.max_steps)
        if env.is_main:  # a killed save's hidden staging/trash dirs (this run is the run dir's only writer)
            checkpoint.remove_stale_saves(self.ckpt_root)
        resume_dir = checkpoint.resume_target(cfg.trainer.resume, self.ckpt_root)
        self._refuse_other_world(resume_dir)
        self.engine, self.grad_clip = initialize_engine(model, optimizer, cfg, env.world_size, scheduler,
                                                        checkpoint.is_legacy_zero(resume_dir))
        self.model: PretrainModel = self.engine.module
        self.guard = DivergenceGuard(self.engine, cfg.trainer.max_bad_steps, cfg.trainer.spike_factor, device,
                                     mmpt_clips=self.grad_clip > 0)
        self.after_step = getattr(self.model, "after_optimizer_step", None)
        self.peak_tflops = peak_tflops(cfg.trainer.peak_tflops, cfg.trainer.precision)
        self._flops_of_shape: dict[tuple[tuple[str, int], ...], float] = {}
        self.input_dtype = PRECISION_DTYPES[cfg.trainer.precision]
        self.weights = dict(cfg.loss.weights)
        n = cfg.trainer.contrastive_accum_steps
        self.grad_cache = GradCacheAccumulator(n) if n > 1 else None  # one contrastive loss over n micro-batches
        self.step = 0
        self.wandb_run_id = ""
        self.resolved = resolved
        self.data_resume: LoaderState | None = None  # where the checkpoint's data streams stand
        self.resumed_rng: dict[str, Any] | None = None  # applied just before the first step (fit)
        self.train_loader: BatchLoader | None = None
        self._resume(resume_dir)
        self.start_step = self.step
        torch.manual_seed(cfg.trainer.seed * 1000 + env.rank)  # per-rank masks/dropout of a fresh run
        wandb_config = {**resolved, "params": asdict(self.param_counts)}  # not in config.yaml: not a config key
        console_keys = cfg.trainer.console_keys or default_console_keys(cfg.model.objectives)
        self.logger = RunLogger(cfg.logger, run_dir, self.wandb_run_id, wandb_config, env.is_main,
                                cfg.trainer.max_steps, console_keys, start_step=self.step)
        self.last_checkpoint: Path | None = None
        self.saved_step = -1
        self.eval_metrics: dict[str, float] = {}
        self.preempted_by = 0
        self.preemption = PreemptionWatch(cfg.trainer.preempt_signals)

    def _build_model(self) -> torch.nn.Module:
        """The model with its starting weights (model.init) and trainable set (model.freeze / model.train),
        before the optimizer and DeepSpeed see it; logs the trainable / frozen counts."""
        mcfg = self.cfg.model
        model = build_model(mcfg)
        init = getattr(mcfg, "init", None)
        if init is not None:
            try:
                apply_init(model, init, checkpoint.read_init_checkpoint)
            except ValueError as exc:  # a shape mismatch or a tower the model lacks: the config's fault
                raise ConfigError(f"model.init: {exc}") from None
        self.param_counts = apply_freeze(model, getattr(mcfg, "train", ()), getattr(mcfg, "freeze", ()))
        if self.cfg.trainer.compile:  # in place, before DeepSpeed: same parameters, same state-dict keys
            compile_blocks(model, self.cfg.trainer.compile_backend)
        if self.env.is_main:
            log.info("%s", self.param_counts.summary())
        return model

    # ---- resume -----------------------------------------------------------------------------------------
    def _resume(self, tag_dir: Path | None) -> None:
        if tag_dir is None:
            self.wandb_run_id = str(mdist.all_gather_objects(uuid.uuid4().hex[:8])[0])  # W&B ids: [a-z0-9]
            return
        state = checkpoint.load(self.engine, tag_dir, self.ckpt_root)  # only its own tags are fully unpickled
        self.resumed_rng = checkpoint.rng_state()  # this rank's, just restored: dropout and masks continue
        self.step = int(state["step"])
        self.wandb_run_id = str(state["wandb_run_id"])
        self.guard.skipped_steps = int(state.get("skipped_steps", 0))  # train/skipped_steps goes on counting
        guards = state.get("guard_ranks")
        if guards and len(guards) == self.env.world_size:  # (another world size is refused below)
            self.guard.load_rank_state(guards[self.env.rank])
        self.data_resume = self._data_resume(state.get("data", {}), tag_dir)
        if self.env.is_main:
            log.info("resumed from %s at step %d (W&B run %s)", tag_dir, self.step, self.wandb_run_id)

    def _refuse_other_world(self, tag_dir: Path | None) -> None:
        """Before DeepSpeed loads anything: a checkpoint of another world size cannot continue its streams."""
        if tag_dir is None:
            return
        try:
            saved = json.loads((tag_dir / checkpoint.COMPLETE_MARKER).read_text()).get("world_size")
        except ValueError:  # an old marker without JSON: the stream state's own check (_data_resume) still runs
            saved = None
        if saved is not None and (problem := resume_problem(saved, None, self.env.world_size, 0, str(tag_dir))):
            raise ConfigError(f"trainer.resume ({tag_dir}): {problem}")

    def _data_resume(self, saved: dict[str, Any], tag_dir: Path) -> LoaderState:
        """This rank's data streams as the checkpoint left them (mmpt.data.stream_state); a checkpoint from
        before exact resume has none: its streams restart re-seeded by the step, as they used to."""
        streams = saved.get("streams")
        if streams is None:
            log.warning("checkpoint %s has no data stream state (written before exact resume): the data streams "
                        "restart, re-seeded by step %d", tag_dir, self.step)
            return LoaderState(self.env.world_size, self.cfg.data.num_workers, reseed=self.step)
        mine = streams[self.env.rank] if len(streams) == self.env.world_size else {"world_size": len(streams)}
        problem = resume_problem(mine["world_size"], mine.get("num_workers"), self.env.world_size,
                                 self.cfg.data.num_workers, str(tag_dir))
        if problem:
            raise ConfigError(f"trainer.resume ({tag_dir}): {problem}")
        return LoaderState.from_dict(mine)

    def client_state(self) -> dict[str, Any]:
        """Collective (gathers every rank's data stream position)."""
        state = self.train_loader.state if self.train_loader is not None else None
        streams = mdist.all_gather_objects(state.to_dict() if state is not None else None)
        return {
            "step": self.step,
            "samples_seen": self.step * global_batch_size(self.cfg, self.env.world_size),
            "data": {"seed": self.cfg.trainer.seed, **({"streams": streams} if state is not None else {})},
            "wandb_run_id": self.wandb_run_id,
            "world_size": self.env.world_size,
            "skipped_steps": self.guard.skipped_steps,
            "guard_ranks": mdist.all_gather_objects(self.guard.rank_state()),  # per-rank spike-guard memory
        }

    def _last_good(self) -> Path | None:
        """The newest checkpoint this run saved, else the newest complete one in the run dir (a resume)."""
        return self.last_checkpoint or checkpoint.latest_checkpoint(self.ckpt_root)

    def save(self) -> None:
        if not self.guard.safe_to_save(self.engine.module, self.step, self._last_good()):
            return
        extra = {"config.yaml": OmegaConf.to_yaml(self.resolved),
                 "tokenizer.json": self.tokenizer.tokenizer.to_str()}
        self.last_checkpoint = checkpoint.save(
            self.engine, self.ckpt_root, self.step, self.client_state(), self.cfg.trainer.keep_last, extra
        )
        self.saved_step = self.step
        if self.env.is_main:
            log.info("saved checkpoint %s", self.last_checkpoint)

    # ---- one optimizer step -------------------------------------------------------------------------------
    def _micro_step(self, batch: Batch | MixedBatch, stats: IntervalStats) -> None:
        stats.flops += self._batch_flops(batch)
        batch = batch.to(self.device, self.input_dtype)
        if self.grad_cache is None:
            out, total = micro_step(self.engine, batch, self.weights, self.grad_clip, self.guard.poison)
        elif (done := self.grad_cache.add(self.engine, batch, self.weights, self.grad_clip)) is not None:
            out, total = done  # the group's one contrastive loss, after its N backward passes
        else:
            return  # stats count groups: _record multiplies by contrastive_accum_steps
        stats.add({"loss": total, **out.losses, **out.metrics})

    def _batch_flops(self, batch: Batch | MixedBatch) -> float:
        """Training FLOPs of a micro-batch, memoised by its kinds and sizes (host arithmetic, no sync)."""
        parts = batch.parts if isinstance(batch, MixedBatch) else {batch.kind: batch}
        shape = tuple(sorted((kind, len(part)) for kind, part in parts.items()))
        if shape not in self._flops_of_shape:
            self._flops_of_shape[shape] = step_flops(self.model, batch)
        return self._flops_of_shape[shape]

    def _record(self, stats: IntervalStats) -> dict[str, Any]:
        values = stats.reduce()
        self.guard.settle_pending()  # this line's skip count is exact (a sync happens here anyway)
        elapsed = time.perf_counter() - stats.started
        per_group = self.cfg.data.batch_size * self.cfg.trainer.contrastive_accum_steps  # GradCache: groups
        samples = stats.micro_steps * per_group * self.env.world_size
        skipped = sum(mdist.all_gather_objects(sum(stats.skipped.values())))  # type: ignore[arg-type]
        record: dict[str, Any] = {"step": self.step}
        record.update({f"train/{k}": v for k, v in values.items()})
        record["train/lr"] = self.engine.get_lr()[0]
        record["train/samples_per_s"] = samples / max(elapsed, 1e-9)
        tflops = stats.flops / max(elapsed, 1e-9) / 1e12  # achieved, this rank
        record["train/tflops"] = tflops
        if self.peak_tflops:
            record["train/mfu"] = tflops / self.peak_tflops
        record["train/data_wait"] = stats.data_wait_s / max(elapsed, 1e-9)
        record["train/skipped"] = skipped
        record["train/skipped_steps"] = self.guard.skipped_steps  # optimizer steps skipped (divergence.py)
        if self.cfg.trainer.spike_factor is not None:
            record["train/spike_skips"] = self.guard.spike_skips
        record.update({f"train/{k}": v for k, v in stats.grad_norm_summary().items()})
        return record

    # ---- evaluation ---------------------------------------------------------------------------------------
    @property
    def has_eval(self) -> bool:
        """Retrieval on data.eval.urls and/or zero-shot classification (eval.zeroshot.root|urls)."""
        return bool(self.cfg.data.eval.urls) or zeroshot_enabled(self.cfg.eval.zeroshot)

    def evaluate(self) -> dict[str, float]:
        """Leaves the RNGs as it found them, so training draws the same dropout and masks with or without it."""
        rng = checkpoint.rng_state()
        try:
            return self._evaluate()
        finally:
            checkpoint.set_rng_state(rng)

    def _evaluate(self) -> dict[str, float]:
        d = self.cfg.data
        loader = build_eval_loader_for(self.cfg, self.tokenizer, self.env) if d.eval.urls else None
        try:
            result = evaluate_model(self.model, loader, self.tokenizer, self.cfg.eval, self.device, self.input_dtype,
                                    d.mean, d.std, image_size=d.image_size, source=f"{self.run_dir}@step{self.step}")
        finally:
            if loader is not None:
                loader.close()  # its workers must not outlive the pass (see fit)
        self.eval_metrics = result.metrics
        self.logger.log({"step": self.step, **{f"eval/{k}": v for k, v in result.metrics.items()}})
        if result.samples:
            self.logger.log_caption_samples(self.step, result.samples)
        return result.metrics

    # ---- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to max_steps (or a preemption); the loader's workers are ended whatever happens, since a
        worker left alive makes the process hang at exit after an error (mmpt.data.worker_lifecycle)."""
        try:
            return self._fit()
        finally:
            if self.train_loader is not None:
                self.train_loader.close()

    def _fit(self) -> TrainResult:
        t = self.cfg.trainer
        started = time.perf_counter()
        try:
            self.train_loader = build_train_loader_for(self.cfg, self.tokenizer, self.env, self.data_resume)
        except ValueError as exc:  # a data stream state that this launch cannot continue
            raise ConfigError(str(exc)) from None
        batches: Iterator[Batch | MixedBatch] = iter(self.train_loader)
        if self.resumed_rng is not None:
            checkpoint.set_rng_state(self.resumed_rng)  # last: nothing since the save may shift dropout / masks
        stats = IntervalStats()
        if self.env.is_main:
            log.info("training from step %d to %d, global batch %d", self.step, t.max_steps,
                     global_batch_size(self.cfg, self.env.world_size))
            hint = bf16_hint(self.device, t.precision)
            if hint:
                log.info("%s", hint)
        while self.step < t.max_steps:
            for _ in range(t.grad_accum * t.contrastive_accum_steps):
                waited = time.perf_counter()
                batch = next(batches)
                stats.data_wait_s += time.perf_counter() - waited
                for reason, count in batch.skipped.items():
                    stats.skipped[reason] = stats.skipped.get(reason, 0) + count
                self._micro_step(batch, stats)
            self.step += 1
            stats.add_grad_norm(self.engine.get_global_grad_norm())
            applied = self.guard.after_step()  # False: skipped (divergence.py); None: known at the next step
            if self.after_step is not None and applied is not False:
                self.after_step(self.step)  # e.g. momentum teacher EMA: after the update, outside forward
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.logger.log(self._record(stats))
                stats = IntervalStats(skipped=stats.skipped)
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                self.save()
            if self.guard.bad_streak >= t.max_bad_steps:  # stop: the last record counts every skipped step
                if stats.micro_steps:
                    self.logger.log(self._record(stats))
                self.logger.close()
                self.guard.stop_if_diverged(self.step, self._last_good)
            # at max_steps the run is complete anyway: finishing beats a requeue that would have nothing to do
            if self.step < t.max_steps and self.step % t.preempt_check_every == 0 and (signum := self.preemption.agreed()):
                self._checkpoint_for_preemption(signum, stats)
                break
            every = self.cfg.eval.every
            if self.has_eval and every and self.step % every == 0 and self.step != t.max_steps:
                self.evaluate()
        else:
            if self.has_eval and self.cfg.eval.at_end:
                self.evaluate()
        preempted = self.preempted_by
        result = TrainResult(self.step, self.run_dir, self._last_good(),
                             self.eval_metrics, self.logger.wandb_location, self.wandb_run_id,
                             signal.Signals(preempted).name if preempted else None, self.start_step,
                             time.perf_counter() - started)
        self.logger.close()
        self.preemption.restore()
        if preempted:
            self.preemption.chain_previous(preempted)  # e.g. submitit: requeue this job, then exit
        return result

    def _checkpoint_for_preemption(self, signum: int, stats: IntervalStats) -> None:
        """All ranks, same step: log the partial interval, checkpoint this step, leave a `preempted.json` marker."""
        self.preempted_by = signum
        if stats.micro_steps:
            self.logger.log(self._record(stats))
        if self.saved_step != self.step:
            self.save()
        if self.env.is_main:
            marker = {"step": self.step, "signal": signal.Signals(signum).name, "checkpoint": str(self.last_checkpoint)}
            (self.run_dir / "preempted.json").write_text(json.dumps(marker, indent=2))
            log.warning("preempted by %s at step %d: checkpoint %s; rerun the same command (same hydra.run.dir) "
                        "to resume", signal.Signals(signum).name, self.step, self.last_checkpoint)
