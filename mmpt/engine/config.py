"""Structured schema of the training config and the one place that validates it.

Validation runs before any process group exists, so a typo costs a second, not a queue slot. Every
problem becomes a `ConfigError` whose message names the key, what is wrong and how to fix it.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from mmpt.data.limits import DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from mmpt.data.stall import DEFAULT_MAX_EMPTY_S
from mmpt.engine.preemption import signal_number
from mmpt.eval.zeroshot import ZeroShotConfig
from mmpt.models.registry import arch_names, model_config


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits with code 2."""


@dataclass
class TrainDataConfig:
    urls: Any = MISSING
    shuffle_buffer: int = 1000


@dataclass
class EvalDataConfig:
    urls: Any = None


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a weighted stream of one kind of sample (pairs, images or texts)."""

    name: str = ""
    kind: str = "pairs"
    urls: Any = MISSING  # tar shard spec; kind=texts also takes plain .txt files (one sample per line)
    weight: float = 1.0


@dataclass
class ImageMaskConfig:
    """BEiT v2 block-wise patch masks, made in the data workers for every image (`Batch.image_mask`)."""

    enabled: bool = False
    ratio: float = 0.4  # masked patches = round(ratio * patches), half up: 0.4 of 14x14 -> 78
    num_masked: Optional[int] = None  # overrides ratio (BEiT v2's preset: 75 of 196)
    min_patches: int = 16
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None  # None = 1 / min_aspect
    patch_size: int = 16  # must be the model's patch size


@dataclass
class DataConfig:
    train: TrainDataConfig = field(default_factory=TrainDataConfig)
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    sources: list[SourceConfig] = field(default_factory=list)  # empty = data.train as the one pairs source
    image_mask: ImageMaskConfig = field(default_factory=ImageMaskConfig)
    batch_size: int = 64
    eval_batch_size: int = 256
    image_size: int = 64
    max_text_len: int = 24
    num_workers: int = 1
    rrc_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    hflip: bool = False
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # bounded bad input (mmpt/data/limits.py, mmpt/data/stall.py): samples over these sizes are skipped before
    # decoding and counted; a train stream with no usable sample for max_empty_s seconds stops the run
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    max_empty_s: float = DEFAULT_MAX_EMPTY_S


@dataclass
class TokenizerConfig:
    path: str = MISSING
    vocab_size: int = MISSING


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    # GradCache: one contrastive loss over this many micro-batches (data.batch_size each) per accumulation step,
    # at the activation memory of one; 1 = off (mmpt/engine/grad_cache.py)
    contrastive_accum_steps: int = 1
    global_batch_size: Optional[int] = None
    grad_clip: float = 1.0
    precision: str = "fp32"
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    resume: str = "auto"
    seed: int = 0
    dist_timeout_s: int = 1800
    preempt_signals: list[str] = field(default_factory=lambda: ["USR1", "TERM"])
    preempt_check_every: int = 1
    dry_run: bool = False
    expected_world_size: Optional[int] = None
    # dense peak TFLOP/s per device for train/mfu: null = known GPUs detected (H100/H200/A100, by precision);
    # on CPU train/mfu is logged only when this is set
    peak_tflops: Optional[float] = None
    # torch.compile every transformer block in place (mmpt/engine/compile.py; ZeRO 0-2); eager by default: on
    # CPU the compile time (minutes) is rarely won back. compile_backend: a torch.compile backend name
    compile: bool = False
    compile_backend: str = "inductor"
    # divergence guards (mmpt/engine/divergence.py): a step with a non-finite gradient norm or loss is skipped;
    # this many skipped steps in a row stop the run. spike_factor: also skip a step whose loss exceeds this many
    # times the moving average of accepted losses (after a warm-up); null = off
    max_bad_steps: int = 20
    spike_factor: Optional[float] = None
    # what the console's progress line shows after step, %, elapsed and ETA (metrics.jsonl and W&B keep every
    # metric): names without `train/`, e.g. [loss, itc, lr, samples_per_s, mfu, data_wait, tflops, grad_norm];
    # null = total loss, each objective's loss, lr, samples/s, TFLOP/s, MFU when known, data-wait, skip counts
    console_keys: Optional[list[str]] = None
    # dry runs only: nodes of the job being planned, so `trainer.expected_world_size=32 trainer.expected_nodes=4`
    # is reported as 4 nodes x 8 ranks (default: SLURM's / torchrun's node count of this shell, else 1)
    expected_nodes: Optional[int] = None


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # parameter-name suffix -> lr multiplier, e.g. {logit_bias: 10}: SigLIP's bias lives in logit units (~-10)
    # while Adam moves a parameter by ~lr per step, so at lr 1e-3 it can hardly follow the scale t.
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0


@dataclass
class LossConfig:
    """Per-objective weights; an objective not named here keeps its model's default weight."""

    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    # W&B (wandb) or none. "none" when unset, so `logger=tensorboard` alone (its yaml sets only `tensorboard`)
    # runs without W&B, and `logger=[wandb,tensorboard]` merges wandb.yaml's `backend: wandb` with it.
    backend: str = "none"
    mode: str = "offline"
    project: str = "mmpt"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    tensorboard: bool = False  # also write <run dir>/tensorboard/ event files (conf/logger/tensorboard.yaml)


