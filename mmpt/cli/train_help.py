"""`mmpt-train --help`: mmpt's own usage first (what it does, examples, where the configs are), then Hydra's
help page, which mmpt/conf/train.yaml (hydra.help) trims to the config groups: `--cfg job` prints the config."""
from __future__ import annotations

from mmpt.cli.conf_search import CONF_DIR, user_conf_dir

USAGE = """\
mmpt-train: image-text pretraining (CLIP, SigLIP, ALBEF, CoCa, VLMo, BEiT-3) on DeepSpeed, configured by Hydra.
Any launcher: a single process, `torchrun --nproc_per_node N --no-python mmpt-train ...`, deepspeed, srun.

usage: mmpt-train [group=option ...] [key=value ...] [--cfg job [--resolve]] [-m (sweep)]

examples:
  mmpt-train experiment=clip_tiny hydra.run.dir=runs/demo                  # tiny CLIP on the demo shards
  torchrun --nproc_per_node 2 --no-python mmpt-train experiment=albef_tiny trainer.max_steps=300
  mmpt-train model=clip/base data=webdataset 'data.train.urls=/data/cc3m/{00000..00331}.tar' \\
      tokenizer.path=/data/tokenizer.json logger=tensorboard                  # your own shards
  mmpt-train experiment=albef_4m trainer.dry_run=true trainer.expected_world_size=32 trainer.expected_nodes=4
  mmpt-train -m optimizer.lr=1e-4,3e-4 experiment=clip_tiny                # a sweep (one run dir per job)

configs: the groups below live in CONF_DIR_HERE
  see the composed config without training: mmpt-train experiment=clip_tiny --cfg job --resolve
  a run resumes from its own checkpoints when started again with the same hydra.run.dir (trainer.resume=auto)
"""


def usage_text() -> str:
    user = user_conf_dir()
    user_dir = f" and, ahead of them, MMPT_CONF_DIR={user}" if user else " (add your own with MMPT_CONF_DIR=DIR)"
    return USAGE.replace("CONF_DIR_HERE", f"{CONF_DIR}{user_dir}")


def wants_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv

