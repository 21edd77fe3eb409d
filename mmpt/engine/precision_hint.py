"""One start-up line for fp32 runs on a CPU whose AMX units make bf16 the faster precision.

Measured on such a CPU (docs/PERFORMANCE.md, "bf16 on CPU"): `clip/tiny` and `albef/tiny` train 1.28x and 1.35x
faster in bf16, width-128 models 1.64-1.81x, with the same R@1 within seed noise. fp32 stays the default, so the
run only says so; nothing is switched behind the user's back.
"""
from __future__ import annotations

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_has_amx_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the kernel lists the `amx_bf16` flag (Intel Xeon 4th gen / Sapphire Rapids and later).
    Elsewhere (no /proc, other vendors) False: the hint is only given where it was measured."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())


def bf16_hint(device: torch.device, precision: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The line to log, or None: only for an fp32 run on a CPU with AMX."""
    if device.type != "cpu" or precision != "fp32" or not cpu_has_amx_bf16(cpuinfo):
        return None
    return ("this CPU has AMX: trainer.precision=bf16 trained 1.3-1.8x faster than fp32 on such a CPU, same R@1 "
            "within seed noise (docs/PERFORMANCE.md, 'bf16 on CPU')")