@dataclass
class EvalConfig:
    every: int = 0
    at_end: bool = True
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    output: Optional[str] = None
    rerank_k: int = 4  # ITM re-ranks each query's ITC top-k (models with itm_score); 0 = off
    # itm+itc_logit: log ITM probability + ITC logit; itm: ITM alone (ALBEF); itm+itc: + ITC cosine (BLIP/LAVIS-style)
    rerank_score: str = "itm+itc_logit"
    rerank_itm_weight: float = 1.0  # itm+itc*: weight * log p(ITM) + the ITC term (retrieval.rerank_scores)
    rerank_min_itm: float = 0.8  # itm+itc*: a query whose best p(ITM) in its top-k is below this keeps its ITC order
    caption_max_images: int = 256  # captioning eval (models with generate); 0 = off
    caption_max_len: int = 20
    caption_beams: int = 3
    caption_samples: int = 8  # rows of the W&B table of sample captions
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)  # image classification; off until root/urls


@dataclass
class TrainConfig:
    """Everything except `model` (typed per architecture by the registry) and `deepspeed` (DeepSpeed's own
    JSON schema, checked by DeepSpeed itself)."""

    model: Any = None
    deepspeed: Any = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys of the DeepSpeed dict that mmpt derives from trainer/data/optimizer settings: setting them by hand
# is how batch sizes silently drift out of sync, so they are refused.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.batch_size, trainer.grad_accum (or trainer.global_batch_size)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "gradient_clipping": "trainer.grad_clip",
    "bf16": "trainer.precision=bf16",
    "fp16": "trainer.precision=fp16",
    "optimizer": "optimizer.*",
    "scheduler": "scheduler.*",
}


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _describe_omegaconf_error(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    full = f"{where}.{key}" if where and not key.startswith(where) else key
    if isinstance(exc, ConfigKeyError):
        obj = getattr(exc, "object_type", None)
        valid = list(getattr(obj, "__dataclass_fields__", {}))
        leaf = full.rsplit(".", 1)[-1]
        return (
            f"unknown config key '{full}'.{_suggest(leaf, valid)} Valid keys here: {', '.join(valid)}. "
            "Fix the override or the YAML file that sets it."
        )
    if isinstance(exc, MissingMandatoryValue):
        return f"config key '{full}' is required but not set (???). Set it on the command line: {full}=..."
    if isinstance(exc, ValidationError):
        return (f"config key '{full}' has a wrong type or value: {exc.msg.splitlines()[0].rstrip('.')}; fix the override or the "
                "YAML file that sets it")
    return f"invalid config at '{full}': {str(exc).splitlines()[0]}"


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations (${...}) with a clear error instead of OmegaConf's stack trace."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc, "")) from None
    return cfg


def _check_source_items(body: dict[str, Any]) -> None:
    """OmegaConf's errors about list items lose the index: name `data.sources[i]` here instead."""
    data = body.get("data")
    sources = data.get("sources") if isinstance(data, dict) else None
    if sources is None:
        return
    example = "{name: cc, kind: pairs, urls: '/data/{00000..00099}.tar', weight: 1.0}"
    if not isinstance(sources, list):
        raise ConfigError(f"data.sources must be a list of sources like [{example}], got {sources!r}")
    train = data.get("train")
    if sources and isinstance(train, dict) and train.get("urls") == "???":
        train["urls"] = None  # data.sources replaces data.train.urls: a preset's required ??? must not block it
    valid = list(SourceConfig.__dataclass_fields__)
    for i, item in enumerate(sources):
        if not isinstance(item, dict):
            raise ConfigError(f"data.sources[{i}] must be a mapping like {example}, got {item!r}")
        for key in item:
            if key not in valid:
                raise ConfigError(f"unknown config key 'data.sources[{i}].{key}'.{_suggest(key, valid)} "
                                  f"Valid keys here: {', '.join(valid)}")
        if item.get("urls") in (None, "???", "", []):
            raise ConfigError(f"data.sources[{i}].urls is not set; give a shard pattern or .txt files (kind=texts)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"data.sources[{i}].weight={weight!r} must be a number (its share of data.batch_size)")


def _check_eval_urls_set(cfg: DictConfig) -> None:
    """A data preset's `data.eval.urls: ???` (coco_karpathy, flickr30k_karpathy) must be set: its schema default
    (None) would otherwise silently replace the ??? (OmegaConf.to_object skips missing fields). data.train.urls
    has no default, so the schema merge already refuses its ???."""
    missing = OmegaConf.missing_keys(cfg)
    if "data.eval.urls" not in missing:
        return
    if "data.train.urls" in missing and not OmegaConf.select(cfg, "data.sources", default=None):
        raise ConfigError("config keys 'data.train.urls' and 'data.eval.urls' are required but not set (???). Set them "
                          "on the command line: data.train.urls=... data.eval.urls=... (shard patterns; the data "
                          "preset's yaml says how to make the shards)")
    raise ConfigError("config key 'data.eval.urls' is required but not set (???). Set it on the command line: "
                      "data.eval.urls=... (a shard pattern; the data preset's yaml says how to make the shards)")


def typed_config(cfg: DictConfig) -> TrainConfig:
    """Merge the composed config onto the schema: unknown keys and wrong types become ConfigError."""
    # A required model key (???) that has a dataclass default would otherwise silently take that default
    # (OmegaConf.to_object skips missing fields): e.g. a later training stage's model.init.checkpoint.
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.startswith("model."))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' is required but not set (???). Set it on the command line: "
                          f"{missing[0]}=...")
    _check_eval_urls_set(cfg)
    body = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(body, dict)
    body.pop("hydra", None)
    _check_source_items(body)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in body.items() if k != "model"})
        typed: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc, "")) from None
    check_ranges(typed)  # before the model: data.image_size=0 is named as the user typed it, not model.vision's
    model_cfg = body.get("model")
    if not isinstance(model_cfg, dict) or "arch" not in model_cfg:
        raise ConfigError(f"config 'model' needs an 'arch' key (one of {arch_names()}); pick a preset: model=clip/tiny")
    try:
        model_typed = model_config(model_cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc, "model")) from None
    except KeyError as exc:  # unknown arch
        raise ConfigError(str(exc.args[0])) from None
    except ValueError as exc:  # the arch config's own consistency checks (__post_init__)
        raise ConfigError(f"model: {exc}") from None
    typed.model = model_typed
    return typed


def _refuse_unless(ok: bool, key: str, value: Any, rule: str) -> None:
    """`ok` false -> `key=value rule` (rule says what is allowed and how to fix it)."""
    if not ok:
        raise ConfigError(f"{key}={value} {rule}")


