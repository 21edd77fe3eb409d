"""mmpt's tokenizer.json as a Hugging Face `PreTrainedTokenizerFast` directory (tokenizer.json,
tokenizer_config.json, special_tokens_map.json), so `AutoTokenizer.from_pretrained(DIR)` gives the ids mmpt
trained on: the same normaliser, pre-tokeniser, model and [CLS] ... [SEP] post-processor; padding and
truncation become call arguments (`padding="max_length", max_length=..., truncation=True`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpt.engine.config import ConfigError


def save_hf_tokenizer(tokenizer_file: Path, model_cfg: Any, out_dir: Path) -> None:
    """Write the HF tokenizer files for `tokenizer_file` into `out_dir`; its special ids must be the model's."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from mmpt.data.tokenizer import SPECIAL_NAMES, TextTokenizer

    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
    ids = TextTokenizer(Tokenizer.from_file(str(tokenizer_file)), model_cfg.text.max_text_len)
    want = {"pad": ids.pad_id, "bos": ids.bos_id, "eos": ids.eos_id}
    for role, have in want.items():
        if model_cfg.tokens.id(role) != have:
            raise ConfigError(f"tokenizer {tokenizer_file} has {role} id {have}, the model {model_cfg.tokens.id(role)}: "
                              "export with the tokenizer the model was trained with")
    raw = Tokenizer.from_file(str(tokenizer_file))
    raw.no_padding()
    raw.no_truncation()
    special: dict[str, str] = {f"{role}_token": raw.id_to_token(i) for role, i in want.items()}
    if ids.mask_id is not None:
        special["mask_token"] = raw.id_to_token(ids.mask_id)
    unk = next((n for n in ("[UNK]", "<unk>", "<|unk|>") if raw.token_to_id(n) is not None), None)
    if unk is not None:
        special["unk_token"] = unk
    if special["bos_token"] in SPECIAL_NAMES["bos"][:1]:  # BERT layout: [CLS] / [SEP] are also cls / sep
        special.update(cls_token=special["bos_token"], sep_token=special["eos_token"])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=model_cfg.text.max_text_len,
                                   padding_side="right", **special)
    fast.save_pretrained(str(out_dir))
