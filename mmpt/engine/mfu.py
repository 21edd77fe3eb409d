"""Model FLOP utilisation: achieved training FLOP/s per rank against the device's dense peak.

FLOPs come from the model (`flops_per_sample`, forward + backward, attention included: the PaLM / nanoGPT
convention), so MFU compares architectures and runs, not kernels. Peaks: dense, per GPU (no sparsity).
"""
from __future__ import annotations

import torch

# (device name fragment, precision) -> dense peak TFLOP/s. fp32 reads TF32 where matmuls may use it.
PEAKS: dict[tuple[str, str], float] = {
    ("H100 PCIe", "bf16"): 756.0, ("H100 PCIe", "tf32"): 378.0, ("H100 PCIe", "fp32"): 51.0,
    ("H100", "bf16"): 989.0, ("H100", "tf32"): 495.0, ("H100", "fp32"): 67.0,
    ("H200", "bf16"): 989.0, ("H200", "tf32"): 495.0, ("H200", "fp32"): 67.0,
    ("A100", "bf16"): 312.0, ("A100", "tf32"): 156.0, ("A100", "fp32"): 19.5,
}  # fmt: skip


def detected_peak_tflops(precision: str) -> float | None:
    """The dense peak of this process's GPU at `precision` (fp16 counts as bf16); None on CPU or unknown GPUs."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    kind = "bf16" if precision in ("bf16", "fp16") else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for (fragment, prec), peak in PEAKS.items():  # "H100 PCIe" is listed before the "H100" it contains
        if fragment in name and prec == kind:
            return peak
    return None


def peak_tflops(configured: float | None, precision: str) -> float | None:
    """`trainer.peak_tflops` when set, else the detected peak (None: MFU is not logged)."""
    return configured if configured is not None else detected_peak_tflops(precision)
