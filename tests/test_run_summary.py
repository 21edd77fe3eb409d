"""The end-of-run summary: best eval metrics from metrics.jsonl across resumes, <= 15 human lines, next commands."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from mmpt.engine.run_summary import RunFacts, best_of, build_summary, format_summary


def _facts(run_dir: Path, **kw) -> RunFacts:
    base = dict(step=30, max_steps=30, start_step=10, wall_s=80.0, train_s=8.0, global_batch=32, run_dir=run_dir,
                checkpoint=run_dir / "checkpoints" / "step_00000030", wandb_run_id="abc",
                wandb_dir=str(run_dir / "wandb" / "offline-run-x"), wandb_offline=True, preempted_by=None,
                eval_metrics={"retrieval/t2i_r1": 0.25, "retrieval/mean": 0.5, "retrieval/t2i_r1_caption": 0.3},
                eval_urls="d/eval/{000..001}.tar")
    return RunFacts(**{**base, **kw})


def test_summary_json_has_wall_time_samples_and_best_metrics_with_steps(tmp_path):
    lines = [{"step": 10, "train/loss": 3.0}, {"step": 10, "eval/retrieval/t2i_r1": 0.40, "eval/retrieval/mean": 0.3},
             {"step": 20, "eval/retrieval/t2i_r1": 0.10, "eval/retrieval/mean": 0.4, "eval/mlm_loss": 2.0},
             {"step": 30, "eval/retrieval/t2i_r1": 0.25, "eval/retrieval/mean": 0.5, "eval/mlm_loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3')  # cut line
    s = build_summary(_facts(tmp_path))
    assert (s["wall_s"], s["train_s"], s["steps_this_run"], s["samples_seen"]) == (80.0, 8.0, 20, 960)
    assert s["samples_per_s"] == 20 * 32 / 8.0  # training-loop throughput of this process
    assert s["best"]["retrieval/t2i_r1"] == {"step": 10, "value": 0.40}  # before the resume: from metrics.jsonl
    assert s["best"]["retrieval/mean"] == {"step": 30, "value": 0.5}
    assert s["best"]["mlm_loss"] == {"step": 30, "value": 1.5}  # losses: lower is better
    assert s["final_eval_step"] == 30 and s["retrieval/t2i_r1"] == 0.25  # final metrics stay top-level keys
    assert best_of("acc", [(1, 0.5), (2, 0.5)]) == (1, 0.5)  # ties: the earliest


def test_human_summary_fits_15_lines_and_its_commands_paste_into_bash(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/retrieval/t2i_r1": 0.4}) + "\n"
                                            + json.dumps({"step": 30, "eval/retrieval/t2i_r1": 0.25,
                                                          "eval/retrieval/mean": 0.5}) + "\n")
    text = format_summary(build_summary(_facts(tmp_path)))
    assert len(text) <= 15
    assert text[0] == "run finished: step 30/30 | wall 1m20s (training 8s, 20 steps) | 80.0 samples/s | 960 samples seen"
    assert "  retrieval      t2i_r1 0.250 (best 0.400 @ 10) | mean 0.500" in text
    commands = text[text.index("next:") + 1:]
    assert [shlex.split(c)[:2] for c in commands] == [
        ["mmpt-eval", f"ckpt={tmp_path}"], ["mmpt-export", str(tmp_path)], ["wandb", "sync"]]
    assert shlex.split(commands[0])[2] == "data.eval.urls=d/eval/{000..001}.tar"  # quoted: braces reach mmpt
    preempted = format_summary(build_summary(_facts(tmp_path, preempted_by="USR1", wandb_offline=False)))
    assert preempted[0].startswith("run preempted by USR1: step 30/30") and not any("wandb sync" in x for x in preempted)
