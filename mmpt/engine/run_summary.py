"""The end of a run, for a human and for scripts: a short console summary and `<run dir>/summary.json`.

Best eval metrics come from metrics.jsonl, so they span every resume of the run, not only this process."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpt.engine.progress import EVAL_SUFFIXES, format_duration
from mmpt.tools.run_report import best_point

@dataclass
class RunFacts:
    """What the trainer knows at the end that metrics.jsonl does not."""

    step: int
    max_steps: int
    start_step: int  # where this process started (a resume starts later than 0)
    wall_s: float  # this process, start-up included
    train_s: float  # the training loop of this process (evaluation and checkpoints included, start-up not)
    global_batch: int
    run_dir: Path
    checkpoint: Path | None
    wandb_run_id: str
    wandb_dir: str | None  # the offline run dir when W&B logged offline, else the run's local dir or None
    wandb_offline: bool
    preempted_by: str | None
    eval_metrics: dict[str, float]
    eval_urls: str  # data.eval.urls of the run, for the suggested mmpt-eval command


def eval_history(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """eval/<name> -> [(step, value), ...] in file order; a missing file has no history."""
    history: dict[str, list[tuple[int, float]]] = {}
    if not metrics_path.is_file():
        return history
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the rest of the file is still good
        for key, value in record.items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                history.setdefault(key.removeprefix("eval/"), []).append((int(record["step"]), float(value)))
    return history


def best_of(name: str, points: list[tuple[int, float]]) -> tuple[int, float]:
    """(step, value) of the best point: the highest, or the lowest for losses; the earliest on ties (mmpt-report's
    rule, so the summary and the report agree)."""
    return best_point(name, points)


def next_commands(facts: RunFacts) -> list[str]:
    run = shlex.quote(str(facts.run_dir))
    urls = facts.eval_urls or "PATH/eval-{000000..000000}.tar"
    commands = [f"mmpt-eval ckpt={run} {shlex.quote('data.eval.urls=' + urls)}",
                f"mmpt-export {run} --out {shlex.quote(str(facts.run_dir / 'export'))}"]
    if facts.wandb_offline and facts.wandb_dir:
        commands.append(f"wandb sync {shlex.quote(facts.wandb_dir)}")
    if facts.preempted_by:
        commands.insert(0, "# preempted: rerun the same command (same hydra.run.dir) to resume")
    return commands


def build_summary(facts: RunFacts) -> dict[str, Any]:
    """summary.json: the final eval metrics stay top-level keys (scripts read them), the rest is added."""
    history = eval_history(facts.run_dir / "metrics.jsonl")
    steps_here = facts.step - facts.start_step
    return {
        "step": facts.step, "max_steps": facts.max_steps, "run_dir": str(facts.run_dir),
        "checkpoint": str(facts.checkpoint) if facts.checkpoint else None,
        "metrics": str(facts.run_dir / "metrics.jsonl"),
        "wandb_run_id": facts.wandb_run_id, "wandb_dir": facts.wandb_dir, "preempted_by": facts.preempted_by,
        "wall_s": round(facts.wall_s, 3), "train_s": round(facts.train_s, 3), "steps_this_run": steps_here,
        "samples_seen": facts.step * facts.global_batch,
        "samples_per_s": round(steps_here * facts.global_batch / max(facts.train_s, 1e-9), 3),
        "final_eval_step": max(points[-1][0] for points in history.values()) if history else None,
        "best": {name: dict(zip(("step", "value"), best_of(name, points))) for name, points in history.items()},
        "next_commands": next_commands(facts),
        **facts.eval_metrics,
    }


def eval_lines(summary: dict[str, Any], max_groups: int = 3) -> list[str]:
    """One line per eval group (retrieval, retrieval_itm, caption, zeroshot): its headline metrics at the final
    eval, each with its best value and step when the best was earlier."""
    final, best = summary, summary["best"]
    groups: dict[str, list[str]] = {}
    for name in best:
        if ("eval/" + name).endswith(EVAL_SUFFIXES) and name in final:
            group, _, short = name.rpartition("/")
            b = best[name]
            better = f" (best {b['value']:.3f} @ {b['step']})" if b["value"] != final[name] else ""
            groups.setdefault(group or "eval", []).append(f"{short} {final[name]:.3f}{better}")
    return [f"  {group:<14} {' | '.join(parts)}" for group, parts in list(groups.items())[:max_groups]]


def format_summary(summary: dict[str, Any]) -> list[str]:
    """At most 15 lines: what ran, how fast, what it reached, where everything is, what to run next."""
    s = summary
    status = f"preempted by {s['preempted_by']}" if s["preempted_by"] else "finished"
    lines = [f"run {status}: step {s['step']}/{s['max_steps']} | wall {format_duration(s['wall_s'])} (training "
             f"{format_duration(s['train_s'])}, {s['steps_this_run']} steps) | {s['samples_per_s']:.1f} samples/s | "
             f"{s['samples_seen']:,} samples seen"]
    evals = eval_lines(s)
    if evals:
        lines.append(f"final eval (step {s['final_eval_step']}); every metric: summary.json")
        lines += evals
    lines.append("files:")
    lines.append(f"  checkpoint     {s['checkpoint']}")
    lines.append(f"  metrics        {s['metrics']}")
    lines.append(f"  summary        {Path(s['run_dir']) / 'summary.json'}")
    if s["wandb_dir"]:
        lines.append(f"  W&B run        {s['wandb_run_id']} ({s['wandb_dir']})")
    lines.append("next:")
    lines += [f"  {c}" for c in s["next_commands"]]
    return lines[:15]
