"""logger=tensorboard: event files hold the same keys and values as metrics.jsonl; logger lists compose."""
from __future__ import annotations

import json
import sys

import pytest
from hydra import compose, initialize_config_dir

from mmpt.cli.common import CONF_DIR
from mmpt.engine.config import ConfigError, LoggerConfig, typed_config
from mmpt.engine.loggers import RunLogger
from mmpt.eval.runner import CaptionSample

pytest.importorskip("tensorboard")


def read_events(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under log_dir, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_file_has_the_keys_and_values_of_metrics_jsonl(tmp_path):
    logger = RunLogger(LoggerConfig(backend="none", tensorboard=True), tmp_path, "id", {}, is_main=True, max_steps=10)
    logger.log({"step": 5, "train/loss": 3.25, "train/itc": 3.0, "train/lr": 1e-3, "train/skipped": 2})
    logger.log({"step": 10, "train/loss": 2.5, "train/itc": 2.125, "train/lr": 5e-4, "train/skipped": 0})
    logger.log({"step": 10, "eval/i2t_r1": 0.375, "eval/t2i_r1": 0.25})
    logger.log_caption_samples(10, [CaptionSample(None, "a red circle", "a red square")])
    logger.close()

    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], value))
    events = read_events(tmp_path / "tensorboard")
    assert set(events) == set(expected) == {"train/loss", "train/itc", "train/lr", "train/skipped",
                                            "eval/i2t_r1", "eval/t2i_r1"}
    for key, points in expected.items():  # float32 in the event file: the values above are exact in float32
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in points] == events[key], key


def _logger_node(overrides: list[str]) -> LoggerConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        raw = compose("train", overrides=overrides)
    return typed_config(raw).logger


@pytest.mark.parametrize("overrides, backend, tensorboard", [
    ([], "wandb", False),  # the default (logger: wandb) is unchanged by LoggerConfig.backend's default "none"
    (["logger=tensorboard"], "none", True),  # alone: no W&B
    (["logger=[wandb,tensorboard]"], "wandb", True),
    (["logger=[tensorboard,wandb]"], "wandb", True),  # the order does not matter
])
def test_logger_group_composes_alone_and_as_a_list(overrides, backend, tensorboard):
    cfg = _logger_node(overrides)
    assert (cfg.backend, cfg.tensorboard) == (backend, tensorboard)
    if backend == "wandb":
        assert cfg.mode == "offline"  # wandb.yaml's keys survive the merge with tensorboard.yaml


def test_missing_tensorboard_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'mmpt\[tensorboard\]'"):
        RunLogger(LoggerConfig(tensorboard=True), tmp_path, "id", {}, is_main=True, max_steps=1)


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    """Attempt 1 logs steps 10-30 and dies; attempt 2 resumes from the step-10 checkpoint and logs 20 and 30
    again: TensorBoard shows attempt 2's values there, once each (as mmpt-report reads metrics.jsonl)."""
    for values in ({10: 3.0, 20: 2.5, 30: 2.0}, {20: 2.75, 30: 2.25}):
        logger = RunLogger(LoggerConfig(tensorboard=True), tmp_path, "id", {}, is_main=True, max_steps=30)
        for step, loss in values.items():
            logger.log({"step": step, "train/loss": loss})
        logger.close()
    assert read_events(tmp_path / "tensorboard")["train/loss"] == [(10, 3.0), (20, 2.75), (30, 2.25)]


def test_launch_check_refuses_tensorboard_without_the_package(monkeypatch):
    """Checked before any process starts (every rank), not only when rank 0 opens its writer."""
    import importlib.util

    from mmpt.engine.config import TrainConfig, check_combinations

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = TrainConfig(logger=LoggerConfig(tensorboard=True))
    with pytest.raises(ConfigError, match=r"^logger.tensorboard=true \(logger=tensorboard\) needs the tensorboard package"):
        check_combinations(cfg, world_size=1, has_gpu=False, model_objectives=("itc",))
