"""Text tokenization: train a WordPiece tokenizer on captions, load one from a file or the HF hub."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", "[DEC]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A BERT-style uncased WordPiece tokenizer whose post-processor adds [CLS] ... [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tok


# Names a tokenizer may give each special token: BERT's first, then BOS/EOS-style vocabularies (RoBERTa, CLIP BPE).
SPECIAL_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "bos": ("[CLS]", "<s>", "<|startoftext|>", "<bos>", "[BOS]"),
    "eos": ("[SEP]", "</s>", "<|endoftext|>", "<eos>", "[EOS]"),
    "mask": ("[MASK]", "<mask>"),
}


class TextTokenizer:
    """Callable that turns captions into padded/truncated `b l` id and mask tensors.

    Special ids under one naming scheme: `bos_id` / `eos_id` are [CLS] / [SEP] for BERT-style tokenizers
    (captions are `[CLS] ... [SEP]`), <s> / </s> or CLIP's start/end of text otherwise; `mask_id` may be None
    (no masked language modeling then). Models take their `model.tokens` from these."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.bos_id = self._require("bos")
        self.eos_id = self._require("eos")
        # CLIP's BPE tokenizer.json has no pad token (OpenAI/HF pad with end-of-text): pad with EOS then. Padding is
        # found by the attention mask, never by id, so only generation (which must tell them apart) refuses it.
        found_pad = self._find("pad")
        self.pad_id = self.eos_id if found_pad is None else found_pad
        self.mask_id = self._find("mask")
        self.vocab_size = tokenizer.get_vocab_size()
        pad_token = tokenizer.id_to_token(self.pad_id)
        tokenizer.enable_truncation(max_length=max_len)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=max_len)

    def _find(self, role: str) -> int | None:
        for name in SPECIAL_NAMES[role]:
            idx = self.tokenizer.token_to_id(name)
            if idx is not None:
                return idx
        return None

    def _require(self, role: str) -> int:
        idx = self._find(role)
        if idx is None:
            raise ValueError(f"tokenizer has no {role} token (one of {SPECIAL_NAMES[role]}); mmpt needs padding, "
                             "begin and end of text (train one with `mmpt-data tokenizer`)")
        return idx

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def looks_like_local_path(path: str) -> bool:
    """A path (not a hub name): ends in .json, or is absolute/relative with a leading / or ."""
    return path.endswith(".json") or path.startswith(("/", ".", "~"))


def load_tokenizer(path: str, max_len: int) -> TextTokenizer:
    """`path` is a local tokenizer.json, or a Hugging Face hub name (needs a network)."""
    if Path(path).is_file():
        tok = Tokenizer.from_file(str(path))
    elif looks_like_local_path(path):
        raise FileNotFoundError(
            f"tokenizer.path={path!r} does not exist; train one with "
            "`mmpt-data tokenizer --shards PATTERN --out tokenizer.json` or give a Hugging Face hub name"
        )
    else:
        try:
            tok = Tokenizer.from_pretrained(path)
        except Exception as exc:  # the hub client raises many types; all mean "could not get it"
            raise FileNotFoundError(
                f"tokenizer.path={path!r} is not a local file and could not be fetched from the hub ({exc}); "
                "use a local tokenizer.json where there is no network"
            ) from exc
    return TextTokenizer(tok, max_len)
