"""The console's progress line: `step 300/2000 (15%) | elapsed 2m10s | eta 12m40s | <console keys>`.

metrics.jsonl and W&B keep every metric; the console shows only `trainer.console_keys` so a line stays
readable. The ETA comes from a moving average of seconds per step between log lines (evaluation and
checkpoint time included, so it is what the user will actually wait)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

DEFAULT_TAIL = ("lr", "samples_per_s", "tflops", "mfu", "data_wait", "skipped", "skipped_steps")
EVAL_SUFFIXES = ("_r1", "/mean", "/bleu4", "/cider", "zeroshot/top1")  # headline eval metrics on the console


def default_console_keys(objectives: Sequence[str]) -> list[str]:
    """Total loss, each objective's loss, lr, samples/s, TFLOP/s, MFU (when known), data-wait, skipped counts."""
    return ["loss", *objectives, *DEFAULT_TAIL]


def format_duration(seconds: float) -> str:
    """1h02m, 2m10s, 45s: the two most significant units."""
    s = max(0, int(round(seconds)))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressClock:
    """Elapsed time since the run (or this resume) started and an ETA from a moving average of s/step."""

    def __init__(self, start_step: int, smoothing: float = 0.3, now: float | None = None):
        self.started = time.perf_counter() if now is None else now
        self.last_time, self.last_step = self.started, start_step
        self.smoothing = smoothing
        self.seconds_per_step: float | None = None

    def update(self, step: int, now: float | None = None) -> tuple[float, float | None]:
        """(elapsed seconds, eta seconds or None before the first measured interval) at `step`."""
        now = time.perf_counter() if now is None else now
        if step > self.last_step:
            rate = (now - self.last_time) / (step - self.last_step)
            a = self.smoothing
            self.seconds_per_step = rate if self.seconds_per_step is None else a * rate + (1 - a) * self.seconds_per_step
            self.last_time, self.last_step = now, step
        return now - self.started, self.seconds_per_step

    def eta(self, step: int, max_steps: int) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * max(0, max_steps - step)


def format_value(key: str, value: float) -> str | None:
    """One console field; None hides it (a zero skip count)."""
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "samples_per_s":
        return f"{value:.1f} samples/s"
    if key == "tflops":
        return f"{value:.3g} TFLOP/s"
    if key == "mfu":
        return f"MFU {100 * value:.1f}%"
    if key == "data_wait":
        return f"data-wait {100 * value:.0f}%"
    if key in ("skipped", "skipped_steps"):
        return f"{key.replace('_', ' ')} {int(value)}" if value else None
    return f"{key} {value:.4f}"


def format_progress(record: dict[str, Any], max_steps: int, console_keys: Sequence[str],
                    elapsed: float | None = None, eta: float | None = None) -> str:
    """A train record as the progress line; an eval record as `step N/M (p%) | eval <headline metric> v | ...`."""
    step = record["step"]
    parts = [f"step {step}/{max_steps} ({100 * step / max(1, max_steps):.0f}%)"]
    if elapsed is not None:
        parts.append(f"elapsed {format_duration(elapsed)}")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    for key in console_keys:
        if (value := record.get(f"train/{key}")) is not None and (text := format_value(key, value)) is not None:
            parts.append(text)
    evals = [f"{k.removeprefix('eval/')} {v:.3f}" for k, v in record.items()  # the full set: metrics.jsonl
             if k.startswith("eval/") and k.endswith(EVAL_SUFFIXES)]
    if evals:
        parts.append("eval " + " | ".join(evals))
    return " | ".join(parts)
