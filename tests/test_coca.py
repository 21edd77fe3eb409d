"""CoCa: protocol, forward/backward, losses at init, padding and causality, generation (cache vs recompute,
greedy vs beam, EOS/pad, brute-force beam reference), tiny overfit, presets and the CoCa-Base size.
FLOPs: tests/test_arch_contract.py (flops_per_sample against FlopCounterMode for every objective set)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmpt.cli.common import CONF_DIR
from mmpt.data.batch import Batch
from mmpt.engine.config import resolve, typed_config
from mmpt.models.coca import CoCa, CoCaConfig, build_coca
from mmpt.models.generation import GenerationConfig, RecomputeDecoder, beam_search, greedy_search
from mmpt.models.protocol import ModelOutput, PretrainModel
from mmpt.models.registry import arch_names, build_model, preset_config
from mmpt.modules.block import no_weight_decay_names

B, L, VOCAB = 8, 16, 100
PAD, BOS, EOS = 0, 2, 3
Trained = tuple[CoCa, Batch, list[dict[str, float]]]  # model after a tiny overfit, its batch, loss history


def tiny_config(**overrides: object) -> CoCaConfig:
    """The `tiny` preset (64 wide ViT x 2 at its [CLS], 2 unimodal + 1 multimodal layer, 8 decoder queries) at 32 px,
    100 tokens of vocabulary and 16 positions."""
    text = {"vocab_size": VOCAB, "max_text_len": L}
    contrastive = {"temperature_init": 0.07, **overrides.pop("contrastive", {})}  # type: ignore[dict-item]
    return preset_config("coca", "tiny", vision={"image_size": 32}, text=text, contrastive=contrastive,
                         **overrides)  # type: ignore


def make_batch(seed: int = 0, b: int = B, min_len: int = 4, max_len: int = L) -> Batch:
    """Tokenizer layout: [CLS] tokens [SEP] [PAD]..., right-padded to L; lengths in [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(L)[None]
    lengths = torch.randint(min_len, max_len + 1, (b, 1), generator=g)
    ids = torch.randint(5, VOCAB, (b, L), generator=g)
    ids = torch.where(pos == lengths - 1, EOS, ids).masked_fill(pos >= lengths, PAD)
    ids[:, 0] = BOS
    mask = (pos < lengths).long()
    return Batch(images=torch.randn(b, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask)


@pytest.fixture
def model() -> CoCa:
    torch.manual_seed(0)
    return build_coca(tiny_config())


@pytest.fixture(scope="module")
def trained() -> Trained:
    """A tiny CoCa after 40 AdamW steps on one fixed batch of short captions (it memorises them)."""
    torch.manual_seed(0)
    model = build_coca(tiny_config())
    batch = make_batch(seed=1, max_len=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(40):
        losses = model(batch).losses
        opt.zero_grad(set_to_none=True)
        (losses["itc"] + 2.0 * losses["caption"]).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return model.eval(), batch, history


# ---- protocol, config ---------------------------------------------------------------------------------


def test_protocol_and_registry(model: CoCa) -> None:
    assert isinstance(model, PretrainModel) and callable(model.generate)
    assert model.objectives == ("itc", "caption") and "coca" in arch_names()
    assert model.data_kinds == ("pairs",) and model.capabilities == frozenset({"generate"})
    assert model.default_loss_weights == {"itc": 1.0, "siglip": 1.0, "caption": 2.0}  # siglip: in place of itc
    text = {"vocab_size": VOCAB, "max_text_len": L}
    built = build_model({"arch": "coca", "vision": {"image_size": 32}, "text": text})
    assert isinstance(built, CoCa) and built.config.vision.image_size == 32 and built.config.text.vocab_size == VOCAB
    out = built(make_batch())
    assert isinstance(out, ModelOutput) and set(out.losses) == {"itc", "caption"}
    assert all(v.ndim == 0 for v in out.losses.values())
    assert {"itc_acc", "temperature", "caption_acc"} <= set(out.metrics)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"invalid coca config: .*multiple of vision\.patch_size"):
        CoCaConfig(vision={"image_size": 30, "patch_size": 8})
    with pytest.raises(ValueError, match=r"divisible by text\.heads"):
        CoCaConfig(text={"width": 30, "heads": 4})
    with pytest.raises(ValueError, match="distinct"):
        CoCaConfig(tokens={"eos": 0, "pad": 0})
    with pytest.raises(ValueError, match="num_decoder_queries=0 must be >= 1"):
        CoCaConfig(num_decoder_queries=0)
    with pytest.raises(ValueError, match=r"tokens\.eos=3 must be in \[0, vocab_size=3\)"):
        CoCaConfig(text={"vocab_size": 3}, tokens={"bos": 2, "eos": 3, "pad": 0})
    with pytest.raises(ValueError, match="max_text_len=1 must be >= 2"):
        CoCaConfig(text={"max_text_len": 1})
    with pytest.raises(ValueError, match="objectives"):
        CoCaConfig(objectives=["itm"])


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_presets_validate(preset: str) -> None:
    """mmpt/conf/model/coca/<preset>.yaml composes (Hydra) to the Python preset with the data's geometry."""
    overrides = ["data.image_size=224", "data.max_text_len=76", "tokenizer.vocab_size=64000"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        composed = compose("train", overrides=[f"model=coca/{preset}", *overrides])
    cfg = typed_config(resolve(composed)).model
    assert isinstance(cfg, CoCaConfig) and cfg.text.vocab_size == 64000 and cfg.text.max_text_len == 76
    text = {"vocab_size": 64000, "max_text_len": 76}
    assert cfg == preset_config("coca", preset, vision={"image_size": 224}, text=text)
    assert cfg.objectives == ["itc", "caption"]
    if preset == "base":
        assert (cfg.vision.width, cfg.vision.layers, cfg.text.layers, cfg.multimodal_layers) == (768, 12, 12, 12)
        assert cfg.num_decoder_queries == 256
    else:
        assert (cfg.vision.width, cfg.vision.layers, cfg.text.layers, cfg.multimodal_layers) == (64, 2, 2, 1)
        assert cfg.image_pool == "cls"


# ---- forward / losses -----------------------------------------------------------------------------------


def test_forward_backward_reaches_every_parameter(model: CoCa) -> None:
    losses = model(make_batch()).losses
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["itc"] + losses["caption"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_losses_at_init(model: CoCa) -> None:
    losses = model(make_batch()).losses
    assert losses["caption"].item() == pytest.approx(math.log(VOCAB), abs=0.15)
    # Noise images give unrelated image embeddings, so logits spread by s * cos with s = 1/0.07: somewhat
    # above ln B (2.2-3.1 over seeds at B = 8). With s = 1 the spread vanishes and it is ln B.
    assert math.log(B) - 0.5 < losses["itc"].item() < math.log(B) + 1.5, losses["itc"]
    with torch.no_grad():
        model.itc.logit_scale.zero_()  # s = 1: cosines in [-1, 1] barely move the softmax
    assert model(make_batch()).losses["itc"].item() == pytest.approx(math.log(B), abs=0.15)


def test_caption_loss_matches_reference(model: CoCa) -> None:
    batch = make_batch()
    logits = model.caption_logits(batch.images, batch.input_ids, batch.attention_mask)
    log_probs = logits.log_softmax(dim=-1)
    total, count = 0.0, 0
    for i in range(B):
        for t in range(L - 1):
            if batch.attention_mask[i, t + 1]:
                total -= log_probs[i, t, batch.input_ids[i, t + 1]].item()
                count += 1
    assert model(batch).losses["caption"].item() == pytest.approx(total / count, rel=1e-5)


def test_encodings_are_normalized(model: CoCa) -> None:
    batch = make_batch()
    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.input_ids, batch.attention_mask)
    assert img.shape == txt.shape == (B, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))


def _repad(batch: Batch, width: int, fill: torch.Tensor | None = None) -> Batch:
    """The same captions padded to `width` columns, pad slots holding `fill` ids instead of [PAD]."""
    ids = torch.zeros(batch.input_ids.shape[0], width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    n = min(width, L)
    ids[:, :n], mask[:, :n] = batch.input_ids[:, :n], batch.attention_mask[:, :n]
    if fill is not None:
        ids = torch.where(mask.bool(), ids, fill[:, :width])
    return Batch(batch.images, ids, mask)


def test_padding_invariance(model: CoCa) -> None:
    model.eval()
    batch = make_batch(max_len=10)
    junk = torch.randint(5, VOCAB, (B, L))
    variants = [_repad(batch, L, junk), _repad(batch, 10), _repad(batch, 12, junk)]
    ref_text = model.encode_text(batch.input_ids, batch.attention_mask)
    ref_losses = model(batch).losses
    for other in variants:  # other pad ids, and fewer / more pad columns
        text = model.encode_text(other.input_ids, other.attention_mask)
        torch.testing.assert_close(text, ref_text, atol=1e-6, rtol=1e-5)
        losses = model(other).losses
        torch.testing.assert_close(losses["caption"], ref_losses["caption"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(losses["itc"], ref_losses["itc"], atol=1e-6, rtol=1e-5)
    changed = batch.input_ids.clone()
    changed[:, 1] = (changed[:, 1] + 1 - 5) % (VOCAB - 5) + 5  # a real token: the embedding must move
    assert not torch.allclose(model.encode_text(changed, batch.attention_mask), ref_text)


def test_caption_logits_are_causal(model: CoCa) -> None:
    model.eval()
    batch = make_batch(min_len=L, max_len=L)  # no padding: every position is real
    t = 6
    later = batch.input_ids.clone()
    later[:, t + 1 :] = torch.randint(5, VOCAB, (B, L - t - 1))
    ref = model.caption_logits(batch.images, batch.input_ids, batch.attention_mask)
    new = model.caption_logits(batch.images, later, batch.attention_mask)
    torch.testing.assert_close(new[:, : t + 1], ref[:, : t + 1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(new[:, t + 1 :], ref[:, t + 1 :])


def test_adamw_steps_reduce_both_losses(trained: Trained) -> None:
    _, _, history = trained
    for key in ("itc", "caption"):
        assert history[-1][key] < 0.5 * history[0][key], [h[key] for h in history]


# ---- generation -----------------------------------------------------------------------------------------


def _check_eos_and_padding(ids: torch.Tensor, max_len: int, min_len: int = 0) -> None:
    assert ids.dtype == torch.long and ids.shape[1] <= max_len
    for row in ids.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert end >= min_len and all(tok == PAD for tok in row[end + 1 :]), row
            assert PAD not in row[:end] and BOS not in row[:end], row
        else:
            assert len(row) == max_len and PAD not in row and BOS not in row, row


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generation_reproduces_memorised_captions(trained: Trained, strategy: str) -> None:
    model, batch, _ = trained
    cached = model.generate(batch.images, max_len=12, strategy=strategy)
    recomputed = model.generate(batch.images, max_len=12, strategy=strategy, use_cache=False)
    assert torch.equal(cached, recomputed)
    _check_eos_and_padding(cached, 12)
    # Targets: the captions after [CLS], up to and including [SEP], then pad.
    targets = batch.input_ids[:, 1 : cached.shape[1] + 1]
    assert torch.equal(cached, targets), (cached, batch.input_ids)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cache_equals_recompute_at_init(model: CoCa, strategy: str) -> None:
    model.eval()
    images = make_batch(b=4).images
    cached = model.generate(images, max_len=10, strategy=strategy, num_beams=3)
    assert torch.equal(cached, model.generate(images, max_len=10, strategy=strategy, num_beams=3, use_cache=False))
    _check_eos_and_padding(cached, 10)


def test_beam_of_one_equals_greedy(trained: Trained, model: CoCa) -> None:
    for m, images in ((trained[0], trained[1].images), (model.eval(), make_batch(b=4).images)):
        beam = m.generate(images, max_len=10, strategy="beam", num_beams=1)
        torch.testing.assert_close(beam, m.generate(images, max_len=10))


def test_min_len_and_argument_checks(trained: Trained) -> None:
    model, batch, _ = trained
    for strategy in ("greedy", "beam"):
        ids = model.generate(batch.images, max_len=12, min_len=9, strategy=strategy)
        _check_eos_and_padding(ids, 12, min_len=9)
        assert (ids == EOS).any()  # it still stops once allowed to
    with pytest.raises(ValueError, match="max_len"):
        model.generate(batch.images, max_len=L)
    with pytest.raises(ValueError, match="strategy"):
        model.generate(batch.images, strategy="sample")


def _markov_decoder(table: torch.Tensor, k: int) -> RecomputeDecoder:
    """Rows n = b * k; next-token logits depend only on (image, last token): table `b v v`."""
    image_of_row = torch.arange(table.shape[0] * k) // k
    return RecomputeDecoder(lambda prefix: table[image_of_row[:, None], prefix])


def _brute_force(table: torch.Tensor, cfg: GenerationConfig, length_norm: bool) -> list[list[int]]:
    """Best sequence per image over every possible continuation (score as the search defines it)."""
    best_rows = []
    vocab = table.shape[-1]
    for logits in table:
        best: tuple[float, list[int]] = (-math.inf, [])
        for n in range(1, cfg.max_len + 1):
            for seq in itertools.product(range(vocab), repeat=n):
                if EOS in seq[:-1] or (n < cfg.max_len and seq[-1] != EOS):
                    continue
                total, prev = 0.0, BOS
                for step, tok in enumerate(seq):
                    row = logits[prev].clone()
                    row[[PAD, BOS] + ([EOS] if step < cfg.min_len else [])] = -math.inf
                    total += row.log_softmax(-1)[tok].item()
                    prev = tok
                score = total / n if length_norm else total
                if score > best[0]:
                    best = (score, list(seq))
        best_rows.append(best[1])
    return best_rows


@pytest.mark.parametrize("min_len", [0, 2])
def test_search_against_brute_force(min_len: int) -> None:
    """Exhaustive beams (k >= hypotheses) must find the best length-normalised sequence; greedy follows argmax."""
    torch.manual_seed(3)  # a table where length normalisation changes the winner (checked below)
    b, vocab = 3, 6
    table = torch.randn(b, vocab, vocab) * 2.0
    table[:, :, EOS] += 1.0  # make EOS competitive so sequences of several lengths compete
    cfg = GenerationConfig(BOS, EOS, PAD, max_len=4, min_len=min_len)
    beams = beam_search(_markov_decoder(table, 128), b, 128, cfg, torch.device("cpu"))
    expected = _brute_force(table, cfg, length_norm=True)
    assert expected != _brute_force(table, cfg, length_norm=False)
    for row, exp in zip(beams.tolist(), expected):
        assert row[: len(exp)] == exp and all(tok == PAD for tok in row[len(exp) :]), (row, exp)
    greedy = greedy_search(_markov_decoder(table, 1), b, cfg, torch.device("cpu"))
    _check_eos_and_padding(greedy, 4, min_len)
    for i, row in enumerate(greedy.tolist()):
        prev = BOS
        for step, tok in enumerate(row):
            if tok == PAD:
                break
            allowed = table[i, prev].clone()
            allowed[[PAD, BOS] + ([EOS] if step < min_len else [])] = -math.inf
            assert tok == allowed.argmax().item()
            prev = tok


# ---- bookkeeping ----------------------------------------------------------------------------------------


def test_no_weight_decay_names(model: CoCa) -> None:
    names = no_weight_decay_names(model)
    assert {
        "itc.logit_scale", "text_cls_token", "visual.patch_embed.cls_token", "decoder_pooler.cls_token",
        "text_embed.pos_embed", "visual.patch_embed.pos_embed", "decoder_norm.weight", "text_norm.bias",
    } <= names  # fmt: skip
    decayed = {n for n, _ in model.named_parameters()} - names
    expected = {"lm_head.decoder.weight", "text_embed.token_embed.weight", "multimodal.blocks.0.cross_attn.kv.weight"}
    assert expected <= decayed
    # the paper's pooled image embedding (image_pool=attention): its query is a token, not a decayed weight
    assert "contrastive_pooler.cls_token" in no_weight_decay_names(build_coca(tiny_config(image_pool="attention")))


def test_lm_head_is_untied(model: CoCa) -> None:
    assert model.lm_head.decoder.weight is not model.text_embed.token_embed.weight and not model.lm_head.tied


def test_base_preset_matches_paper_size() -> None:
    """CoCa-Base at 224 px, 64k vocab, 76 tokens: paper 383M = image encoder 86M + text decoder 297M."""
    with torch.device("meta"):
        model = build_coca(preset_config("coca", "base", text={"vocab_size": 64000, "max_text_len": 76}))
    cfg = model.config
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers) == (224, 16, 768, 12)
    assert (cfg.text.width, cfg.text.layers, cfg.multimodal_layers, cfg.text.heads) == (768, 12, 12, 12)
    assert (cfg.contrastive.embed_dim, cfg.num_decoder_queries) == (512, 256)
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == pytest.approx(383e6, rel=0.02), counts
    assert counts["image_encoder"] == pytest.approx(86e6, rel=0.01), counts
    assert counts["text_decoder"] == pytest.approx(297e6, rel=0.01), counts
    assert counts["poolers"] == pytest.approx(5.3e6, rel=0.01), counts


def test_mean_image_pool_embeds_the_patch_mean_without_a_pooler() -> None:
    """image_pool=mean: the image embedding is the projected mean of the ViT's patch tokens; no contrastive
    pooler exists, and the ITC gradient reaches the ViT through the mean."""
    torch.manual_seed(0)
    model = build_coca(tiny_config(image_pool="mean"))
    assert model.contrastive_pooler is None and not any("contrastive_pooler" in n for n, _ in model.named_parameters())
    images = make_batch().images
    want = torch.nn.functional.normalize(model.vision_proj(model.visual(images).mean(dim=1)), dim=-1)
    torch.testing.assert_close(model.encode_image(images), want)
    out = model(make_batch())
    out.losses["itc"].backward()
    assert model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image_pool"):
        tiny_config(image_pool="max")


def test_cls_image_pool_embeds_the_vit_cls_token() -> None:
    """image_pool=cls: the ViT gets a [CLS] token (one more token than patches), the image embedding is its
    projected output (as CLIP's), no contrastive pooler exists, and the ITC gradient reaches that token."""
    torch.manual_seed(0)
    model = build_coca(tiny_config(image_pool="cls"))
    assert model.contrastive_pooler is None and not any("contrastive_pooler" in n for n, _ in model.named_parameters())
    assert model.visual.num_tokens == (32 // 8) ** 2 + 1
    images = make_batch().images
    tokens = model.visual(images)
    want = torch.nn.functional.normalize(model.vision_proj(tokens[:, 0]), dim=-1)
    torch.testing.assert_close(model.encode_image(images), want)
    assert not torch.allclose(want, torch.nn.functional.normalize(model.vision_proj(tokens[:, 1:].mean(1)), dim=-1))
    out = model(make_batch())
    out.losses["itc"].backward()
    assert model.visual.patch_embed.cls_token.grad.abs().sum() > 0
