"""`mmpt.load(PATH)`: a trained model, its tokenizer and its eval preprocessing, for notebooks and scripts.

PATH is a run dir, a checkpoint tag dir or an `mmpt-export` dir. No process group, no DeepSpeed engine.
Everything goes through the code evaluation uses (the eval transform, `mmpt.eval.zeroshot.class_weights`),
so `zero_shot` here and `mmpt-eval eval.zeroshot...` give the same numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from mmpt.data.tokenizer import TextTokenizer, load_tokenizer
from mmpt.data.transforms import EvalTransform
from mmpt.engine.saved_model import build_saved_model, read_saved
from mmpt.eval import zeroshot
from mmpt.models.protocol import has_capability

Images = Sequence[Image.Image] | Image.Image | torch.Tensor
DEFAULT_BATCH = 256


class LoadedModel:
    """A trained mmpt model ready for inference.

    `.model` (eval mode, on `device` in `dtype`), `.config` (the full train config, an OmegaConf DictConfig),
    `.tokenizer` (`TextTokenizer`), `.preprocess` (PIL image -> `c h w` tensor: the eval transform).
    Embeddings are L2-normalised fp32 on the CPU. `batch_size` (the run's eval.zeroshot.batch_size, 256 by
    default) is how many images or prompts go through the model at once, exactly as `mmpt-eval` chunks them.
    """

    def __init__(self, model: nn.Module, config: DictConfig, tokenizer: TextTokenizer, preprocess: EvalTransform,
                 device: torch.device, dtype: torch.dtype | None, source: Path):
        self.model, self.config, self.tokenizer, self.preprocess = model, config, tokenizer, preprocess
        self.device, self.dtype, self.source = device, dtype, source
        self.batch_size = int(OmegaConf.select(config, "eval.zeroshot.batch_size", default=DEFAULT_BATCH))

    def __repr__(self) -> str:
        return f"LoadedModel({self.config.model.arch}, source={str(self.source)!r}, device={self.device})"

    # ---- inputs -----------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), each `b l` (padded to the model's text length)."""
        return self.tokenizer(list(texts))

    def pixels(self, images: Images) -> torch.Tensor:
        """PIL image(s) -> `b c h w` through `preprocess`; a tensor is taken as already preprocessed."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"an image tensor must be `b c h w` (preprocessed), got shape {tuple(images.shape)}")
            return images
        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images])

    # ---- embeddings and scores --------------------------------------------------------------------------
    def encode_image(self, images: Images) -> torch.Tensor:
        """`b e` image embeddings."""
        return zeroshot.encode_images(self.model, self.pixels(images), self.device, self.dtype, self.batch_size)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """`b e` text embeddings."""
        ids, mask = self.tokenize(texts)
        out = [self.model.encode_text(ids[i: i + self.batch_size].to(self.device),
                                      mask[i: i + self.batch_size].to(self.device)).float().cpu()
               for i in range(0, len(ids), self.batch_size)]
        return torch.cat(out)

    def class_weights(self, classnames: Sequence[str], templates: Sequence[str] | str | None = None) -> torch.Tensor:
        """`e k` zero-shot classifier: templates = a list, a shipped set name / file, or None (the config's
        eval.zeroshot.templates, `default` unless the run set another)."""
        if templates is None:
            templates = str(OmegaConf.select(self.config, "eval.zeroshot.templates", default="default"))
        if isinstance(templates, str):
            templates = zeroshot.load_templates(templates)
        return zeroshot.class_weights(self.model, self.tokenizer, list(classnames), list(templates), self.device,
                                      self.batch_size).cpu()

    def zero_shot(self, images: Images, classnames: Sequence[str],
                  templates: Sequence[str] | str | None = None) -> torch.Tensor:
        """`n_images x n_classes` cosine scores (argmax = predicted class), CLIP's prompt-ensemble protocol."""
        return zeroshot.scores(self.encode_image(images), self.class_weights(classnames, templates))

    @torch.no_grad()
    def itm_score(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """Match probability `b` of image i with text i (one image or one text is paired with every other)."""
        if not has_capability(self.model, "itm_score"):
            raise AttributeError(f"{self.config.model.arch} with objectives {list(self.model.objectives)} has no ITM head")
        pixels = self.pixels(images)
        ids, mask = self.tokenize(texts)
        n = max(len(pixels), len(ids))
        if len(pixels) not in (1, n) or len(ids) not in (1, n):
            raise ValueError(f"itm_score pairs image i with text i: got {len(pixels)} images and {len(ids)} texts")
        pixels, ids, mask = (x.expand(n, *x.shape[1:]) for x in (pixels, ids, mask))
        return self.model.itm_score(pixels.to(self.device, self.dtype), ids.to(self.device), mask.to(self.device)).float().cpu()

    @torch.no_grad()
    def generate(self, images: Images, max_len: int = 20, strategy: str = "greedy", num_beams: int = 3,
                 **kwargs: Any) -> list[str]:
        """Captions of the images (models with a decoder: CoCa)."""
        if not has_capability(self.model, "generate"):
            raise AttributeError(f"{self.config.model.arch} with objectives {list(self.model.objectives)} cannot generate")
        pixels = self.pixels(images).to(self.device, self.dtype)
        ids = self.model.generate(pixels, max_len=max_len, strategy=strategy, num_beams=num_beams, **kwargs)
        return [self.tokenizer.decode(row) for row in ids.cpu().tolist()]


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """A run dir (its newest complete checkpoint), a checkpoint tag dir, or an `mmpt-export` dir -> LoadedModel."""
    saved = read_saved(path)
    model = build_saved_model(saved)
    model.to(device=torch.device(device), dtype=dtype).eval()
    data = saved.config.data
    tokenizer = load_tokenizer(str(saved.tokenizer_file), int(data.max_text_len))
    preprocess = EvalTransform(int(data.image_size), mean=list(data.mean), std=list(data.std))
    return LoadedModel(model, saved.config, tokenizer, preprocess, torch.device(device), dtype, saved.source)
