"""Special token ids come from the tokenizer under one naming scheme (pad / bos / eos / mask), BERT-style or BOS/EOS."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from mmpt.data.tokenizer import TextTokenizer
from mmpt.models.config_parts import Launch, fill_tokens
from mmpt.models.registry import build_model, preset_config


def word_tokenizer(specials: list[str], bos: str, eos: str) -> Tokenizer:
    """A word-level tokenizer whose vocabulary starts with `specials`, wrapping every text in bos ... eos."""
    vocab = {tok: i for i, tok in enumerate([*specials, "a", "red", "circle"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return tok


def test_bos_eos_style_tokenizer_gives_its_own_ids() -> None:
    # RoBERTa's layout: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4
    tok = TextTokenizer(word_tokenizer(["<s>", "<unk>", "<pad>", "</s>", "<mask>"], "<s>", "</s>"), max_len=6)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.mask_id) == (0, 2, 3, 4)
    ids, mask = tok(["a red circle"])
    assert ids.tolist() == [[0, 5, 6, 7, 3, 2]] and mask.tolist() == [[1, 1, 1, 1, 1, 0]]


def test_unset_model_ids_are_filled_from_the_tokenizer_and_used() -> None:
    tok = TextTokenizer(word_tokenizer(["[UNK]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"], "[CLS]", "[SEP]"), max_len=8)
    cfg = preset_config("coca", "tiny")
    assert cfg.tokens.bos is None  # a preset states no ids: they are the tokenizer's
    fill_tokens(cfg.tokens, tok)
    assert (cfg.tokens.pad, cfg.tokens.bos, cfg.tokens.eos, cfg.tokens.mask) == (1, 3, 2, 4)
    model = build_model(cfg)
    assert model.config.tokens.id("bos") == 3  # generation starts from the tokenizer's [CLS]


def test_hand_set_id_that_disagrees_is_a_launch_problem() -> None:
    tok = TextTokenizer(word_tokenizer(["[UNK]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"], "[CLS]", "[SEP]"), max_len=8)
    cfg = preset_config("albef", "tiny", tokens={"mask": 7})
    problems = cfg.launch_problems(Launch(world_size=1, micro_batch=4, zero_stage=0, image_size=64, tokenizer=tok))
    assert any("model.tokens.mask=7" in p and "id 4" in p for p in problems), problems


def test_masked_language_modeling_needs_a_mask_token() -> None:
    tok = TextTokenizer(word_tokenizer(["<s>", "<unk>", "<pad>", "</s>"], "<s>", "</s>"), max_len=8)
    assert tok.mask_id is None
    launch = Launch(world_size=1, micro_batch=4, zero_stage=0, image_size=64, tokenizer=tok)
    assert any("no [MASK]" in p for p in preset_config("albef", "tiny").launch_problems(launch))
    assert preset_config("albef", "tiny", objectives=["itc"]).launch_problems(launch) == []  # ITC needs no mask


def test_a_tokenizer_without_padding_pads_with_eos_like_clip() -> None:
    # CLIP's BPE tokenizer.json: start/end of text, no pad token; the attention mask tells padding apart
    tok = TextTokenizer(word_tokenizer(["<|startoftext|>", "<unk>", "<|endoftext|>"], "<|startoftext|>",
                                       "<|endoftext|>"), max_len=6)
    assert tok.pad_id == tok.eos_id == 2
    ids, mask = tok(["hello"])  # an unknown word: one <unk>
    assert ids.tolist() == [[0, 1, 2, 2, 2, 2]] and mask.tolist() == [[1, 1, 1, 0, 0, 0]]
    launch = Launch(world_size=1, micro_batch=4, zero_stage=0, image_size=64, tokenizer=tok)
    assert preset_config("clip", "tiny").launch_problems(launch) == []
    # captioning must tell the end of a caption from padding: refused before launch, not after training
    assert any("pads with its end-of-text token" in p for p in preset_config("coca", "tiny").launch_problems(launch))
