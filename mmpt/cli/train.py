"""`mmpt-train`: Hydra-composed pretraining on DeepSpeed. Any launcher: single process, torchrun, deepspeed."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mmpt.cli.common import CONF_DIR, fail, strip_launcher_args, user_errors_exit
from mmpt.cli.conf_search import user_conf_dir
from mmpt.cli.hydra_errors import hydra_errors_exit
from mmpt.cli.train_help import usage_text, wants_help
from mmpt.engine.divergence import DivergenceError
from mmpt.engine.ds_config import global_batch_size
from mmpt.engine.dry_run import dry_run_report, format_report
from mmpt.engine.run_summary import RunFacts, build_summary, format_summary
from mmpt.engine.run_lock import lock_run_dir
from mmpt.engine.run_setup import configure_logging, current_env, start_distributed, validate

log = logging.getLogger("mmpt")


@user_errors_exit
def train(raw: DictConfig) -> None:
    started = time.perf_counter()
    env = current_env()
    configure_logging(env)
    dry_run = bool(OmegaConf.select(raw, "trainer.dry_run", default=False))
    expected = OmegaConf.select(raw, "trainer.expected_world_size", default=None)
    if dry_run and expected:  # a login node checks the config against the job's world, not its own
        env = dataclasses.replace(env, world_size=int(expected))
    prep = validate(raw, env)  # user errors stop here, before any process group
    if env.is_main and prep.cfg.scheduler.warmup_steps >= prep.cfg.trainer.max_steps:
        log.warning("scheduler.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never reaches "
                    "optimizer.lr; lower scheduler.warmup_steps (a few %% of max_steps is usual)",
                    prep.cfg.scheduler.warmup_steps, prep.cfg.trainer.max_steps)
    if dry_run:
        if env.is_main:
            report = dry_run_report(prep.cfg, env.world_size, prep.trainable_params, prep.frozen_params, os.environ,
                                    prep.teacher_params)
            print(format_report(report), flush=True)
        return
    from mmpt.engine.trainer import Trainer

    device, run_dir = start_distributed(prep, Path(HydraConfig.get().runtime.output_dir))
    if env.is_main:
        log.info("run dir %s | %d ranks (%s) on %s", run_dir, env.world_size, env.launcher, device)
    lock = lock_run_dir(run_dir, env.is_main)  # one training per run dir; refused: error line, exit 2
    trainer = Trainer(prep.cfg, prep.resolved, env, device, run_dir, prep.tokenizer)
    try:
        result = trainer.fit()
    except DivergenceError as exc:  # every rank stops at the same step; one line, exit 1
        if env.is_main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if env.is_main:
        c = prep.cfg
        facts = RunFacts(result.step, c.trainer.max_steps, result.start_step, time.perf_counter() - started, result.train_s,
                         global_batch_size(c, env.world_size), result.run_dir, result.last_checkpoint,
                         result.wandb_run_id, result.wandb_location, c.logger.mode == "offline",
                         result.preempted_by, result.eval_metrics, c.data.eval.urls or "")
        summary = build_summary(facts)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("%s", "\n".join(format_summary(summary)))
    if lock is not None:
        lock.release()  # a crashed run leaves its lock file: the next run notes it takes over a stale lock


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_entry(raw: DictConfig) -> None:
    train(raw)


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    if wants_help(sys.argv[1:]):
        print(usage_text(), flush=True)  # then Hydra's page (the config groups)
    try:
        user_conf_dir()  # a set but missing MMPT_CONF_DIR: one line, before Hydra starts
    except FileNotFoundError as exc:
        fail(str(exc))
    with hydra_errors_exit(sys.argv[1:], fail):
        _hydra_entry()


if __name__ == "__main__":
    main()