def _fraction_list(key: str, values: list[float], length: int, rule: str) -> None:
    _refuse_unless(len(values) == length and all(math.isfinite(v) for v in values), key, list(values),
                   f"must be {length} finite numbers ({rule})")


def check_ranges(cfg: TrainConfig) -> None:
    """Each engine setting on its own: counts, sizes, rates and probabilities in their valid ranges. What a
    wrong value would otherwise do: train silently (a negative clip or decay), crash after launch (a negative
    lr in the optimizer, num_workers=-1 in the DataLoader) or never finish (data.max_text_len=0)."""
    t, d, o, s, e = cfg.trainer, cfg.data, cfg.optimizer, cfg.scheduler, cfg.eval
    for key, value in (("trainer.max_steps", t.max_steps), ("data.batch_size", d.batch_size),
                       ("trainer.grad_accum", t.grad_accum), ("trainer.log_every", t.log_every),
                       ("trainer.contrastive_accum_steps", t.contrastive_accum_steps),
                       ("trainer.save_every", t.save_every), ("data.eval_batch_size", d.eval_batch_size),
                       ("trainer.preempt_check_every", t.preempt_check_every), ("data.image_size", d.image_size),
                       ("data.max_text_len", d.max_text_len), ("eval.caption_max_len", e.caption_max_len),
                       ("eval.caption_beams", e.caption_beams)):
        _refuse_unless(value > 0, key, value, "must be positive")
    for key, value, zero in (("data.num_workers", d.num_workers, "load in the training process"),
                             ("data.train.shuffle_buffer", d.train.shuffle_buffer, "no shuffling"),
                             ("scheduler.warmup_steps", s.warmup_steps, "no warm-up"),
                             ("eval.every", e.every, "no periodic evaluation"),
                             ("eval.rerank_k", e.rerank_k, "no ITM re-ranking"),
                             ("eval.caption_max_images", e.caption_max_images, "no captioning evaluation"),
                             ("eval.caption_samples", e.caption_samples, "no sample captions")):
        _refuse_unless(value >= 0, key, value, f"must be >= 0 (0 = {zero})")
    for key, value in (("trainer.expected_world_size", t.expected_world_size),
                       ("trainer.expected_nodes", t.expected_nodes)):
        _refuse_unless(value is None or value >= 1, key, value, "must be >= 1, or null (= this shell's)")
    _refuse_unless(t.dist_timeout_s > 0, "trainer.dist_timeout_s", t.dist_timeout_s,
                   "must be > 0 seconds (how long a rank waits for its peers; default 1800)")
    _refuse_unless(t.max_bad_steps >= 1, "trainer.max_bad_steps", t.max_bad_steps,
                   "must be >= 1 (skipped optimizer steps in a row that stop a run; default 20)")
    _refuse_unless(t.spike_factor is None or (math.isfinite(t.spike_factor) and t.spike_factor > 1), "trainer.spike_factor",
                   t.spike_factor, "must be > 1 (a multiple of the moving average loss), or null to turn the spike guard off")
    for key, value, rule in (
        ("optimizer.lr", o.lr, "must be a finite number >= 0, e.g. optimizer.lr=1e-3"),
        ("optimizer.weight_decay", o.weight_decay, "must be a finite number >= 0 (0 = no decay)"),
        ("optimizer.eps", o.eps, "must be a finite number >= 0 (AdamW's denominator term, e.g. 1e-6)"),
        ("trainer.grad_clip", t.grad_clip, "must be a finite number >= 0 (the gradient-norm limit; 0 = no clipping)"),
        *((f"optimizer.lr_mult.{name}", mult, "must be a finite number >= 0 (a multiplier of optimizer.lr)")
          for name, mult in o.lr_mult.items()),
        *((f"loss.weights.{name}", w, "must be a finite number >= 0 (the objective's share of the loss)")
          for name, w in cfg.loss.weights.items()),
    ):
        _refuse_unless(math.isfinite(value) and value >= 0, key, value, rule)
    _refuse_unless(0 <= s.min_lr_ratio <= 1, "scheduler.min_lr_ratio", s.min_lr_ratio,
                   "must be in [0, 1] (the final lr as a share of optimizer.lr)")
    _fraction_list("optimizer.betas", o.betas, 2, "AdamW's beta1, beta2, e.g. [0.9,0.98]")
    _refuse_unless(all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
                   "must each be in [0, 1) (AdamW's moving-average factors), e.g. [0.9,0.98]")
    _fraction_list("data.rrc_scale", d.rrc_scale, 2, "the min and max area share of a random resized crop")
    low, high = d.rrc_scale
    _refuse_unless(0 < low <= high <= 1, "data.rrc_scale", list(d.rrc_scale),
                   "must be [min, max] with 0 < min <= max <= 1 (area shares of the crop; [1.0,1.0] = no crop)")
    _fraction_list("data.mean", d.mean, 3, "one per RGB channel")
    _fraction_list("data.std", d.std, 3, "one per RGB channel")
    _refuse_unless(all(v > 0 for v in d.std), "data.std", list(d.std),
                   "must be > 0 per channel (images are divided by it)")
    _refuse_unless(bool(e.ks) and all(k >= 1 for k in e.ks), "eval.ks", list(e.ks),
                   "must list recall cut-offs >= 1, e.g. eval.ks=[1,5,10]")


