"""Everything between a composed config and a running Trainer: validate, tokenizer, process group, run dir.

Order matters: every check that can fail on user input runs before the process group starts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmpt import distributed as mdist
from mmpt.data.limits import SampleLimits
from mmpt.data.pipeline import BatchLoader, build_eval_loader, build_train_loader
from mmpt.data.sources import build_mixed_train_loader
from mmpt.data.stream_state import LoaderState
from mmpt.data.tokenizer import TextTokenizer, load_tokenizer
from mmpt.engine.checkpoint import init_checkpoint_source
from mmpt.engine.config import (ConfigError, TrainConfig, check_combinations, check_data, check_grad_cache,
                                check_model_launch, check_paths, image_masker, resolve, source_specs, typed_config)
from mmpt.engine.dist_env import DistEnv, detect_env, device_for, init_process_group
from mmpt.models.config_parts import fill_tokens
from mmpt.models.freezing import ParamCounts, apply_freeze
from mmpt.models.registry import build_model

log = logging.getLogger("mmpt")


@dataclass
class Prepared:
    cfg: TrainConfig
    resolved: dict[str, Any]
    env: DistEnv
    tokenizer: TextTokenizer
    trainable_params: int
    frozen_params: int
    teacher_params: int = 0  # the part of frozen_params that momentum teachers hold (EMA copies, never trained)


def validate(raw: DictConfig, env: DistEnv, need_train: bool = True) -> Prepared:
    """All user-input checks; raises ConfigError. Builds the model on the meta device (no memory)."""
    raw = resolve(raw.copy())
    cfg = typed_config(raw)
    add_submitit_preempt_signal(cfg)
    check_paths(cfg, need_train=need_train)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer.path, cfg.data.max_text_len)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if tokenizer.vocab_size > cfg.tokenizer.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.tokenizer.path} has {tokenizer.vocab_size} tokens but tokenizer.vocab_size="
            f"{cfg.tokenizer.vocab_size} embedding rows; set tokenizer.vocab_size={tokenizer.vocab_size} or more"
        )
    check_model_launch(cfg, env.world_size, tokenizer, training=need_train)  # token ids must agree with the tokenizer
    fill_tokens(cfg.model.tokens, tokenizer)  # ... and unset ones are the tokenizer's
    with torch.device("meta"):
        probe = build_model(cfg.model)
    check_combinations(cfg, env.world_size, torch.cuda.is_available(), tuple(probe.objectives))
    check_grad_cache(cfg, probe.capabilities)
    check_data(cfg, tuple(probe.data_kinds), need_train)
    preset_weights = {**probe.default_loss_weights, **cfg.model.loss_weights}
    defaults = {k: w for k, w in preset_weights.items() if k in probe.objectives}
    cfg.loss.weights = {**defaults, **cfg.loss.weights}
    missing = sorted(set(probe.objectives) - set(cfg.loss.weights))
    if missing:
        raise ConfigError(f"model.arch={cfg.model.arch} has no default weight for {missing}; set loss.weights.{missing[0]}=...")
    resolved = OmegaConf.to_container(raw, resolve=True)
    assert isinstance(resolved, dict)
    resolved.pop("hydra", None)
    resolved["model"]["tokens"] = dataclasses.asdict(cfg.model.tokens)  # saved runs rebuild with the same ids
    counts = check_model_setup(cfg, probe, need_train)
    return Prepared(cfg, resolved, env, tokenizer, counts.trainable, counts.frozen, counts.teacher)


def add_submitit_preempt_signal(cfg: TrainConfig, environ: dict[str, str] | None = None) -> None:
    """Inside a job of Hydra's submitit launcher (hydra/launcher=slurm|local) submitit requeues on its own
    signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL names another): the trainer must checkpoint on it too, then
    hand it to submitit's handler. Added to trainer.preempt_signals unless that is empty (handling off)."""
    env = os.environ if environ is None else environ
    signals = list(getattr(cfg.trainer, "preempt_signals", None) or [])
    if not env.get("SUBMITIT_EXECUTOR") or not signals:
        return
    name = env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    from mmpt.engine.preemption import signal_number

    try:
        if signal_number(name) in {signal_number(s) for s in signals}:
            return
    except ValueError:
        return  # submitit itself refuses an unknown signal name
    cfg.trainer.preempt_signals = [*signals, name]


