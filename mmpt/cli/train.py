"""`mmpt-train`: Hydra-composed pretraining on DeepSpeed. Any launcher: single process, torchrun, deepspeed."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mmpt.cli.common import CONF_DIR, strip_launcher_args, user_errors_exit
from mmpt.engine.run_setup import configure_logging, current_env, start_distributed, validate

log = logging.getLogger("mmpt")


@user_errors_exit
def train(raw: DictConfig) -> None:
    env = current_env()
    configure_logging(env)
    prep = validate(raw, env)  # user errors stop here, before any process group
    from mmpt.engine.trainer import Trainer

    device, run_dir = start_distributed(prep, Path(HydraConfig.get().runtime.output_dir))
    if env.is_main:
        log.info("run dir %s | %d ranks (%s) on %s", run_dir, env.world_size, env.launcher, device)
    trainer = Trainer(prep.cfg, prep.resolved, env, device, run_dir, prep.tokenizer)
    result = trainer.fit()
    if env.is_main:
        summary = {"step": result.step, "run_dir": str(result.run_dir),
                   "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                   "wandb_run_id": result.wandb_run_id, "wandb_dir": result.wandb_location,
                   **result.eval_metrics}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps(summary))


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_entry(raw: DictConfig) -> None:
    train(raw)


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    _hydra_entry()


if __name__ == "__main__":
    main()