def check_text_length(max_text_len: int, tokenizer: Any) -> None:
    """A caption is the tokenizer's special tokens ([CLS] ... [SEP]) around its words: with no room for one
    word every caption is only special tokens, and with less room than that the data workers fail."""
    processor = getattr(getattr(tokenizer, "tokenizer", None), "post_processor", None)
    special = int(processor.num_special_tokens_to_add(False)) if processor is not None else 0
    if max_text_len < special + 1:
        raise ConfigError(f"data.max_text_len={max_text_len} leaves no room for caption tokens: the tokenizer adds "
                          f"{special} special token(s) to every caption; set data.max_text_len to at least "
                          f"{special + 1} (a caption keeps max_text_len - {special} of its tokens)")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


def check_combinations(cfg: TrainConfig, world_size: int, has_gpu: bool, model_objectives: tuple[str, ...]) -> None:
    """Impossible or inconsistent option combinations, each with the fix."""
    t, d = cfg.trainer, cfg.data
    _check_choice("trainer.precision", t.precision, ("fp32", "bf16", "fp16"))
    _check_choice("logger.backend", cfg.logger.backend, ("wandb", "none"))
    _check_choice("logger.mode", cfg.logger.mode, ("online", "offline", "disabled"))
    if cfg.logger.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger.tensorboard=true (logger=tensorboard) needs the tensorboard package; install it "
                          "with `pip install 'mmpt[tensorboard]'`, or drop tensorboard from logger=")
    _check_choice("eval.rerank_score", cfg.eval.rerank_score, ("itm", "itm+itc", "itm+itc_logit"))
    if cfg.eval.rerank_itm_weight < 0 or not 0 <= cfg.eval.rerank_min_itm <= 1:
        raise ConfigError(f"eval.rerank_itm_weight={cfg.eval.rerank_itm_weight} must be >= 0 and "
                          f"eval.rerank_min_itm={cfg.eval.rerank_min_itm} a probability in [0, 1]")
    if t.precision == "fp16" and not has_gpu:
        raise ConfigError("trainer.precision=fp16 needs a GPU (loss scaling on CPU is unsupported); use bf16 or fp32")
    for name in t.preempt_signals:
        try:
            signal_number(name)
        except ValueError as exc:
            raise ConfigError(f"trainer.preempt_signals: {exc}") from None
    if t.spike_factor is not None and t.contrastive_accum_steps > 1:
        raise ConfigError(f"trainer.spike_factor={t.spike_factor} needs trainer.contrastive_accum_steps=1 (GradCache's "
                          "loss is known only after its backward passes); set trainer.spike_factor=null")
    if t.keep_last < 1:
        raise ConfigError(f"trainer.keep_last={t.keep_last} must be >= 1 (resuming needs a checkpoint)")
    if t.global_batch_size is not None:
        per_step = d.batch_size * world_size * t.contrastive_accum_steps
        if t.global_batch_size % per_step:
            key, value = ((" x trainer.contrastive_accum_steps", f" x {t.contrastive_accum_steps}")
                          if t.contrastive_accum_steps > 1 else ("", ""))
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} is not divisible by data.batch_size x world size{key} "
                f"= {d.batch_size} x {world_size}{value} = {per_step}; choose a multiple of {per_step} or change "
                "data.batch_size"
            )
        t.grad_accum = t.global_batch_size // per_step
    if not d.train.urls and not d.sources:
        raise ConfigError("data.train.urls is empty; set a shard pattern, e.g. data.train.urls='/data/{00000..00099}.tar' "
                          "(or list data.sources)")
    unknown = sorted(set(cfg.loss.weights) - set(model_objectives))
    if unknown:
        raise ConfigError(
            f"loss.weights has {unknown} but model.objectives={list(model_objectives)} (model.arch={cfg.model.arch}); "
            f"remove those weights or list the objectives in model.objectives"
        )
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"trainer.peak_tflops={t.peak_tflops} must be positive (TFLOP/s per device), or null")
    for key in DERIVED_DEEPSPEED_KEYS:
        if key in cfg.deepspeed:
            raise ConfigError(
                f"deepspeed.{key} is derived by mmpt; remove it and set {DERIVED_DEEPSPEED_KEYS[key]} instead"
            )
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    if t.contrastive_accum_steps > 1 and stage == 3:
        raise ConfigError(
            f"trainer.contrastive_accum_steps={t.contrastive_accum_steps} does not support ZeRO-3: its embedding pass "
            "runs outside DeepSpeed's forward, where ZeRO-3 gathers partitioned parameters; use deepspeed=zero2"
        )
    if t.compile:
        from mmpt.engine.compile import compile_backends

        _check_choice("trainer.compile_backend", t.compile_backend, tuple(compile_backends()))
        if stage == 3:
            raise ConfigError("trainer.compile=true supports ZeRO stages 0-2 (stage 3 gathers parameters in module "
                              "hooks that compiled blocks would trace); use deepspeed=zero2 or trainer.compile=false")
    resume = t.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise ConfigError(f"trainer.resume={resume!r}: no such checkpoint directory; use auto, none or a checkpoint dir")


