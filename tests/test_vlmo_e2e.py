"""Tiny VLMo end to end on mixed data (pairs + images with block-wise masks + texts): 2-process DeepSpeed
ZeRO-2 (gloo) through the real CLI, SIGKILL after a checkpoint, resume to max_steps, ITC + ITM re-ranked eval."""
from __future__ import annotations

import pytest

from mmpt.engine.checkpoint import load_model_weights
from tests.test_models_e2e import run_to_end

pytestmark = pytest.mark.slow


def test_vlmo_mixed_data_two_process_zero2_kill_and_resume(demo_env, tmp_path):
    # batch 8 per rank from data=mixed_demo's weights 2:1:1 -> 4 pairs, 2 images, 2 texts; 32 px / patch 8
    # gives 16 patches, 6 of them masked (min_patches lowered to fit)
    extra = ["data=mixed_demo", "data.image_mask.min_patches=4", "model.objectives=[itc,itm,mlm,mim]",
             "model.visual_tokenizer.kind=pixels", "model.itm.hardness_warmup_steps=10"]
    summary, records, max_steps = run_to_end(tmp_path, "vlmo_tiny_pairs", extra)
    train = [r for r in records if "train/loss" in r]
    last = train[-1]
    terms = ("itc", "itm", "mlm", "mim")
    assert {f"train/{k}" for k in terms} <= set(last)
    assert last["train/loss"] == pytest.approx(sum(last[f"train/{k}"] for k in terms), rel=1e-4)
    assert last["train/mim"] < train[0]["train/mim"] and last["train/mlm"] < train[0]["train/mlm"]
    weights = load_model_weights(tmp_path / "run" / "checkpoints" / f"step_{max_steps:08d}")
    assert int(weights["step"].reshape(-1)[0]) == max_steps  # the hard-negative ramp's step came back
    assert "mim_head.head.weight" in weights and "encoder.transformer.blocks.1.ffn_vl.mlp.fc1.weight" in weights
    for key in ("retrieval/t2i_r1", "retrieval_itm/t2i_r1", "retrieval/i2t_r1"):
        assert 0.0 <= summary[key] <= 1.0
