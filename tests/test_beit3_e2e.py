"""Tiny BEiT-3 end to end: 2-process DeepSpeed (gloo) masked data modeling on mixed pairs / images / texts
through the real CLI, SIGKILL after a checkpoint, resume to max_steps."""
from __future__ import annotations

import pytest

from mmpt.engine.checkpoint import load_model_weights
from tests.test_models_e2e import run_to_end

pytestmark = pytest.mark.slow


def test_beit3_mixed_data_mdm_two_process_kill_and_resume(demo_env, tmp_path):
    # 32 px / patch 8 = 16 patches, 6 of them masked: blocks of at least 4 patches fit
    summary, records, max_steps = run_to_end(tmp_path, "beit3_tiny_mdm", ["data.image_mask.min_patches=4"])
    logged = [r for r in records if "train/loss" in r]
    first, last = logged[0], logged[-1]
    assert {"train/mdm_text", "train/mdm_image", "train/mdm_text_acc"} <= set(last)
    assert "train/itc" not in last  # no ITC term in the MDM stage
    assert last["train/loss"] == pytest.approx(last["train/mdm_text"] + last["train/mdm_image"], rel=1e-4)
    assert last["train/mdm_text"] < first["train/mdm_text"]
    weights = load_model_weights(tmp_path / "run" / "checkpoints" / f"step_{max_steps:08d}")
    assert {"mlm_head.decoder.weight", "mim_head.head.weight", "encoder.patch_embed.mask_token"} <= set(weights)
    assert weights["encoder.patch_embed.mask_token"].abs().sum() > 0  # [MASK] embedding trained from zeros
