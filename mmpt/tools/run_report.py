"""Runs as `mmpt-report` sees them: curves from <run dir>/metrics.jsonl, and which runs a directory holds.

A directory with a metrics.jsonl is one run. Any other directory is a group (a Hydra multirun dir such as
multirun/2026-01-01_12-00-00 with jobs 0/, 1/, ..., or a folder of sweep runs): every run below it is a job,
named by the group and its path. A job that Hydra launched but that never logged (it failed early) is a row
saying so. Runs are labelled with their overrides (<run>/.hydra/overrides.yaml) that differ between the runs of
the report (`mark_swept`).
No matplotlib here: the table works without it.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

Curve = list[tuple[int, float]]  # (step, value), steps ascending, one value per step


class ReportError(ValueError):
    """A problem with the report's input; the CLI prints it as one `error: ...` line (exit 2)."""


@dataclass
class Run:
    name: str
    path: Path
    curves: dict[str, Curve]
    overrides: list[str] = field(default_factory=list)  # the run's Hydra overrides (all of them)
    swept: list[str] = field(default_factory=list)  # those that differ between the runs of the report

    @property
    def last_step(self) -> int:
        return max((curve[-1][0] for curve in self.curves.values() if curve), default=0)


def read_curves(path: Path) -> dict[str, Curve]:
    """Every numeric key of a metrics.jsonl as a curve. A resumed run logs some steps twice: the later line
    wins, as it is the run that went on. Non-numeric values (tables, strings, NaN) are left out."""
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}:{number} is not a metrics record ({exc}); is it an mmpt metrics.jsonl?") from None
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def read_overrides(run_dir: Path) -> list[str]:
    """The task overrides Hydra saved for this run (empty when it was not launched by Hydra)."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = yaml.safe_load(path.read_text()) or []
    return [str(x) for x in loaded] if isinstance(loaded, list) else []


def _job_sort_key(path: Path) -> tuple:
    """Hydra job dirs 0, 1, ..., 10 in numeric order, other names after them alphabetically."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def find_runs(directory: Path) -> list[Run]:
    """The run in `directory`, or every run below it (a group): see the module docstring."""
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory; give a run dir (with metrics.jsonl) or a multirun dir")
    if (directory / "metrics.jsonl").is_file():
        return [Run(directory.name, directory, read_curves(directory / "metrics.jsonl"), read_overrides(directory))]
    logged = {p.parent for p in directory.rglob("metrics.jsonl")}
    if not logged:
        raise ReportError(f"no metrics.jsonl in {directory} or below it; is it a run dir or a multirun dir of "
                          "mmpt-train runs (they write <run dir>/metrics.jsonl at the first log step)?")
    launched = {p.parent.parent for p in directory.rglob(".hydra/overrides.yaml")} - {directory}  # failed jobs too
    jobs = sorted(logged | launched, key=lambda p: _job_sort_key(p.relative_to(directory)))
    return [Run(f"{directory.name}/{job.relative_to(directory)}", job,
                read_curves(job / "metrics.jsonl") if job in logged else {}, read_overrides(job)) for job in jobs]


def mark_swept(runs: list[Run]) -> list[str]:
    """Set each run's `swept` overrides (those not shared by all runs of the report); returns the shared ones."""
    if len(runs) < 2:
        return []
    common = set.intersection(*(set(r.overrides) for r in runs))
    for run in runs:
        run.swept = [o for o in run.overrides if o not in common]
    return [o for o in runs[0].overrides if o in common]


def label(run: Run) -> str:
    """The legend name: the run's name and the overrides that set it apart from the other runs."""
    return f"{run.name} {' '.join(run.swept)}".strip()


def lower_is_better(key: str) -> bool:
    """Losses and perplexities go down; retrieval recall, accuracy, BLEU, CIDEr go up."""
    name = key.lower()
    return "loss" in name or "perplexity" in name or name.endswith("/ppl")


def best_point(key: str, curve: Curve) -> tuple[int, float]:
    """(step, value) of the best value; the earliest step on ties."""
    sign = 1.0 if lower_is_better(key) else -1.0
    return min(curve, key=lambda point: (sign * point[1], point[0]))


def _fmt(value: float) -> str:
    return f"{value:.4g}"


HEADLINE_SUFFIXES = ("mean", "mean_caption", "_r1", "top1", "bleu4", "cider")  # the eval metrics of the main table


def is_count(key: str) -> bool:
    """Bookkeeping such as eval/retrieval/num_images or the skipped-sample counts: logged, not a metric to plot
    or rank."""
    return key.rsplit("/", 1)[-1].startswith(("num_", "skipped"))


def eval_keys(runs: list[Run]) -> list[str]:
    return sorted({k for r in runs for k in r.curves if k.startswith("eval/") and not is_count(k)})


def _final_and_best(key: str, curve: Curve | None) -> str:
    if not curve:
        return "-"
    step, best = best_point(key, curve)
    return f"{_fmt(curve[-1][1])} ({_fmt(best)} @ {step})"


def summary_table(runs: list[Run]) -> str:
    """Markdown. First one row per run: last step, final train loss, median samples/s and the headline eval
    metrics (R@1, means, top-1, BLEU-4, CIDEr) as "final (best @ step)"; then every eval metric, one row each
    per run, so the page stays readable however many metrics a model logs."""
    keys = eval_keys(runs)
    headline = [k for k in keys if k.endswith(HEADLINE_SUFFIXES)] or keys
    head = ["run", "overrides", "steps", "final train/loss", "samples/s (median)"]
    head += [f"{k.removeprefix('eval/')} final (best @ step)" for k in headline]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        loss = run.curves.get("train/loss")
        speed = [v for _, v in run.curves.get("train/samples_per_s", [])]
        steps = str(run.last_step) if run.curves else "no metrics.jsonl (failed before its first log?)"
        shown = run.swept if len(runs) > 1 else run.overrides  # several runs: what sets each apart (mark_swept)
        cells = [run.name, " ".join(f"`{o}`" for o in shown) or "-", steps,
                 _fmt(loss[-1][1]) if loss else "-", _fmt(statistics.median(speed)) if speed else "-"]
        cells += [_final_and_best(k, run.curves.get(k)) for k in headline]
        rows.append("| " + " | ".join(cells) + " |")
    if keys:
        rows += ["", "| eval metric | run | final | best | best step |", "|---|---|---|---|---|"]
        for key in keys:
            for run in runs:
                curve = run.curves.get(key)
                if curve:
                    step, best = best_point(key, curve)
                    rows.append(f"| {key} | {run.name} | {_fmt(curve[-1][1])} | {_fmt(best)} | {step} |")
    return "\n".join(rows) + "\n"


PLOT_SKIP = {"train/skipped"}  # a count of dropped samples: in the jsonl, not worth a figure


def plotted_keys(runs: list[Run]) -> list[str]:
    """Train keys (losses, lr, throughput, data-wait, MFU, grad norms) first, then eval metrics, each sorted."""
    keys = {k for r in runs for k, c in r.curves.items() if c and k not in PLOT_SKIP and not is_count(k)}
    return sorted(keys, key=lambda k: (not k.startswith("train/"), k))
