"""Where training records go: the console, <run dir>/metrics.jsonl, W&B and TensorBoard. Rank 0 only."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmpt.engine.config import ConfigError, LoggerConfig
from mmpt.engine.progress import ProgressClock, format_progress

log = logging.getLogger("mmpt")


class JsonlLog:
    """Append-only `metrics.jsonl`: one JSON object per record, each with a `step` field."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class WandbLog:
    """A W&B run whose config is the resolved Hydra config plus the job's `overrides`; resumes the same id
    after a restart. In a sweep (Hydra multirun, W&B agent) its runs share a group (mmpt.engine.sweep_info)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_id: str, config: dict[str, Any]):
        import wandb

        from mmpt.engine.sweep_info import current_sweep_info, wandb_identity

        os.environ.setdefault("WANDB_SILENT", "true")
        ident = wandb_identity(cfg, current_sweep_info())
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=ident.group, name=ident.name, tags=ident.tags,
            mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow", config={**config, **ident.config},
        )

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def write_caption_samples(self, step: int, samples: list) -> None:
        import wandb

        table = wandb.Table(columns=["image", "generated", "reference"])
        for sample in samples:
            table.add_data(wandb.Image(sample.image), sample.generated, sample.reference)
        self.run.log({"eval/caption_samples": table}, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits for the W&B service to flush the run file (finish alone can return earlier)

    @property
    def location(self) -> str:
        return str(Path(self.run.dir).parent)


class TensorBoardLog:
    """Event files in <run dir>/tensorboard/ (`tensorboard --logdir runs/`): every numeric key of a record as a
    scalar at its step, so the curves match metrics.jsonl; caption samples as text.

    The writer opens at the first record with `purge_step` = its step: after a resume from a checkpoint, the
    steps the previous attempt logged past that checkpoint are dropped from the view instead of doubling back."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's message says only "requires TensorBoard"
            raise ConfigError("logger.tensorboard=true needs the tensorboard package: "
                              "`pip install 'mmpt[tensorboard]'`") from exc
        self._open = lambda step: SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step)
        self.writer: Any = None

    def _writer(self, step: int) -> Any:
        if self.writer is None:
            self.writer = self._open(step)
        return self.writer

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        writer = self._writer(step)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, global_step=step)
        writer.flush()  # a record per log interval: cheap, and `tensorboard` shows the run while it trains

    def write_caption_samples(self, step: int, samples: list) -> None:
        rows = [f"{i}. generated: {s.generated}  \n   reference: {s.reference}" for i, s in enumerate(samples, 1)]
        self._writer(step).add_text("eval/caption_samples", "\n\n".join(rows), global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLogger:
    """Fans records out to the console, metrics.jsonl and (optionally) W&B and TensorBoard. A no-op on ranks > 0."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_id: str, config: dict[str, Any],
                 is_main: bool, max_steps: int, console_keys: Sequence[str] = ("loss",), start_step: int = 0):
        self.is_main, self.max_steps, self.console_keys = is_main, max_steps, tuple(console_keys)
        self.clock = ProgressClock(start_step)
        self.jsonl = JsonlLog(run_dir / "metrics.jsonl") if is_main else None
        use_wandb = is_main and cfg.backend == "wandb" and cfg.mode != "disabled"
        self.wandb = WandbLog(cfg, run_dir, run_id, config) if use_wandb else None
        self.tensorboard = TensorBoardLog(run_dir) if is_main and cfg.tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        elapsed = eta = None
        if "train/loss" in record:  # eval records do not move the clock
            elapsed, _ = self.clock.update(record["step"])
            eta = self.clock.eta(record["step"], self.max_steps)
        log.info(format_progress(record, self.max_steps, self.console_keys, elapsed, eta))
        assert self.jsonl is not None
        self.jsonl.write(record)
        if self.wandb is not None:
            self.wandb.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def log_caption_samples(self, step: int, samples: list) -> None:
        """Generated vs. reference captions: a W&B table with the images, and the text in the console."""
        if not self.is_main:
            return
        for sample in samples[:3]:
            log.info("caption | generated: %s | reference: %s", sample.generated, sample.reference)
        if self.wandb is not None:
            self.wandb.write_caption_samples(step, samples)
        if self.tensorboard is not None:
            self.tensorboard.write_caption_samples(step, samples)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    @property
    def wandb_location(self) -> str | None:
        return self.wandb.location if self.wandb is not None else None
