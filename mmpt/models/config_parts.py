"""The pieces every architecture config is composed from: one dataclass per idea, each field declared once.

An architecture config (`mmpt/models/*_config.py`) inherits `ModelConfigBase` (arch, preset, objectives,
special tokens, contrastive head, init / freeze / train) plus the towers it has (`DualTowerConfig`: a ViT and
a text tower; `MultiwayModelConfig`: one Multiway backbone) and adds only what is its own. Checks that need
only the config live next to the fields (`problems()`), checks that need the run (world size, ZeRO stage,
tokenizer, data geometry) in `launch_problems`, which the engine calls without knowing the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar, Optional, Protocol, Union

from mmpt.models.pretrained import InitConfig
from mmpt.models.protocol import CONTRASTIVE_OBJECTIVES
from mmpt.modules.block import DEFAULT_INIT_STD
from mmpt.visual_tokenizer import KINDS as VISUAL_TOKENIZER_KINDS
from mmpt.visual_tokenizer import VisualTokenizerConfig

# Ids that `mmpt-data tokenizer` writes ([PAD] [UNK] [CLS] [SEP] [MASK]): what a model built in code without a
# tokenizer uses for ids left unset. Training always fills unset ids from the configured tokenizer.
MMPT_TOKENIZER_IDS = {"pad": 0, "bos": 2, "eos": 3, "mask": 4}
# The contrastive objectives: one loss on the dual-encoder embeddings, at most one of them per model.
CONTRASTIVE_OBJECTIVES = ("itc", "siglip")


@dataclass
class PatchGrid:
    """How images become patch tokens."""

    image_size: int = 64
    patch_size: int = 8


@dataclass
class TextInput:
    """How captions become token ids: embedding rows and positions."""

    vocab_size: int = 1000
    max_text_len: int = 32


@dataclass
class TowerConfig:
    """Geometry of one transformer stack."""

    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    norm_eps: float = 1e-5


@dataclass
class VisionConfig(TowerConfig, PatchGrid):
    """`model.vision`: the ViT of a two-tower model."""

    pre_norm: bool = False  # a LayerNorm on the embedded patches before the blocks (OpenAI CLIP's ln_pre)
    patch_bias: bool = True  # False: a bias-free patch convolution (OpenAI CLIP)


@dataclass
class TextConfig(TowerConfig, TextInput):
    """`model.text`: the text tower (ALBEF: its text-only layers; CoCa: the unimodal decoder half)."""

    norm_first: bool = True  # False: BERT's post-LN layout (loading BERT weights into ALBEF needs it)


@dataclass
class MultiwayConfig(TowerConfig, PatchGrid, TextInput):
    """`model.multiway`: the one Multiway (MoME) backbone of VLMo and BEiT-3; presets in multiway_presets.py."""

    vl_layers: int = 1  # top blocks with a vision-language FFN
    ffn_dim: Optional[int] = None  # None = width x mlp_ratio
    type_embed: bool = True  # modality-type embedding (VLMo)
    text_embed_norm: bool = False  # BERT's LayerNorm on the text embedding sum (VLMo base/large)
    layer_scale: Optional[float] = None  # per-channel residual scales (VLMo base/large: 0.1)
    decoupled_attention: bool = False  # per-modality attention (released BEiT-3); False = shared (VLMo)
    sub_norm: bool = False  # torchscale Sub-LN (needs decoupled_attention)


@dataclass
class ContrastiveConfig:
    """`model.contrastive`: the contrastive head (objective `itc` or `siglip`). ITC: temperature learnable from
    temperature_init and clamped to [min, max]_temperature (logit scale 1/T). SigLIP: scale t = exp(t') from
    siglip_scale_init and bias from siglip_bias_init (the paper's 10 and -10), unclamped.
    learnable_temperature=false keeps the temperature / scale fixed at init. duplicate_positives: pairs sharing
    an image id or an identical caption are positives, not negatives (SigLIP: label +1)."""

    embed_dim: int = 64
    temperature_init: float = 0.07
    min_temperature: float = 0.01  # logit scale <= 100 (CLIP's clamp)
    max_temperature: float = 1.0
    learnable_temperature: bool = True
    duplicate_positives: bool = False
    siglip_scale_init: float = 10.0
    siglip_bias_init: float = -10.0


@dataclass
class SpecialTokens:
    """`model.tokens`: ids the model writes or reads itself (MLM masks, caption BOS/EOS, padding).

    bos/eos are [CLS]/[SEP] for BERT-style tokenizers. null = the configured tokenizer's id (filled in before
    launch); a set id that disagrees with the tokenizer is refused."""

    pad: Optional[int] = None
    bos: Optional[int] = None
    eos: Optional[int] = None
    mask: Optional[int] = None

    def id(self, name: str) -> int:
        """The id, or mmpt's tokenizer layout where unset (models built in code without a tokenizer)."""
        value = getattr(self, name)
        return MMPT_TOKENIZER_IDS[name] if value is None else int(value)

    def never_masked(self) -> tuple[int, int, int]:
        """pad, bos, eos: the ids MLM never masks."""
        return self.id("pad"), self.id("bos"), self.id("eos")


@dataclass
class ITMConfig:
    """`model.itm`: hard negatives of image-text matching."""

    hardness_warmup_steps: int = 0  # negatives sharpen from uniform to softmax(sim) over these steps
    global_negatives: bool = True  # False: from the local batch only (no gather), as official ALBEF


@dataclass
class MLMConfig:
    """`model.mlm`: BERT masking of captions for masked language modeling."""

    mask_prob: float = 0.15


class TokenizerIds(Protocol):
    """What `mmpt.data.tokenizer.TextTokenizer` says about its special tokens."""

    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: Optional[int]


@dataclass
class Launch:
    """What `launch_problems` may check a model config against: the run, not the model."""

    world_size: int
    micro_batch: int
    zero_stage: int
    image_size: int  # data.image_size
    image_mask_patch: Optional[int] = None  # data.image_mask.patch_size when masks are made
    tokenizer: Optional[TokenizerIds] = None
    mean: Optional[list[float]] = None  # data.mean / data.std: how images are normalised
    std: Optional[list[float]] = None
    contrastive_accum_steps: int = 1  # trainer.contrastive_accum_steps (GradCache)
    max_text_len: Optional[int] = None  # data.max_text_len: the longest caption the model is fed
    training: bool = True  # False: an eval / load of the config, where training-only needs do not apply


@dataclass
class ModelConfigBase:
    """Keys every architecture shares. Subclasses set the class attributes `arch_name` (their registered name,
    the default of `arch`) and `supported_objectives` / `default_objectives`.

    preset: a named preset of the arch (`mmpt/models/presets.py`) merged under the YAML, so a preset has one
    source. objectives: what forward computes; empty = the arch's default set. freeze / train: fnmatch
    patterns over `named_parameters()` names (mmpt/models/freezing.py).
    """

    arch_name: ClassVar[str] = ""  # the registered name; `arch` defaults to it
    supported_objectives: ClassVar[tuple[str, ...]] = ()
    default_objectives: ClassVar[tuple[str, ...]] = ()
    no_siglip_because: ClassVar[str] = ""  # why an arch without siglip refuses it (the error says so)

    arch: str = ""
    preset: Optional[str] = None
    objectives: list[str] = field(default_factory=list)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    init: InitConfig = field(default_factory=InitConfig)  # starting weights from local files / earlier runs
    freeze: list[str] = field(default_factory=list)  # e.g. ["visual.*", "text.embed.*"]
    train: list[str] = field(default_factory=list)  # empty = everything not frozen; e.g. ["*.mlp_text.*"]
    # a preset's objective weights over the arch's defaults (`default_loss_weights`); `loss.weights` overrides
    # both. Weights of objectives that are not configured are ignored (a preset's defaults, not a user's choice).
    loss_weights: dict[str, float] = field(default_factory=dict)
    # FLIP: share of image patch tokens dropped per sample in training (after position embeddings, [CLS] kept;
    # mmpt/modules/patch_dropout.py). Every arch has a ViT, so it lives here; archs whose losses need every
    # patch refuse p > 0 (`patch_dropout_problems`).
    patch_dropout: float = 0.0
    # trunc-normal std of every Linear / Conv / Embedding weight and position / [CLS] / [MASK] token at init
    # (mmpt/modules/block.py). 0.02 is the value of ViT, BERT and CLIP at widths 512-1024; the 64-wide tiny presets
    # start from 0.05, which nearly doubles tiny CLIP's recall on unseen data (docs/RESULTS.md, issue 11)
    init_std: float = DEFAULT_INIT_STD
    # recompute block activations in backward instead of keeping them (mmpt/modules/checkpointing.py):
    # true = every block of every tower, an int n = the first n blocks of each block stack (fewer where a
    # stack is shallower), false = none. Same results, about one extra forward per step, less memory.
    activation_checkpointing: Union[bool, int] = False

    def __post_init__(self) -> None:
        self.arch = self.arch or self.arch_name
        if self.arch != self.arch_name:
            raise ValueError(f"{type(self).__name__} is the config of arch {self.arch_name!r}, got arch={self.arch!r}")
        _coerce_nested(self)
        self.objectives = list(self.objectives) or list(self.default_objectives)
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid {self.arch} config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Consistency of the config alone; subclasses extend the list."""
        p: list[str] = []
        known = self.supported_objectives
        unsupported = set(self.objectives) - set(known)
        if "siglip" in unsupported and self.no_siglip_because:
            p.append(f"objective siglip is not available for {self.arch_name}: {self.no_siglip_because}; use itc")
            unsupported.discard("siglip")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives) or unsupported:
            p.append(f"objectives={self.objectives} must be distinct names from {list(known)}, at least one")
        unknown = sorted(set(self.loss_weights) - set(known))
        if unknown:
            p.append(f"loss_weights {unknown} are not objectives of {self.arch_name} ({list(known)})")
        if set(CONTRASTIVE_OBJECTIVES) <= set(self.objectives):
            p.append(f"objectives={self.objectives} list both itc and siglip: they are two losses on the same "
                     "embeddings; keep one (model.objectives=[siglip,...] or [itc,...])")
        c = self.contrastive
        if c.siglip_scale_init <= 0:
            p.append(f"contrastive.siglip_scale_init={c.siglip_scale_init} must be > 0 (it is exp(t'))")
        if not 0 < c.min_temperature <= c.temperature_init <= c.max_temperature:
            p.append("need 0 < contrastive.min_temperature <= temperature_init <= max_temperature, got "
                     f"{c.min_temperature}, {c.temperature_init}, {c.max_temperature}")
        if c.embed_dim < 1:
            p.append(f"contrastive.embed_dim={c.embed_dim} must be >= 1")
        ids = {k: self.tokens.id(k) for k in vars(self.tokens)}  # unset: mmpt's layout until the tokenizer fills them
        if len(set(ids.values())) != len(ids):
            p.append(f"tokens {ids} must be distinct")
        vocab = self.vocab_size()
        if vocab >= 1:  # a vocabulary < 1 is named by text_input_problems; every id would be reported too
            p += [f"tokens.{k}={v} must be in [0, vocab_size={vocab})" for k, v in ids.items() if not 0 <= v < vocab]
        if not 0.0 <= self.patch_dropout < 1.0:
            p.append(f"patch_dropout={self.patch_dropout} must be in [0, 1) (the share of patch tokens dropped)")
        if not 0.0 < self.init_std <= 1.0:
            p.append(f"init_std={self.init_std} must be in (0, 1] (the std of initial weights; 0.02 is ViT/BERT's)")
        return p + self.checkpointing_problems()

    def checkpointing_problems(self) -> list[str]:
        """`activation_checkpointing` is a bool or a block count no deeper than the deepest block stack."""
        ac, stacks = self.activation_checkpointing, self.block_stacks()
        if isinstance(ac, bool):
            return []
        most = max(stacks.values(), default=0)
        if not isinstance(ac, int) or not 0 <= ac <= most:
            towers = ", ".join(f"{name} {n}" for name, n in stacks.items())
            return [f"activation_checkpointing={ac!r} must be true, false or a number of blocks per tower in "
                    f"[0, {most}] (blocks per tower: {towers}); true checkpoints every block"]
        return []

    def block_stacks(self) -> dict[str, int]:
        """Block stacks (towers) by name -> number of blocks (subclasses say which they build)."""
        raise NotImplementedError

    def patch_dropout_problems(self, needs_every_patch: tuple[str, ...]) -> list[str]:
        """Refuse patch dropout when an objective in `needs_every_patch` (one whose targets are masked patches,
        which dropping would remove from the encoder) is configured."""
        clash = [name for name in needs_every_patch if self.uses(name)]
        if self.patch_dropout > 0 and clash:
            return [f"patch_dropout={self.patch_dropout} drops image patches but objectives {clash} predict masked "
                    f"patches and need every one; set model.patch_dropout=0 or remove {clash} from model.objectives"]
        return []

    def vocab_size(self) -> int:
        """Embedding rows of the text side (subclasses say which tower holds them)."""
        raise NotImplementedError

    def patch_grid(self) -> PatchGrid:
        """The image geometry (subclasses say which tower holds it)."""
        raise NotImplementedError

    def text_input(self) -> TextInput:
        """The text embedding geometry (subclasses say which tower holds it)."""
        raise NotImplementedError

    def uses(self, objective: str) -> bool:
        return objective in self.objectives

    def contrastive_objective(self) -> Optional[str]:
        """The configured contrastive objective (itc or siglip), None when neither is listed."""
        return next((name for name in CONTRASTIVE_OBJECTIVES if name in self.objectives), None)

    def launch_problems(self, launch: Launch) -> list[str]:
        """Checks against the run; the engine raises one ConfigError listing them. Subclasses extend it."""
        p: list[str] = []
        grid = self.patch_grid()
        if grid.image_size != launch.image_size:
            p.append(f"model image_size={grid.image_size} but data.image_size={launch.image_size}; make them equal")
        if launch.image_mask_patch is not None and launch.image_mask_patch != grid.patch_size:
            p.append(f"data.image_mask.patch_size={launch.image_mask_patch} but the model's patch_size="
                     f"{grid.patch_size}: the masks would not line up with the patches; make them equal")
        positions = self.text_input().max_text_len
        if launch.max_text_len is not None and launch.max_text_len > positions:
            p.append(f"data.max_text_len={launch.max_text_len} exceeds the model's {positions} text positions "
                     f"(max_text_len): lower data.max_text_len to {positions} or raise the model's max_text_len")
        tok = launch.tokenizer
        if tok is not None:
            want = {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "mask": tok.mask_id}
            for key, have in vars(self.tokens).items():
                if have is not None and want[key] is not None and have != want[key]:
                    p.append(f"model.tokens.{key}={have} but the tokenizer has id {want[key]} there; "
                             f"set model.tokens.{key}={want[key]} or null (= the tokenizer's)")
            masks_text = {"mlm", "mdm_text"} & set(self.objectives)
            if masks_text and tok.mask_id is None and self.tokens.mask is None:
                p.append(f"objectives {sorted(masks_text)} mask captions but the tokenizer has no [MASK]/<mask> token; "
                         "use a tokenizer with one or drop those objectives")
        if launch.contrastive_accum_steps > 1:
            p += self.grad_cache_problems(launch.contrastive_accum_steps)
        return p

    def grad_cache_problems(self, steps: int) -> list[str]:
        """Why trainer.contrastive_accum_steps > 1 cannot cache this model's losses (subclasses add teachers)."""
        others = [o for o in self.objectives if o not in CONTRASTIVE_OBJECTIVES]
        if not others:
            return []
        return [f"trainer.contrastive_accum_steps={steps} caches contrastive losses only "
                f"({', '.join(CONTRASTIVE_OBJECTIVES)}), but objectives {others} are not a function of the per-pair "
                "embeddings; set model.objectives=[itc], or trainer.contrastive_accum_steps=1 and trainer.grad_accum "
                "to accumulate"]


def fill_tokens(tokens: SpecialTokens, tok: TokenizerIds) -> None:
    """Unset ids take the tokenizer's ([PAD], [CLS] or <s> as BOS, [SEP] or </s> as EOS, [MASK])."""
    for key, value in (("pad", tok.pad_id), ("bos", tok.bos_id), ("eos", tok.eos_id), ("mask", tok.mask_id)):
        if getattr(tokens, key) is None:
            setattr(tokens, key, value)


@dataclass
class DualTowerConfig(ModelConfigBase):
    """A ViT (`model.vision`) and a text tower (`model.text`): CLIP, ALBEF, CoCa."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def vocab_size(self) -> int:
        return self.text.vocab_size

    def patch_grid(self) -> PatchGrid:
        return self.vision

    def text_input(self) -> TextInput:
        return self.text

    def block_stacks(self) -> dict[str, int]:
        return {"vision": self.vision.layers, "text": self.text.layers}

    def problems(self) -> list[str]:
        return super().problems() + tower_problems("vision", self.vision) + tower_problems("text", self.text) + (
            grid_problems("vision", self.vision)) + text_input_problems("text", self.text)


@dataclass
class MultiwayModelConfig(ModelConfigBase):
    """One Multiway backbone (`model.multiway`) and the visual tokenizer of masked image modeling."""

    multiway: MultiwayConfig = field(default_factory=MultiwayConfig)
    visual_tokenizer: VisualTokenizerConfig = field(default_factory=VisualTokenizerConfig)

    def vocab_size(self) -> int:
        return self.multiway.vocab_size

    def patch_grid(self) -> PatchGrid:
        return self.multiway

    def text_input(self) -> TextInput:
        return self.multiway

    def block_stacks(self) -> dict[str, int]:
        return {"multiway": self.multiway.layers}

    def problems(self) -> list[str]:
        m = self.multiway
        p = super().problems() + tower_problems("multiway", m) + grid_problems("multiway", m)
        p += text_input_problems("multiway", m)
        if m.ffn_dim is not None and m.ffn_dim < 1:
            p.append(f"multiway.ffn_dim={m.ffn_dim} must be >= 1, or null (= width x mlp_ratio)")
        if not 0 <= m.vl_layers <= m.layers:
            p.append(f"multiway.vl_layers={m.vl_layers} must be in [0, layers={m.layers}]")
        if m.sub_norm and not m.decoupled_attention:
            p.append("multiway.sub_norm=true (released BEiT-3) needs decoupled_attention=true")
        vt = self.visual_tokenizer
        if vt.kind not in VISUAL_TOKENIZER_KINDS:
            p.append(f"visual_tokenizer.kind={vt.kind!r} must be one of {list(VISUAL_TOKENIZER_KINDS)}")
        for key in ("patch_size", "image_size"):
            have, want = getattr(vt, key), getattr(m, key)
            if have is not None and have != want:
                p.append(f"visual_tokenizer.{key}={have} differs from multiway.{key}={want}; leave it null (= the model's)")
        return p

    def launch_problems(self, launch: Launch) -> list[str]:
        p = super().launch_problems(launch)
        vt = self.visual_tokenizer
        if vt.kind == "pixels" and vt.mean is None and launch.mean is not None:
            from mmpt.visual_tokenizer.pixels import CLIP_MEAN, CLIP_STD

            if list(launch.mean) != list(CLIP_MEAN) or list(launch.std or []) != list(CLIP_STD):
                p.append("data.mean/std are not CLIP's, which pixel MIM targets assume by default: set "
                         "model.visual_tokenizer.mean and .std to data.mean and data.std")
        return p

    def tokenizer_config(self) -> VisualTokenizerConfig:
        """The visual tokenizer config with the model's patch grid filled in."""
        vt, m = self.visual_tokenizer, self.multiway
        return VisualTokenizerConfig(**{**vars(vt), "patch_size": vt.patch_size or m.patch_size,
                                        "image_size": vt.image_size or m.image_size})

    def tokenizer_file_problems(self, objective: str) -> list[str]:
        """A file-backed visual tokenizer needs its file when `objective` (masked image modeling) is trained."""
        vt = self.visual_tokenizer
        if self.uses(objective) and vt.kind in ("kmeans", "frozen") and not vt.path:
            return [f"visual_tokenizer.kind={vt.kind} needs visual_tokenizer.path (kmeans: `mmpt-data visual-tokenizer "
                    "--shards ... --codebook-size K --out FILE`), or use kind=pixels"]
        return []


@dataclass
class FusionObjectivesConfig:
    """ITM and MLM settings of the fusion-encoder models (ALBEF, VLMo)."""

    itm: ITMConfig = field(default_factory=ITMConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)

    def fusion_problems(self) -> list[str]:
        p = []
        if not 0.0 < self.mlm.mask_prob < 1.0:
            p.append(f"mlm.mask_prob={self.mlm.mask_prob} must be in (0, 1)")
        if self.itm.hardness_warmup_steps < 0:
            p.append(f"itm.hardness_warmup_steps={self.itm.hardness_warmup_steps} must be >= 0")
        return p


def positive_problems(name: str, obj: Any, keys: tuple[str, ...]) -> list[str]:
    """Each of `keys` is a count or a size, so it must be a positive integer."""
    return [f"{name}.{key}={getattr(obj, key)} must be >= 1: set model.{name}.{key} to a positive number"
            for key in keys if getattr(obj, key) < 1]


def tower_problems(name: str, tower: TowerConfig) -> list[str]:
    """`TowerConfig`: at least one block of whole attention heads, a hidden FFN, a dropout probability."""
    p = positive_problems(name, tower, ("width", "layers", "heads"))
    if tower.heads >= 1 and tower.width % tower.heads:
        p.append(f"{name}.width={tower.width} must be divisible by {name}.heads={tower.heads}; "
                 f"change {name}.width or {name}.heads")
    if not tower.mlp_ratio > 0:
        p.append(f"{name}.mlp_ratio={tower.mlp_ratio} must be > 0 (FFN hidden size = width x mlp_ratio)")
    if not 0.0 <= tower.dropout < 1.0:
        p.append(f"{name}.dropout={tower.dropout} must be in [0, 1)")
    if not tower.norm_eps > 0:
        p.append(f"{name}.norm_eps={tower.norm_eps} must be > 0 (LayerNorm's stabiliser)")
    return p


def grid_problems(name: str, grid: PatchGrid) -> list[str]:
    """`PatchGrid`: a whole number (>= 1) of patches per side."""
    p = positive_problems(name, grid, ("image_size", "patch_size"))
    if not p and grid.image_size % grid.patch_size:
        p.append(f"{name}.image_size={grid.image_size} must be a multiple of {name}.patch_size={grid.patch_size}")
    return p


def text_input_problems(name: str, text: TextInput) -> list[str]:
    """`TextInput`: a vocabulary and at least one position (the tokenizer's special tokens need more; checked
    against the tokenizer before launch)."""
    return positive_problems(name, text, ("vocab_size", "max_text_len"))


def _coerce_nested(cfg: Any) -> None:
    """`XConfig(vision={...})` in code: nested dicts become their dataclasses (OmegaConf does it for YAML),
    starting from the field's default so a partial dict overrides only what it names."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, dict) and callable(f.default_factory):  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
            if is_dataclass(default):
                setattr(cfg, f.name, replace(default, **value))


def build_contrastive_loss(c: ContrastiveConfig, objective: Optional[str] = "itc") -> Any:
    """The module of `objective` for `model.contrastive`: ITC (logit scale clamped to [1/max_T, 1/min_T]) or
    SigLIP (objective "siglip"). None (no contrastive objective configured) builds ITC: its heads still serve
    retrieval embeddings, frozen by the model."""
    from mmpt.objectives.itc import ContrastiveLoss
    from mmpt.objectives.siglip import SigLipLoss

    if objective == "siglip":
        siglip = SigLipLoss(c.siglip_scale_init, c.siglip_bias_init)
        siglip.logit_scale.requires_grad_(c.learnable_temperature)
        return siglip
    loss = ContrastiveLoss(c.temperature_init, max_logit_scale=1.0 / c.min_temperature,
                           min_logit_scale=1.0 / c.max_temperature)
    loss.logit_scale.requires_grad_(c.learnable_temperature)
    return loss

