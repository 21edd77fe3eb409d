"""`mmpt-eval ckpt=<run dir | checkpoint dir | mmpt-export dir> data.eval.urls=<shards> [eval.output=FILE] [key=value ...]`

Loads the config and tokenizer saved with the weights (mmpt.engine.saved_model, the reader mmpt.load uses),
applies the overrides, evaluates retrieval on every rank of the launcher (single process, torchrun, srun) and
prints/writes flat JSON metrics. Where data is read and results are written (data.eval.urls, eval.output,
eval.zeroshot.root/urls/classnames/output) comes only from the command line, never from the checkpoint's
config.yaml: a downloaded run dir could name a `pipe:` shell command there.
Zero-shot classification: `eval.zeroshot.root=IMAGE_FOLDER [eval.zeroshot.classnames=FILE]
[eval.zeroshot.templates=default|imagenet_openai|FILE] [eval.zeroshot.output=clip_benchmark.json]`
(or `eval.zeroshot.urls=SHARDS` with a .cls per sample); `data.eval.urls=null` then skips retrieval.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mmpt import distributed as mdist
from mmpt.cli.common import fail, strip_launcher_args, user_errors_exit
from mmpt.engine.config import ConfigError, EvalConfig
from mmpt.engine.dist_env import detect_env, device_for, init_process_group
from mmpt.engine.saved_model import CONFIG_FILE, load_saved_weights, read_saved
from mmpt.engine.run_setup import build_eval_loader_for, configure_logging, log, validate
from mmpt.eval import zeroshot
from mmpt.eval.runner import evaluate_model
from mmpt.models.registry import build_model


def parse_overrides(argv: list[str]) -> tuple[str, list[str]]:
    """`key=value` or `--key=value`; returns the ckpt value and the remaining dotlist."""
    ckpt, rest = None, []
    for arg in argv:
        arg = arg.removeprefix("--")
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value; usage: mmpt-eval ckpt=RUN_DIR [key=value ...]")
        key, value = arg.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # quoted like a Hydra override: data.eval.urls='/d/{0..3}.tar'
        if key == "ckpt":
            ckpt = value
        else:
            rest.append(f"{key}={value}")
    if ckpt is None:
        raise ConfigError("missing ckpt=<run dir or checkpoint dir>; usage: mmpt-eval ckpt=runs/x data.eval.urls=...")
    return ckpt, rest


# Where evaluation reads data from and writes results to. A checkpoint's config.yaml (maybe downloaded) must not
# choose them: a `pipe:` URL is a shell command, an output path can overwrite any file. Reset before the
# command line's overrides are merged, so only the user sets them.
STORED_SOURCE_KEYS = ("data.eval.urls", "eval.output", "eval.zeroshot.root", "eval.zeroshot.urls",
                      "eval.zeroshot.classnames", "eval.zeroshot.output")


def drop_stored_sources(config: DictConfig) -> dict[str, object]:
    """Set STORED_SOURCE_KEYS to null in a stored config (in place); returns the values dropped."""
    dropped = {}
    for key in STORED_SOURCE_KEYS:
        value = OmegaConf.select(config, key, default=None)
        if value is not None:
            dropped[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            OmegaConf.update(config, key, None, force_add=True)
    return dropped


@user_errors_exit
def evaluate(argv: list[str]) -> dict[str, float]:
    ckpt, overrides = parse_overrides(argv)
    stored = read_saved(ckpt)  # a run dir, a checkpoint tag dir or an `mmpt-export` dir
    tag_dir = stored.source
    saved = stored.config.copy()
    saved.tokenizer.path = str(stored.tokenizer_file)
    # eval settings added after the checkpoint was written take their defaults (and can be overridden)
    saved.eval = OmegaConf.merge(OmegaConf.structured(EvalConfig), saved.get("eval") or {})
    dropped = drop_stored_sources(saved)
    OmegaConf.set_struct(saved, True)
    try:
        cfg_raw = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    except Exception as exc:  # omegaconf raises several types for a bad dotlist
        raise ConfigError(f"bad override in {overrides}: {str(exc).splitlines()[0]}") from None
    env = detect_env()
    configure_logging(env)
    if env.is_main and dropped:
        log.info("not used from %s/%s (data and output paths come from the command line): %s", tag_dir,
                 CONFIG_FILE, ", ".join(f"{k}={v!r}" for k, v in dropped.items()))
    prep = validate(cfg_raw, env, need_train=False)
    zeroshot_on = zeroshot.enabled(prep.cfg.eval.zeroshot)
    if not prep.cfg.data.eval.urls and not zeroshot_on:
        raise ConfigError("data.eval.urls is not set; pass data.eval.urls='<shard pattern>' (retrieval) or "
                          "eval.zeroshot.root=<image folder> (zero-shot classification) on the command line "
                          f"(mmpt-eval never takes them from the checkpoint's {CONFIG_FILE})")
    if env.world_size > 1:
        init_process_group(env, prep.cfg.trainer.dist_timeout_s)
    device = device_for(env)
    model = load_saved_weights(build_model(prep.cfg.model), stored)
    model.to(device)
    loader = build_eval_loader_for(prep.cfg, prep.tokenizer, env) if prep.cfg.data.eval.urls else None
    d = prep.cfg.data
    try:
        metrics = evaluate_model(model, loader, prep.tokenizer, prep.cfg.eval, device, None, d.mean, d.std,
                                 image_size=d.image_size, source=str(tag_dir)).metrics
    finally:
        if loader is not None:
            loader.close()  # workers left alive make the exit hang after an error (mmpt.data.worker_lifecycle)
    if env.is_main:
        metrics = {"checkpoint": str(tag_dir), **metrics}  # type: ignore[dict-item]
        text = json.dumps(metrics, indent=2)
        print(text, flush=True)
        if prep.cfg.eval.output:
            Path(prep.cfg.eval.output).parent.mkdir(parents=True, exist_ok=True)
            Path(prep.cfg.eval.output).write_text(text + "\n")
    if mdist.is_dist():
        torch.distributed.destroy_process_group()
    return metrics


def main() -> None:
    argv = strip_launcher_args(sys.argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        fail("missing ckpt=...", 2) if not argv else None
        return
    evaluate(argv)


if __name__ == "__main__":
    main()
