"""ALBEF's configuration: what ALBEF adds to the shared pieces, its checks, and its named presets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mmpt.models.config_parts import DualTowerConfig, FusionObjectivesConfig, Launch
from mmpt.models.momentum import MomentumConfig


@dataclass
class ALBEFConfig(DualTowerConfig, FusionObjectivesConfig):
    """`text.layers` are text-only (ITC reads their [CLS]); `fusion_layers` add cross-attention to the image
    tokens (ITM, MLM) and exist only when itm or mlm is an objective. ITM samples its hard negatives by ITC
    similarity, so itc is always trained. momentum: distillation from an EMA teacher with feature queues.
    """

    supported_objectives: ClassVar[tuple[str, ...]] = ("itc", "itm", "mlm")
    default_objectives: ClassVar[tuple[str, ...]] = ("itc", "itm", "mlm")
    no_siglip_because: ClassVar[str] = ("ITM mines its hard negatives from the softmax over ITC similarities and the "
                                        "momentum distillation targets are softmax distributions, both defined for itc")

    arch_name: ClassVar[str] = "albef"
    fusion_layers: int = 1
    # False: ITM and MLM train the fusion layers and heads only; the unimodal encoders learn from ITC alone
    fusion_grads_to_encoders: bool = True
    momentum: MomentumConfig = field(default_factory=MomentumConfig)

    def fuses(self) -> bool:
        """Whether any objective needs the fusion layers."""
        return self.uses("itm") or self.uses("mlm")

    def block_stacks(self) -> dict[str, int]:
        return {**super().block_stacks(), **({"fusion": self.fusion_layers} if self.fuses() else {})}

    def problems(self) -> list[str]:
        p = super().problems() + self.fusion_problems()
        if "itc" not in self.objectives:
            p.append(f"objectives={self.objectives} must include itc (ALBEF aligns before fusing; ITM mines its "
                     "hard negatives by ITC similarity)")
        if self.fusion_layers < (1 if self.fuses() else 0):
            p.append(f"fusion_layers={self.fusion_layers} must be >= 1 for itm/mlm (>= 0 without them)")
        m = self.momentum
        if not 0.0 <= m.decay <= 1.0:
            p.append(f"momentum.decay={m.decay} must be in [0, 1]")
        if m.queue_size <= 0:
            p.append(f"momentum.queue_size={m.queue_size} must be positive (a multiple of the global batch)")
        if not 0.0 <= m.alpha <= 1.0 or m.alpha_warmup_steps < 0:
            p.append(f"need momentum.alpha in [0, 1] and alpha_warmup_steps >= 0, got {m.alpha}, {m.alpha_warmup_steps}")
        return p

    def grad_cache_problems(self, steps: int) -> list[str]:
        p = super().grad_cache_problems(steps)
        if self.momentum.enabled:
            p.append(f"trainer.contrastive_accum_steps={steps} cannot cache the momentum teacher's distillation "
                     "(its queue enqueues every forward); set model.momentum.enabled=false")
        return p

    def launch_problems(self, launch: Launch) -> list[str]:
        p = super().launch_problems(launch)
        if self.momentum.enabled:
            from mmpt.models.momentum import assert_supported
            from mmpt.objectives.queue import validate_queue_size

            try:
                assert_supported(launch.zero_stage)
                validate_queue_size(self.momentum.queue_size, launch.micro_batch * launch.world_size)
            except ValueError as exc:
                p.append(f"momentum: {exc} (or model.momentum.enabled=false)")
        return p


_ALBEF_ITC = {"min_temperature": 0.001, "max_temperature": 0.5}  # ALBEF's clamp: logit scale in [2, 1000]

PRESETS: dict[str, dict[str, Any]] = {
    # 64 px / patch 8 ViT 64 x 2, text 64 wide: 2 text + 2 fusion layers (1 + 1: ITM never leaves its prior),
    # 64-d ITC from temperature 0.03, identical captions as ITC positives, ITM negatives hardening over 1,000 steps
    # (from fully hard ones ITM sits at its prior), ITM and MLM weighted 0.25; no momentum teacher (distilling
    # from a near-random one costs recall at this size). Measured: docs/RESULTS.md, issues 3 and 11.
    "tiny": {
        "text": {"layers": 2}, "fusion_layers": 2,
        "contrastive": {**_ALBEF_ITC, "temperature_init": 0.03, "duplicate_positives": True},
        "itm": {"hardness_warmup_steps": 1000}, "loss_weights": {"itm": 0.25, "mlm": 0.25},
        "momentum": {"decay": 0.99, "queue_size": 1024, "alpha_warmup_steps": 200}, "init_std": 0.05,
    },
    # ALBEF-base: ViT-B/16 at 256 px, BERT-base split 6 text + 6 fusion layers (post-LN, so BERT weights load
    # with model.init.text), 256-d ITC, queue 65536; alpha ramps over ~one epoch of ALBEF-4M at batch 512
    "base": {
        "vision": {"image_size": 256, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"width": 768, "layers": 6, "heads": 12, "vocab_size": 30522, "max_text_len": 30,
                 "norm_first": False, "norm_eps": 1e-12},
        "fusion_layers": 6,
        "contrastive": {**_ALBEF_ITC, "embed_dim": 256},
        "momentum": {"enabled": True, "decay": 0.995, "queue_size": 65536, "alpha": 0.4,
                     "alpha_warmup_steps": 10000},
    },
}  # fmt: skip