def zero_stage(cfg: TrainConfig) -> int:
    return int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))


def check_grad_cache(cfg: TrainConfig, capabilities: frozenset[str]) -> None:
    """trainer.contrastive_accum_steps > 1 needs the model's `grad_cache` capability (the model config's
    `launch_problems` already named a non-contrastive objective or a momentum teacher; this catches the rest)."""
    n = cfg.trainer.contrastive_accum_steps
    if n > 1 and "grad_cache" not in capabilities:
        raise ConfigError(
            f"trainer.contrastive_accum_steps={n}: model.arch={cfg.model.arch} does not offer contrastive gradient "
            "caching (capability grad_cache); set trainer.contrastive_accum_steps=1 and use trainer.grad_accum"
        )


def check_model_launch(cfg: TrainConfig, world_size: int, tokenizer: Any = None, training: bool = True) -> None:
    """The model config's own checks against this run (`launch_problems`: momentum vs ZeRO, queue size, patch
    and image geometry, token ids); the engine does not know which architecture it asks."""
    from mmpt.models.config_parts import Launch

    mask = cfg.data.image_mask
    if tokenizer is not None:
        check_text_length(cfg.data.max_text_len, tokenizer)
    launch = Launch(world_size, cfg.data.batch_size, zero_stage(cfg), cfg.data.image_size,
                    mask.patch_size if mask.enabled else None, tokenizer, cfg.data.mean, cfg.data.std,
                    cfg.trainer.contrastive_accum_steps, max_text_len=cfg.data.max_text_len, training=training)
    problems = cfg.model.launch_problems(launch)
    if problems:
        raise ConfigError("model: " + "; ".join(problems))


