"""Rank/world detection from torchrun/deepspeed, bare srun, or nothing."""
from __future__ import annotations

from mmpt.cli.common import strip_launcher_args
from mmpt.engine.dist_env import detect_env


def test_torchrun_env():
    env = detect_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (3, 1, 4, "n1", 1234)
    assert env.launcher == "torchrun/deepspeed" and not env.is_main


def test_bare_srun_env_maps_slurm_variables():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12345",
                      "SLURM_JOB_NODELIST": "gpu[07-10],cpu1"})
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 12345 % 20000 and env.launcher == "slurm"


def test_single_process_env():
    env = detect_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.is_main


def test_deepspeed_launcher_local_rank_argument_is_stripped():
    argv = ["mmpt-train", "--local_rank=1", "trainer.max_steps=3", "--local_rank", "0", "model=clip/tiny"]
    assert strip_launcher_args(argv) == ["mmpt-train", "trainer.max_steps=3", "model=clip/tiny"]
