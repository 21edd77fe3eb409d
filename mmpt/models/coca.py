"""CoCa (Yu et al. 2022): a ViT, two attentional poolers and a text decoder trained with ITC + captioning.

Layout (paper Fig. 2): ViT tokens -> contrastive pooler (1 query) -> projection = image embedding, and ->
decoder pooler (N queries) = the image context. The text decoder is one causal stack split in two halves:
unimodal layers (self-attention only) whose appended text [CLS] gives the text embedding, then multimodal
layers (self-attention + cross-attention to the image context) -> LM head -> next-token logits. One
forward pass serves both losses: the unimodal stack runs once, the caption decoder reads its token outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
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
from mmpt.models.cached_contrastive import CachedContrastive, grad_cache_capability
from mmpt.models.protocol import ModelOutput, check_kind
from mmpt.models.registry import register_arch
from mmpt.modules.block import Transformer, trunc_normal_init_
from mmpt.modules.cross_decoder import SelfCrossDecoder
from mmpt.modules.embeddings import TextEmbedding
from mmpt.modules.encoders import vision_tower_from
from mmpt.modules.heads import LMHead, ProjectionHead, l2_normalize
from mmpt.modules.kv_cache import TransformerCache
from mmpt.modules.pooler import AttentionalPooler
from mmpt.models.config_parts import DualTowerConfig, Launch, build_contrastive_loss
from mmpt.objectives.pair_codes import itc_codes

IGNORE_INDEX = -100  # F.cross_entropy's default: padded targets


@dataclass
class CoCaConfig(DualTowerConfig):
    """Defaults are the tiny CPU size (preset `tiny`); preset `base` is the paper's CoCa-Base (383M).

    `text.layers` is the unimodal half of the decoder, `multimodal_layers` the half that cross-attends to
    `num_decoder_queries` pooled image tokens. Captions are `[BOS] tokens [EOS] [PAD]...` (`model.tokens`;
    [CLS]/[SEP] with mmpt's tokenizer). Loss weights: `CoCa.default_loss_weights` (paper: itc 1.0, caption
    2.0), overridden by `loss.weights`. objectives=[itc] builds no decoder half; [caption] keeps the
    contrastive heads frozen (retrieval still embeds through them).
    """

    supported_objectives: ClassVar[tuple[str, ...]] = ("itc", "siglip", "caption")
    default_objectives: ClassVar[tuple[str, ...]] = ("itc", "caption")

    arch_name: ClassVar[str] = "coca"
    multimodal_layers: int = 1
    num_decoder_queries: int = 8  # paper: 256
    # the image embedding: "attention" = an attentional pooler with one query (the paper), "mean" = the mean
    # of the ViT's patch tokens (no pooler parameters to learn first), "cls" = the ViT's own [CLS] token (as
    # CLIP; the ViT then has one, and the decoder pooler reads it with the patches)
    image_pool: str = "attention"
    # "mmpt": the above (ViT without [CLS], two poolers at the ViT width, one block per multimodal layer);
    # "open_clip": open_clip's CoCa, for equal-size comparisons and its weights: ViT with [CLS], ONE pooler of
    # 1 + num_decoder_queries queries at the embedding width (query 0 -> contrastive embedding, the rest ->
    # decoder context; LayerNorm on queries, context and output), and per multimodal layer a self-attention
    # block then a cross-attention block, each with its own FFN (mmpt/modules/cross_decoder.py)
    layout: str = "mmpt"

    def block_stacks(self) -> dict[str, int]:
        return {**super().block_stacks(), **({"multimodal": self.multimodal_layers} if self.uses("caption") else {})}

    def problems(self) -> list[str]:
        p = super().problems()
        for name in ("multimodal_layers", "num_decoder_queries"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.image_pool not in ("attention", "mean", "cls"):
            p.append(f"image_pool={self.image_pool!r} must be 'attention', 'mean' or 'cls'")
        if self.layout not in ("mmpt", "open_clip"):
            p.append(f"layout={self.layout!r} must be 'mmpt' or 'open_clip'")
        elif self.layout == "open_clip" and self.image_pool != "attention":
            p.append("layout=open_clip pools the contrastive embedding with the shared attentional pooler: "
                     f"set image_pool=attention (got {self.image_pool!r})")
        if self.text.max_text_len < 2:
            p.append(f"text.max_text_len={self.text.max_text_len} must be >= 2 (BOS + one target)")
        return p

    def launch_problems(self, launch: Launch) -> list[str]:
        p = super().launch_problems(launch)
        tok = launch.tokenizer
        if self.uses("caption") and tok is not None and tok.pad_id == tok.eos_id:
            p.append(f"the tokenizer pads with its end-of-text token (id {tok.eos_id}; it has no pad token, like "
                     "CLIP's BPE), but captioning must tell the end of a caption from padding: use a tokenizer with "
                     "a pad token, or model.objectives=[itc]")
        return p


PRESETS: dict[str, dict[str, Any]] = {
    # 64 px / patch 8 ViT 64 x 2, 2 unimodal + 1 multimodal layer, 8 queries, ITC from temperature 0.03; the
    # image embedding is the ViT's [CLS] (the paper's 1-query pooler and 1 unimodal layer: t2i R@1 0.145 vs
    # 0.286 on data no preset was tuned on, docs/RESULTS.md issue 11)
    "tiny": {"text": {"layers": 2}, "image_pool": "cls", "contrastive": {"temperature_init": 0.03}, "init_std": 0.05},
    # CoCa-Base (Yu et al. 2022): ViT-B/16, 12 + 12 decoder layers 768 wide, 256 decoder queries, 512-d ITC
    "base": {
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"width": 768, "layers": 12, "heads": 12},
        "multimodal_layers": 12, "num_decoder_queries": 256, "contrastive": {"embed_dim": 512},
    },
}  # fmt: skip


class CoCa(CachedContrastive, nn.Module):
    """Contrastive captioner; implements the `PretrainModel` protocol plus `generate` and `caption_logits`, and
    `grad_cache` with objectives=[itc]."""

    objectives: tuple[str, ...] = ("itc", "caption")
    data_kinds: tuple[str, ...] = ("pairs",)
    default_loss_weights = {"itc": 1.0, "siglip": 1.0, "caption": 2.0}  # the paper's weights; loss.weights.<name> overrides

    def __init__(self, cfg: CoCaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.objectives = tuple(cfg.objectives)
        captions = cfg.uses("caption")
        self.capabilities = frozenset({"generate"} if captions else ()) | grad_cache_capability(cfg.objectives)
        t, embed_dim = cfg.text, cfg.contrastive.embed_dim
        drop = dict(mlp_ratio=t.mlp_ratio, dropout=t.dropout, attn_dropout=t.dropout, norm_eps=t.norm_eps)
        vw, vh = cfg.vision.width, cfg.vision.heads
        self.open_clip_layout = cfg.layout == "open_clip"
        self.contrastive_pooler: AttentionalPooler | None = None
        self.decoder_pooler: AttentionalPooler | None = None
        self.pooler: AttentionalPooler | None = None
        if self.open_clip_layout:  # ViT with [CLS]; one pooler at the embedding width, query 0 for ITC
            self.visual = vision_tower_from(cfg.vision, cls_token=True, patch_dropout=cfg.patch_dropout)
            self.pooler = AttentionalPooler(embed_dim, vw, 1 + cfg.num_decoder_queries, t.heads, query_norm=True)
            self.vision_proj = ProjectionHead(embed_dim, embed_dim)
        else:  # no ViT [CLS] unless image_pool=cls: the summaries come from attentional pooling over the tokens
            cls_token = cfg.image_pool == "cls"
            self.visual = vision_tower_from(cfg.vision, cls_token=cls_token, patch_dropout=cfg.patch_dropout)
            self.contrastive_pooler = AttentionalPooler(vw, vw, 1, vh) if cfg.image_pool == "attention" else None
            self.decoder_pooler = AttentionalPooler(vw, vw, cfg.num_decoder_queries, vh) if captions else None
            self.vision_proj = ProjectionHead(vw, embed_dim)
        # One extra position: the text [CLS] sits right after the last real token, which may be position L.
        self.text_embed = TextEmbedding(t.vocab_size, t.max_text_len + 1, t.width, dropout=t.dropout)
        self.text_cls_token = nn.Parameter(torch.zeros(t.width))  # name contains `cls_token`: no decay
        trunc_normal_init_(self.text_cls_token)
        self.unimodal = Transformer(t.width, t.layers, t.heads, **drop)
        self.text_norm = nn.LayerNorm(t.width)
        self.text_proj = ProjectionHead(t.width, embed_dim)
        self.multimodal: Transformer | SelfCrossDecoder | None = None
        if captions and self.open_clip_layout:
            self.multimodal = SelfCrossDecoder(t.width, cfg.multimodal_layers, t.heads, embed_dim, **drop)
        elif captions:
            self.multimodal = Transformer(t.width, cfg.multimodal_layers, t.heads, cross_attention=True, context_dim=vw,
                                          **drop)  # fmt: skip
        if captions:
            self.decoder_norm = nn.LayerNorm(t.width)
            self.lm_head = LMHead(t.width, t.vocab_size)  # untied, as in the paper
        self.itc = build_contrastive_loss(cfg.contrastive, cfg.contrastive_objective())
        if cfg.contrastive_objective() is None:  # kept for retrieval embeddings, but no objective trains them
            for module in (self.contrastive_pooler, self.vision_proj, self.text_norm, self.text_proj, self.itc):
                if module is not None:
                    module.requires_grad_(False)
            self.text_cls_token.requires_grad_(False)

    # ---- image side ------------------------------------------------------------------------------------
    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `b c h w` -> (normalised embedding `b e`, decoder context `b q c`) from one ViT pass."""
        tokens = self.visual(images)  # `b n c`
        if self.pooler is not None:  # layout=open_clip: one pooler pass serves both
            pooled = self.pooler(tokens)  # `b (1+q) e`
            return l2_normalize(self.vision_proj(pooled[:, 0])), pooled[:, 1:]
        return self._embed_image(tokens), self._context(tokens)

    def _embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens `b n c` -> L2-normalised image embedding `b e` (`config.image_pool`; layout)."""
        if self.pooler is not None:
            pooled = self.pooler(tokens)[:, 0]
        elif self.config.image_pool == "cls":
            pooled = tokens[:, 0]
        elif self.contrastive_pooler is None:
            pooled = reduce(tokens, "b n c -> b c", "mean")
        else:
            pooled = rearrange(self.contrastive_pooler(tokens), "b 1 c -> b c")
        return l2_normalize(self.vision_proj(pooled))

    def _context(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens `b n c` -> decoder context `b q c`."""
        if self.multimodal is None:
            raise ValueError("CoCa without caption in model.objectives has no decoder")
        if self.pooler is not None:
            return self.pooler(tokens)[:, 1:]
        assert self.decoder_pooler is not None
        return self.decoder_pooler(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `b c h w` -> L2-normalised `b e` (contrastive pooling; the decoder pooler is skipped)."""
        return self._embed_image(self.visual(images))

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
        if l > self.config.text.max_text_len:
            raise ValueError(f"text length {l} exceeds text.max_text_len={self.config.text.max_text_len}")
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
        assert self.multimodal is not None, "CoCa without caption in model.objectives has no decoder"
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
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        image_tokens = self.visual(batch.images)  # `b n c`
        pooled = self.pooler(image_tokens) if self.pooler is not None else None  # layout=open_clip: one pass for both
        tokens, text_features = self._unimodal(batch.input_ids, batch.attention_mask)
        contrastive = self.config.contrastive_objective()
        if contrastive is not None:
            if pooled is not None:
                image_features = l2_normalize(self.vision_proj(pooled[:, 0]))
            else:
                image_features = self._embed_image(image_tokens)
            losses[contrastive], metrics = self.itc(image_features, text_features, itc_codes(
                self.config.contrastive.duplicate_positives, batch.image_ids, batch.input_ids, batch.attention_mask))
        if self.config.uses("caption"):
            context = pooled[:, 1:] if pooled is not None else self._context(image_tokens)
            losses["caption"], metrics["caption_acc"] = self._caption_loss(batch, tokens, context)
        return ModelOutput(losses=losses, metrics=metrics)

    def _caption_loss(
        self, batch: Batch, tokens: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token loss and accuracy over the real target tokens."""
        # input ids[:, :-1] (their unimodal outputs; the [CLS] column is not among them) predict ids[:, 1:].
        logits = self._decode(tokens[:, :-1], context)  # `b (l-1) v`
        targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, IGNORE_INDEX)
        caption_loss = F.cross_entropy(
            rearrange(logits.float(), "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"), ignore_index=IGNORE_INDEX
        )
        with torch.no_grad():
            real = targets != IGNORE_INDEX
            acc = ((logits.argmax(dim=-1) == targets) & real).sum() / real.sum().clamp(min=1)
        return caption_loss, acc

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
        if not 1 <= max_len <= cfg.text.max_text_len - 1:
            raise ValueError(
                f"max_len={max_len} must be in [1, max_text_len - 1 = {cfg.text.max_text_len - 1}] (BOS takes a position)"
            )
        if num_beams < 1:
            raise ValueError(f"num_beams={num_beams} must be >= 1")
        tok = cfg.tokens
        gen = GenerationConfig(tok.id("bos"), tok.id("eos"), tok.id("pad"), max_len, min_len, length_penalty)
        context = self._context(self.visual(images, drop_patches=False))  # `b q c` once, from every patch
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
        assert self.multimodal is not None
        unimodal_cache, multimodal_cache = self.unimodal.new_cache(), self.multimodal.new_cache()

        def step(tokens: torch.Tensor) -> torch.Tensor:
            x = self._embed(tokens, unimodal_cache.length)  # positions continue from the cache
            h = self.unimodal(x, is_causal=True, cache=unimodal_cache)
            return self._decode(h, context, cache=multimodal_cache)[:, -1]  # context k/v cached on step 1

        return CachedDecoder(step, [unimodal_cache, multimodal_cache])

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def flops_per_sample(self, kind: str = "pairs", batch_size: int = 1) -> float:
        """Training (forward + backward) FLOPs per image-text pair, for MFU, from the modules' helpers.

        ViT over n = (image/patch)^2 tokens (no [CLS]; the kept ones with model.patch_dropout); the unimodal
        stack over L + 1 tokens (L = max_text_len, padding computed too, + the text [CLS]); with itc the
        contrastive pooler over the n tokens and the two projection heads; with caption the decoder pooler,
        the multimodal stack over L - 1 tokens cross-attending to num_decoder_queries tokens and the LM head
        on L - 1 tokens. Not counted: norms, softmax, GELU, embedding lookups, the loss, the ITC logits.
        layout=open_clip: the ViT has [CLS], its one pooler runs 1 + num_decoder_queries queries, the decoder
        has two blocks per layer.
        """
        if not check_kind(kind, self.data_kinds):
            return 0.0
        cfg = self.config
        n_img, n_txt = self.visual.num_train_tokens, cfg.text.max_text_len  # fewer with patch dropout
        total = self.visual.flops_per_sample() + self.unimodal.flops(n_txt + 1)
        if self.pooler is not None:
            total += self.pooler.flops_per_sample(n_img)
        if cfg.contrastive_objective() is not None:
            total += self.contrastive_pooler.flops_per_sample(n_img) if self.contrastive_pooler is not None else 0.0
            total += self.vision_proj.flops_per_sample() + self.text_proj.flops_per_sample()
        if self.multimodal is not None:
            if self.decoder_pooler is not None:
                total += self.decoder_pooler.flops_per_sample(n_img)
            total += self.multimodal.flops(n_txt - 1, context_tokens=cfg.num_decoder_queries)
            total += self.lm_head.flops(n_txt - 1)
        return total

    def param_counts(self) -> dict[str, int]:
        """Parameters by part, as the paper reports them: image encoder, poolers (+ image projection), text decoder."""
        part_of = {"visual": "image_encoder", "itc": "other"}
        part_of.update(dict.fromkeys(("contrastive_pooler", "decoder_pooler", "pooler", "vision_proj"), "poolers"))
        counts = {"image_encoder": 0, "poolers": 0, "text_decoder": 0, "other": 0}
        for name, p in self.named_parameters():
            counts[part_of.get(name.split(".")[0], "text_decoder")] += p.numel()
        counts["total"] = sum(counts.values())
        return counts


@register_arch("coca", CoCaConfig, PRESETS)
def build_coca(cfg: CoCaConfig) -> CoCa:
    return CoCa(cfg)