def check_model_setup(cfg: TrainConfig, probe: torch.nn.Module, need_train: bool = True) -> ParamCounts:
    """model.freeze / model.train patterns against the (meta) model's real names, and model.init.checkpoint
    (only when training: evaluation reads its weights from the checkpoint it evaluates)."""
    init = getattr(cfg.model, "init", None)
    source = getattr(init, "checkpoint", None)
    if need_train and not source and getattr(init, "checkpoint_required", False):
        raise ConfigError("model.init.checkpoint is required: this stage continues an earlier one; set "
                          "model.init.checkpoint=<the previous stage's run dir>")
    if need_train and source:
        try:
            init_checkpoint_source(source)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    try:
        return apply_freeze(probe, getattr(cfg.model, "train", ()), getattr(cfg.model, "freeze", ()))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at emit time, not the stream of the first call: a later redirect (a
    notebook cell, pytest's capture of another test) must not leave the handler writing to a closed file."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_logging(env: DistEnv) -> None:
    """Rank 0 speaks at INFO; other ranks only warn. Hydra may already have attached handlers.

    DeepSpeed's ZeRO calls `all_gather_into_tensor`, which recent torch (2.13 here) flags as deprecated once
    per process: a line the user can do nothing about, so it is silenced (our own code does not call it)."""
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    quiet_deepspeed_probe(env)
    logger = logging.getLogger("mmpt")
    logger.setLevel(logging.INFO if env.is_main else logging.WARNING)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = CurrentStdoutHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s][mmpt] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def quiet_deepspeed_probe(env: DistEnv) -> None:
    """DeepSpeed warns "Setting accelerator to CPU" in every process that imports it without a GPU: rank 0 keeps
    the line, the other ranks name the accelerator up front (DS_ACCELERATOR, read at DeepSpeed's import) so the
    start-up does not repeat it once per rank. A user's DS_ACCELERATOR always wins."""
    if not env.is_main and "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def start_distributed(prep: Prepared, run_dir: Path) -> tuple[torch.device, Path]:
    """Start the process group; every rank adopts rank 0's run dir (launchers may differ in ${now:})."""
    init_process_group(prep.env, prep.cfg.trainer.dist_timeout_s)
    own = run_dir.resolve()
    run_dir = Path(str(mdist.all_gather_objects(str(own))[0]))
    if own != run_dir:  # this rank's ${now:} differed by a second: drop the stray Hydra dir it made
        stray = [p for p in own.iterdir() if p.name != ".hydra" and p.suffix != ".log"] if own.is_dir() else []
        if not stray:
            shutil.rmtree(own, ignore_errors=True)
    if prep.env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    mdist.barrier()
    return device_for(prep.env), run_dir


def build_train_loader_for(cfg: TrainConfig, tokenizer: TextTokenizer, env: DistEnv,
                           resume: LoaderState | None = None) -> BatchLoader:
    """`Batch`es from data.train, or `MixedBatch`es (parts keyed by kind) when data.sources is set; `resume`
    continues a checkpoint's data streams exactly."""
    d = cfg.data
    common = dict(
        batch_size=d.batch_size, image_size=d.image_size, num_workers=d.num_workers, seed=cfg.trainer.seed,
        rank=env.rank, world_size=env.world_size, shuffle_buffer=d.train.shuffle_buffer, resume=resume,
        scale=tuple(d.rrc_scale), hflip=d.hflip, mean=d.mean, std=d.std, image_mask=image_masker(cfg),
        limits=sample_limits(cfg), max_empty_s=d.max_empty_s,
    )
    if d.sources:
        return build_mixed_train_loader(source_specs(cfg), tokenizer, **common)
    return build_train_loader(d.train.urls, tokenizer, **common)


def build_eval_loader_for(cfg: TrainConfig, tokenizer: TextTokenizer, env: DistEnv) -> BatchLoader:
    d = cfg.data
    return build_eval_loader(
        d.eval.urls, tokenizer, batch_size=d.eval_batch_size, image_size=d.image_size,
        num_workers=min(d.num_workers, 2), rank=env.rank, world_size=env.world_size, mean=d.mean, std=d.std,
        limits=sample_limits(cfg), max_empty_s=d.max_empty_s,
    )


def sample_limits(cfg: TrainConfig) -> SampleLimits:
    return SampleLimits(cfg.data.max_image_pixels, cfg.data.max_caption_bytes)


def current_env() -> DistEnv:
    """The launch's ranks; a lone process without MASTER_PORT takes a free port for its (1-rank) process
    group, so that several single-process runs on one machine (a Hydra multirun's jobs on hydra/launcher=local,
    single-task SLURM array jobs sharing a node) do not all bind 29500."""
    env = detect_env()
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        env = dataclasses.replace(env, master_port=_free_port())
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
