"""CoCa (Yu et al. 2022): a ViT, two attentional poolers and a text decoder trained with ITC + captioning.

Layout (paper Fig. 2): ViT tokens -> contrastive pooler (1 query) -> projection = image embedding, and ->
decoder pooler (N queries) = the image context. The text decoder is one causal stack split in two halves:
unimodal layers (self-attention only) whose appended text [CLS] gives the text embedding, then multimodal
layers (self-attention + cross-attention to the image context) -> LM head -> next-token logits. One
forward pass serves both losses: the unimodal stack runs once, the caption decoder reads its token outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from mmpt.data.batch import Batch
from mmpt.models.generation import (
    CachedDecoder,
    GenerationConfig,
    RecomputeDecoder,
    StepDecoder,
    beam_search,
    greedy_search,
)
from mmpt.models.protocol import ModelOutput
from mmpt.models.registry import register_arch
from mmpt.modules.block import Transformer, no_weight_decay_names
from mmpt.modules.embeddings import TextEmbedding
from mmpt.modules.encoders import vision_tower_from
from mmpt.modules.heads import LMHead, ProjectionHead, l2_normalize
from mmpt.modules.kv_cache import TransformerCache
from mmpt.modules.pooler import AttentionalPooler
from mmpt.objectives.itc import ContrastiveLoss
from mmpt.models.config_base import ModelConfigBase
from mmpt.models.config_checks import tower_problems
from mmpt.objectives.pair_codes import itc_codes

IGNORE_INDEX = -100  # F.cross_entropy's default: padded targets


@dataclass
class CoCaConfig(ModelConfigBase):
    """Defaults are the tiny CPU test size; conf/model/coca/base.yaml is the paper's CoCa-Base (383M).

    Token ids follow mmpt's tokenizer: every caption is `[CLS] tokens [SEP] [PAD]...`, so [CLS] (2) is the
    decoder's BOS and [SEP] (3) its EOS. Loss weights: `CoCa.default_loss_weights` (paper: itc 1.0, caption
    2.0), overridden by `loss.weights`.
    """

    arch: str = "coca"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 64
    unimodal_layers: int = 1
    multimodal_layers: int = 1
    text_heads: int = 2
    vocab_size: int = 1000
    max_text_len: int = 32
    embed_dim: int = 64
    num_decoder_queries: int = 8  # paper: 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = tower_problems(self)
        for name in ("vision_layers", "unimodal_layers", "multimodal_layers", "num_decoder_queries", "embed_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_text_len < 2:
            problems.append(f"max_text_len={self.max_text_len} must be >= 2 (BOS + one target)")
        ids = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        if len(set(ids.values())) != 3:
            problems.append(f"bos_id, eos_id and pad_id must differ, got {ids}")
        v = self.vocab_size
        problems += [f"{k}={i} must be in [0, vocab_size={v})" for k, i in ids.items() if not 0 <= i < v]
        if self.temperature_init <= 0 or 1.0 / self.temperature_init > self.max_logit_scale:
            problems.append(
                f"temperature_init={self.temperature_init} must be > 0 and >= "
                f"1/max_logit_scale={1.0 / self.max_logit_scale}"
            )
        if problems:
            raise ValueError("invalid CoCa config: " + "; ".join(problems))


class CoCa(nn.Module):
    """Contrastive captioner; implements the `PretrainModel` protocol plus `generate` and `caption_logits`."""

    objectives: tuple[str, ...] = ("itc", "caption")
    default_loss_weights = {"itc": 1.0, "caption": 2.0}  # the paper's weights; loss.weights.<name> overrides

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.config = cfg
        drop = dict(mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, attn_dropout=cfg.dropout)
        # No ViT [CLS]: both summaries come from attentional pooling over all patch tokens.
        self.visual = vision_tower_from(cfg, cls_token=False)
        vw, vh = cfg.vision_width, cfg.vision_heads
        self.contrastive_pooler = AttentionalPooler(vw, vw, 1, vh)
        self.decoder_pooler = AttentionalPooler(vw, vw, cfg.num_decoder_queries, vh)
        self.vision_proj = ProjectionHead(cfg.vision_width, cfg.embed_dim)
        # One extra position: the text [CLS] sits right after the last real token, which may be position L.
        self.text_embed = TextEmbedding(cfg.vocab_size, cfg.max_text_len + 1, cfg.text_width, dropout=cfg.dropout)
        self.text_cls_token = nn.Parameter(torch.zeros(cfg.text_width))  # name contains `cls_token`: no decay
        nn.init.trunc_normal_(self.text_cls_token, std=0.02, a=-0.04, b=0.04)
        self.unimodal = Transformer(cfg.text_width, cfg.unimodal_layers, cfg.text_heads, **drop)
        self.text_norm = nn.LayerNorm(cfg.text_width)
        self.text_proj = ProjectionHead(cfg.text_width, cfg.embed_dim)
        self.multimodal = Transformer(
            cfg.text_width, cfg.multimodal_layers, cfg.text_heads,
            cross_attention=True, context_dim=cfg.vision_width, **drop,
        )  # fmt: skip
        self.decoder_norm = nn.LayerNorm(cfg.text_width)
        self.lm_head = LMHead(cfg.text_width, cfg.vocab_size)  # untied, as in the paper
        self.itc = ContrastiveLoss(cfg.temperature_init, cfg.max_logit_scale)

    # ---- image side ------------------------------------------------------------------------------------
    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `b c h w` -> (normalised embedding `b e`, decoder context `b q c`) from one ViT pass."""
        tokens = self.visual(images)  # `b n c`
        pooled = rearrange(self.contrastive_pooler(tokens), "b 1 c -> b c")
        return l2_normalize(self.vision_proj(pooled)), self.decoder_pooler(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` (contrastive pooler; the decoder pooler is skipped)."""
        pooled = rearrange(self.contrastive_pooler(self.visual(images)), "b 1 c -> b c")
        return l2_normalize(self.vision_proj(pooled))

    # ---- text side -------------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids `b n` at positions start..start+n-1 -> `b n d` (decoding steps continue after the cache)."""
        pos = self.text_embed.pos_embed[:, start : start + input_ids.shape[1]]
        return self.text_embed.drop(self.text_embed.token_embed(input_ids) + pos)

    def _unimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `b l` ids -> (unimodal token outputs `b l d`, normalised text embedding `b e`).

        The text [CLS] is an extra column l; it carries the position embedding of the slot right after the
        last real token and attends to every real token and itself (pads masked), so the embedding does
        not depend on how much padding a batch has. Real tokens never see it (causal), so the token
        outputs, which feed the caption decoder, are those of the plain causal sequence.
        """
        b, l = input_ids.shape
        if l > self.config.max_text_len:
            raise ValueError(f"text length {l} exceeds max_text_len={self.config.max_text_len}")
        lengths = attention_mask.sum(dim=1)  # `b`: [CLS] position under right padding
        cls = self.text_embed.drop(self.text_cls_token + self.text_embed.pos_embed[0, lengths])  # `b d`
        x = torch.cat([self.text_embed(input_ids), rearrange(cls, "b d -> b 1 d")], dim=1)
        keys = F.pad(attention_mask.bool(), (0, 1), value=True)  # `b (l+1)`: real tokens + [CLS]
        not_cls_row = torch.arange(l + 1, device=x.device) < l  # padding restricts only the [CLS] query
        attn_mask = rearrange(keys, "b k -> b 1 1 k") | rearrange(not_cls_row, "q -> 1 1 q 1")
        h = self.unimodal(x, attn_mask=attn_mask, is_causal=True)
        return h[:, :l], l2_normalize(self.text_proj(self.text_norm(h[:, l])))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask `b l` (right-padded, 1 = real) -> L2-normalised `b e` (unimodal half only)."""
        return self._unimodal(input_ids, attention_mask)[1]

    def _decode(
        self, text_tokens: torch.Tensor, context: torch.Tensor, cache: TransformerCache | None = None
    ) -> torch.Tensor:
        """Unimodal outputs `b t d` + image context `b q c` -> next-token logits `b t v` (causal)."""
        h = self.multimodal(text_tokens, is_causal=True, context=context, cache=cache)
        return self.lm_head(self.decoder_norm(h))

    def caption_logits(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits `b (l-1) v`; row t predicts input_ids[:, t + 1] (scoring, tests)."""
        tokens, _ = self._unimodal(input_ids, attention_mask)
        return self._decode(tokens[:, :-1], self._image(images)[1])

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> ModelOutput:
        image_features, context = self._image(batch.images)
        tokens, text_features = self._unimodal(batch.input_ids, batch.attention_mask)
        itc_loss, metrics = self.itc(image_features, text_features, itc_codes(
            self.config.itc_duplicate_positives, batch.image_ids, batch.input_ids, batch.attention_mask))
        # Caption: input ids[:, :-1] (their unimodal outputs; the [CLS] column is not among them) predict ids[:, 1:].
        logits = self._decode(tokens[:, :-1], context)  # `b (l-1) v`
        targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, IGNORE_INDEX)
        caption_loss = F.cross_entropy(
            rearrange(logits.float(), "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"), ignore_index=IGNORE_INDEX
        )
        with torch.no_grad():
            real = targets != IGNORE_INDEX
            metrics["caption_acc"] = ((logits.argmax(dim=-1) == targets) & real).sum() / real.sum().clamp(min=1)
        return ModelOutput(losses={"itc": itc_loss, "caption": caption_loss}, metrics=metrics)

    # ---- captioning --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        max_len: int = 20,
        strategy: str = "greedy",
        num_beams: int = 3,
        min_len: int = 0,
        use_cache: bool = True,
        length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Images `b c h w` -> ids `b t` (t <= max_len) after BOS, ending at EOS, padded after it.

        The image context is computed once; `use_cache=True` feeds one token per step through KV caches of
        both halves of the decoder, `use_cache=False` re-runs the prefix (the reference for tests). Call
        `eval()` first when the model has dropout.
        """
        cfg = self.config
        if strategy not in ("greedy", "beam"):
            raise ValueError(f"strategy={strategy!r} must be 'greedy' or 'beam'")
        if not 1 <= max_len <= cfg.max_text_len - 1:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_text_len - 1 = {cfg.max_text_len - 1}] (BOS takes a position)"
            )
        if num_beams < 1:
            raise ValueError(f"num_beams={num_beams} must be >= 1")
        gen = GenerationConfig(cfg.bos_id, cfg.eos_id, cfg.pad_id, max_len, min_len, length_penalty)
        context = self.decoder_pooler(self.visual(images))  # `b q c`, computed once
        k = num_beams if strategy == "beam" else 1
        context = repeat(context, "b q c -> (b k) q c", k=k)
        if use_cache:
            decoder: StepDecoder = self._cached_decoder(context)
        else:
            decoder = RecomputeDecoder(lambda ids: self._decode_prefix(ids, context))
        if strategy == "greedy":
            return greedy_search(decoder, images.shape[0], gen, images.device)
        return beam_search(decoder, images.shape[0], k, gen, images.device)

    def _decode_prefix(self, ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Whole prefix `n t` (no padding) -> logits `n t v` without caches."""
        return self._decode(self.unimodal(self._embed(ids, 0), is_causal=True), context)

    def _cached_decoder(self, context: torch.Tensor) -> CachedDecoder:
        unimodal_cache, multimodal_cache = self.unimodal.new_cache(), self.multimodal.new_cache()

        def step(tokens: torch.Tensor) -> torch.Tensor:
            x = self._embed(tokens, unimodal_cache.length)  # positions continue from the cache
            h = self.unimodal(x, is_causal=True, cache=unimodal_cache)
            return self._decode(h, context, cache=multimodal_cache)[:, -1]  # context k/v cached on step 1

        return CachedDecoder(step, [unimodal_cache, multimodal_cache])

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def flops_per_sample(self) -> float:
        """Training (forward + backward) FLOPs per image-text pair, for MFU, from the modules' helpers.

        ViT over n = (image/patch)^2 tokens (no [CLS]); both poolers over those n tokens; the unimodal stack
        over L + 1 tokens (L = max_text_len, padding computed too, + the text [CLS]); the multimodal stack
        over L - 1 tokens cross-attending to num_decoder_queries tokens; the LM head on L - 1 tokens; the two
        projection heads. Not counted: norms, softmax, GELU, embedding lookups, the loss, the ITC logits.
        """
        cfg = self.config
        n_img, n_txt = self.visual.num_tokens, cfg.max_text_len
        return (
            self.visual.flops_per_sample()
            + self.contrastive_pooler.flops_per_sample(n_img)
            + self.decoder_pooler.flops_per_sample(n_img)
            + self.unimodal.flops(n_txt + 1)
            + self.multimodal.flops(n_txt - 1, context_tokens=cfg.num_decoder_queries)
            + self.lm_head.flops(n_txt - 1)
            + self.vision_proj.flops_per_sample()
            + self.text_proj.flops_per_sample()
        )

    def param_counts(self) -> dict[str, int]:
        """Parameters by part, as the paper reports them: image encoder, poolers (+ image projection), text decoder."""
        part_of = {"visual": "image_encoder", "itc": "other"}
        part_of.update(dict.fromkeys(("contrastive_pooler", "decoder_pooler", "vision_proj"), "poolers"))
        counts = {"image_encoder": 0, "poolers": 0, "text_decoder": 0, "other": 0}
        for name, p in self.named_parameters():
            counts[part_of.get(name.split(".")[0], "text_decoder")] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def no_weight_decay_names(self) -> set[str]:
        """ndim < 2 tensors plus names with `pos_embed` / `cls_token` (pooler queries, text [CLS]) / `logit_scale`."""
        return no_weight_decay_names(self)


@register_arch("coca", CoCaConfig)
def build_coca(cfg: CoCaConfig) -> CoCa:
    return CoCa(cfg)
