"""`trainer.dry_run=true`: what a launch would do, computed on a login node before `sbatch`.

Everything comes from the validated config and the model built on the meta device: no process group, no
GPU, no data read. Memory is the per-rank MODEL-STATE estimate of the ZeRO paper (parameters, gradients,
Adam moments and fp32 master weights, partitioned by the ZeRO stage); activations depend on the batch and
resolution and are not estimated -- a short real run measures them.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mmpt.engine.config import ConfigError, TrainConfig

GIB = 1024**3


@dataclass(frozen=True)
class ModelStateBytes:
    """Per-rank bytes of each model-state part for one (precision, ZeRO stage, world size)."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(trainable: int, frozen: int, precision: str, zero_stage: int, world: int) -> ModelStateBytes:
    """ZeRO paper accounting (Rajbhandari et al. 2020, sec. 3): Adam keeps 2 fp32 moments per trainable
    parameter, plus an fp32 master copy when training in bf16/fp16. Stage 1 partitions the optimizer
    states, stage 2 also the gradients, stage 3 also the parameters (frozen ones included)."""
    width = 4 if precision == "fp32" else 2
    optimizer_per_param = 8 if precision == "fp32" else 12  # m, v (+ fp32 master weights)
    params = float(width * (trainable + frozen))
    grads = float(width * trainable)
    optimizer = float(optimizer_per_param * trainable)
    if zero_stage >= 1:
        optimizer /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        params /= world
    return ModelStateBytes(params, grads, optimizer)


def node_count(environ: Mapping[str, str], world: int) -> int:
    """Nodes of this launch: SLURM's count, else torchrun's number of node groups, else 1 (never above world)."""
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "GROUP_WORLD_SIZE"):
        if environ.get(key, "").isdigit():
            return max(1, min(int(environ[key]), world))
    return 1


def dry_run_report(cfg: TrainConfig, world: int, trainable: int, frozen: int, environ: Mapping[str, str],
                   teacher: int = 0) -> dict[str, Any]:
    """The resolved world, batch arithmetic, parameter counts and per-rank model-state memory.

    teacher: the part of `frozen` held by momentum teachers (EMA copies: frozen, yet updated every step)."""
    t, d = cfg.trainer, cfg.data
    nodes = t.expected_nodes or node_count(environ, world)
    if nodes < 1 or world % nodes:
        raise ConfigError(f"trainer.expected_nodes={nodes} does not divide the world of {world} ranks "
                          "(trainer.expected_world_size); set it to a divisor, e.g. nodes x GPUs per node = world")
    stage = int(dict(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0))
    memory = model_state_bytes(trainable, frozen, t.precision, stage, world)
    global_batch = d.batch_size * t.grad_accum * t.contrastive_accum_steps * world
    return {
        "model": cfg.model.arch,
        "nodes": nodes,
        "ranks": world,
        "ranks_per_node": math.ceil(world / nodes),
        "micro_batch_per_rank": d.batch_size,
        "grad_accum": t.grad_accum,
        "contrastive_accum_steps": t.contrastive_accum_steps,
        "global_batch": global_batch,
        "max_steps": t.max_steps,
        "samples": global_batch * t.max_steps,
        "precision": t.precision,
        "zero_stage": stage,
        "params_trainable": trainable,
        "params_frozen": frozen,
        "params_momentum_teacher": teacher,
        "model_state_gib_per_rank": {k: round(v / GIB, 3) for k, v in asdict(memory).items()} | {
            "total": round(memory.total / GIB, 3)},
    }


def format_report(report: dict[str, Any]) -> str:
    """Human lines for the terminal, then one `dry_run: {json}` line for scripts."""
    mem = report["model_state_gib_per_rank"]
    n = report["contrastive_accum_steps"]
    cached = f"{n} contrastive (GradCache) x " if n > 1 else ""
    t = report["params_momentum_teacher"]
    teacher = f" (of which {t:,} momentum teacher: EMA copies, updated each step, never by the optimizer)" if t else ""
    lines = [
        f"dry run: {report['model']} -- nothing is trained",
        f"  world        {report['nodes']} node(s) x {report['ranks_per_node']} rank(s) = {report['ranks']} ranks",
        f"  batch        {report['micro_batch_per_rank']} per rank x {cached}{report['grad_accum']} accumulation x "
        f"{report['ranks']} ranks = {report['global_batch']} per step",
        f"  steps        {report['max_steps']} ({report['samples']:,} samples)",
        f"  parameters   {report['params_trainable']:,} trainable, {report['params_frozen']:,} frozen{teacher}",
        f"  memory/rank  {mem['total']:.3f} GiB model states ({report['precision']}, ZeRO-{report['zero_stage']}: params "
        f"{mem['params']:.3f} + grads {mem['grads']:.3f} + optimizer {mem['optimizer']:.3f}); activations not included",
        "dry_run: " + json.dumps(report),
    ]
    return "\n".join(lines)