def check_paths(cfg: TrainConfig, need_train: bool = True) -> None:
    """Files that must exist before launch: local shards, the tokenizer file."""
    from mmpt.data.shards import check_local_shards
    from mmpt.data.tokenizer import looks_like_local_path

    tok = cfg.tokenizer.path
    if looks_like_local_path(tok) and not Path(tok).expanduser().is_file():
        raise ConfigError(
            f"tokenizer.path={tok!r} does not exist; train one with "
            "`mmpt-data tokenizer --shards PATTERN --out tokenizer.json` or give a Hugging Face hub name"
        )
    init = getattr(cfg.model, "init", None)
    for key in ("vision", "text"):
        path = getattr(init, key, None) if init is not None else None
        if path and not Path(path).expanduser().exists():
            raise ConfigError(f"model.init.{key}={path!r} does not exist; give a local weights file or directory")
    sources = [("data.train.urls", cfg.data.train.urls)] if need_train and not cfg.data.sources else []
    if cfg.data.eval.urls:
        sources.append(("data.eval.urls", cfg.data.eval.urls))
    for key, urls in sources:
        try:
            check_local_shards(urls)
        except FileNotFoundError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    from mmpt.eval.zeroshot import check_config

    try:
        check_config(cfg.eval.zeroshot)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def image_masker(cfg: TrainConfig) -> Any:
    """The `BlockMasker` for `data.image_mask` (None when disabled); bad settings -> ConfigError."""
    from mmpt.data.masking import BlockMasker

    m, image_size = cfg.data.image_mask, cfg.data.image_size
    if not m.enabled:
        return None
    if m.patch_size < 1 or image_size % m.patch_size:
        raise ConfigError(f"data.image_mask.patch_size={m.patch_size} does not divide data.image_size={image_size}; "
                          "set it to the model's patch size")
    try:
        masker = BlockMasker.for_image(image_size, m.patch_size, m.ratio, m.num_masked, m.min_patches,
                                       m.min_aspect, m.max_aspect)
    except ValueError as exc:
        raise ConfigError(f"data.image_mask: {exc}") from None
    if 0 < masker.num_masked < m.min_patches:
        raise ConfigError(
            f"data.image_mask.min_patches={m.min_patches} exceeds the {masker.num_masked} masked patches "
            f"({masker.grid_h}x{masker.grid_w} grid), so no block ever fits and masking would be random; "
            f"lower data.image_mask.min_patches to {masker.num_masked} or less"
        )
    return masker


def source_specs(cfg: TrainConfig) -> list[Any]:
    """`data.sources` as the data layer's `SourceSpec`s (empty list: train on data.train)."""
    from mmpt.data.sources import SourceSpec

    return [SourceSpec(s.name, s.kind, s.urls, s.weight) for s in cfg.data.sources]


def check_data(cfg: TrainConfig, data_kinds: tuple[str, ...], need_train: bool = True) -> None:
    """data.sources (kinds, weights, per-source counts, files), the kinds the model can use, data.image_mask."""
    from mmpt.data.sources import check_sources

    image_masker(cfg)
    d = cfg.data
    for key in ("max_image_pixels", "max_caption_bytes", "max_empty_s"):
        if not getattr(d, key) > 0:
            raise ConfigError(f"data.{key}={getattr(d, key):g} must be > 0; it bounds bad input (default "
                              f"{getattr(DataConfig, key):g}), give a larger value to allow more")
    if not need_train:
        return
    specs = source_specs(cfg)
    if specs:
        try:
            check_sources(specs, d.batch_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    kinds = sorted({s.kind for s in specs} or {"pairs"})
    unusable = [k for k in kinds if k not in data_kinds]
    if unusable:
        raise ConfigError(
            f"model.arch={cfg.model.arch} trains on {list(data_kinds)} data but the config feeds it {unusable} "
            f"({'data.sources' if specs else 'data.train (pairs)'}); remove those sources or pick a model that "
            "uses them"
        )
