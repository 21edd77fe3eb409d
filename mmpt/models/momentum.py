"""Momentum (EMA) teacher: frozen copies of named student submodules, updated in place after each step.

Lifecycle: build the student, wrap the submodules to copy in a `MomentumTeacher`, make it an attribute
of the model (so its weights are in the model's state dict and in every DeepSpeed checkpoint), build the
optimizer from `requires_grad` parameters (the teacher's are frozen, so no optimizer ever sees them),
then `deepspeed.initialize`; the trainer calls `update()` after `engine.step()`, outside forward.

Why not inside forward: forward may run several times per optimizer step (gradient accumulation,
activation recomputation) and the EMA must advance once per step, on the weights the optimizer wrote.

Precision: DeepSpeed bf16/fp16 casts every parameter, the teacher's too. A bf16 EMA with m = 0.995 stalls:
a step 0.005 * |student - teacher| below half an ulp (0.2-0.4% of the teacher) is rounded away, so the
teacher stops once it is within ~40-80% of the student. Low-precision teachers therefore keep their EMA
in an fp32 shadow and are rounded from it after each update. The shadow is not saved: after a
checkpoint load it is rebuilt from the saved (rounded) teacher, a one-off half-ulp error that does not
accumulate.

ZeRO-3 partitions parameters (each rank holds a shard, `p.data` is empty): `assert_supported` refuses it.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class MomentumConfig:
    """`model.momentum` of any architecture that supports distillation from an EMA teacher."""

    enabled: bool = False
    decay: float = 0.995  # EMA: teacher <- decay * teacher + (1 - decay) * student
    queue_size: int = 65536  # must be a multiple of the global batch (checked before launch)
    alpha: float = 0.4  # weight of the teacher's soft targets, reached after alpha_warmup_steps
    alpha_warmup_steps: int = 1000


def assert_supported(zero_stage: int) -> None:
    """Raise for ZeRO stage 3, whose partitioned parameters this EMA would silently read as empty shards."""
    if zero_stage >= 3:
        raise ValueError(
            f"momentum teachers support ZeRO stages 0-2, got stage {zero_stage}: stage 3 partitions the "
            "parameters, so the in-place EMA would need GatheredParameters around every update. Use "
            "deepspeed=zero2 (activations, not parameters, dominate memory for base-size models)."
        )


def _drop_shadow(module: "MomentumTeacher", _incompatible_keys: object) -> None:
    module._shadow = None


class MomentumTeacher(nn.Module):
    """Frozen, eval-mode deep copies of `students`, with `update()` = in-place EMA toward the students.

    Index it by name (`teacher["vision"]`) to run a copy under torch.no_grad(). The students are held
    by plain reference (not registered), so their weights appear once in the state dict, under the
    model's own names, and the teacher adds `<attr>.teachers.<name>.*`.
    """

    def __init__(self, students: Mapping[str, nn.Module], momentum: float = 0.995) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not students:
            raise ValueError("MomentumTeacher needs at least one student module")
        self.momentum = momentum
        self.teachers = nn.ModuleDict({name: copy.deepcopy(module) for name, module in students.items()})
        for param in self.teachers.parameters():
            param.requires_grad_(False)
            param.grad = None
        self.teachers.eval()
        # A plain dict (not ModuleDict): the students stay owned by the model, not registered twice.
        self._students: dict[str, nn.Module] = dict(students)
        self._shadow: list[torch.Tensor] | None = None  # fp32 EMA state for low-precision teachers
        self.register_load_state_dict_post_hook(_drop_shadow)  # loaded weights win over a stale shadow

    def __getitem__(self, name: str) -> nn.Module:
        return self.teachers[name]

    def train(self, mode: bool = True) -> "MomentumTeacher":
        """Teachers stay in eval mode (no dropout in the targets) whatever the model's mode."""
        super().train(mode)
        self.teachers.eval()
        return self

    def forward(self, *args: object, **kwargs: object) -> None:
        raise TypeError("MomentumTeacher is a container: call teacher[name](...) for the copy you need")

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher, student) parameters matched by name; re-read every call so a replaced
        Parameter (load_state_dict(assign=True), ZeRO re-wrapping) is never updated through a stale handle."""
        for name, teacher in self.teachers.items():
            student = dict(self._students[name].named_parameters())
            for pname, tparam in teacher.named_parameters():
                sparam = student.get(pname)
                if sparam is None or sparam.shape != tparam.shape:
                    raise RuntimeError(f"student {name!r} no longer matches its teacher at {pname!r}")
                if hasattr(sparam, "ds_id") or hasattr(tparam, "ds_id"):  # ZeRO-3 tags its partitioned params
                    assert_supported(3)
                yield tparam, sparam

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """teacher = m * teacher + (1 - m) * student, in place (one foreach lerp); buffers are copied.

        Call after the optimizer step on every rank (ranks hold identical replicas under ZeRO 0-2).
        """
        m = self.momentum if momentum is None else momentum
        pairs = list(self._pairs())
        teacher = [t for t, _ in pairs]
        student = [s.detach() for _, s in pairs]
        if not pairs:
            pass  # parameter-free students: only buffers to follow
        elif any(t.dtype in LOW_PRECISION for t in teacher):
            if self._shadow is None or self._shadow[0].device != teacher[0].device:
                self._shadow = [t.float() for t in teacher]  # fp32 teachers alias themselves: no copy
            torch._foreach_lerp_(self._shadow, [s.float() for s in student], 1.0 - m)
            torch._foreach_copy_(teacher, self._shadow)
        else:
            torch._foreach_lerp_(teacher, [s.to(t.dtype) for t, s in zip(teacher, student)], 1.0 - m)
        for name, teacher_module in self.teachers.items():
            student_buffers = dict(self._students[name].named_buffers())
            for bname, tbuf in teacher_module.named_buffers():
                if bname in student_buffers:
                    tbuf.copy_(student_buffers[bname])
