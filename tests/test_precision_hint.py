"""The start-up hint that bf16 is faster on this CPU: given only for fp32 runs on a CPU listing `amx_bf16`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpt.engine.precision_hint import bf16_hint, cpu_has_amx_bf16

AMX = "processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nflags\t\t: fpu\n"
NO_AMX = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16\nmodel name\t: amx_bf16 in a name is not a flag\n"


@pytest.fixture
def cpuinfo(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path
    return write


def test_amx_flag_is_read_from_the_flags_line_only(cpuinfo, tmp_path: Path) -> None:
    assert cpu_has_amx_bf16(cpuinfo(AMX))
    assert not cpu_has_amx_bf16(cpuinfo(NO_AMX))  # avx512_bf16 is not AMX; a model name is not a flag
    assert not cpu_has_amx_bf16(tmp_path / "absent")  # no /proc (macOS): no hint


@pytest.mark.parametrize(("device", "precision", "text", "hinted"), [
    ("cpu", "fp32", AMX, True),
    ("cpu", "bf16", AMX, False),  # already bf16
    ("cpu", "fp32", NO_AMX, False),  # not measured there
    ("cuda", "fp32", AMX, False),  # GPUs have their own story (tf32/bf16), not this one
])
def test_hint_only_for_fp32_on_an_amx_cpu(cpuinfo, device: str, precision: str, text: str, hinted: bool) -> None:
    hint = bf16_hint(torch.device(device), precision, cpuinfo(text))
    assert (hint is not None) == hinted
    if hinted:
        assert "trainer.precision=bf16" in hint and "bf16 on CPU" in hint
