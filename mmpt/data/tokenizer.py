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


class TextTokenizer:
    """Callable that turns captions into padded/truncated `b l` id and mask tensors."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pad_id = self._require("[PAD]")
        self.cls_id = self._require("[CLS]")
        self.sep_id = self._require("[SEP]")
        self.mask_id = tokenizer.token_to_id("[MASK]")
        self.vocab_size = tokenizer.get_vocab_size()
        tokenizer.enable_truncation(max_length=max_len)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token="[PAD]", length=max_len)

    def _require(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer has no {token} token; mmpt needs [PAD] [CLS] [SEP] (train one with `mmpt-data tokenizer`)")
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
