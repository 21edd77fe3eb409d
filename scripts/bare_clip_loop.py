"""A bare PyTorch CLIP loop on mmpt shards, as a calibration point for the tiny presets (issue 11, session 9).

Two 64-wide x 2-block `nn.TransformerEncoder` towers with PyTorch's default (fan-in) init, [CLS] pooling, 64-d
ITC from temperature 0.07, AdamW (lr 1e-3, wd 0.05, betas 0.9/0.98), 100 warm-up steps then cosine, batch 64
drawn with replacement from the decoded train set held in memory; prints the loss every 100 steps and the t2i
R@1 (caption identity / pair) on the eval shards at the end. It shares only the tokenizer with mmpt.

    python scripts/bare_clip_loop.py --data /tmp/mmpt_alt --image-size 32 --patch 8 --steps 1000
"""
from __future__ import annotations

import argparse
import glob
import io
import math
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmpt.data.tokenizer import TextTokenizer, load_tokenizer

WIDTH, LAYERS, HEADS, EMBED, BATCH, MAX_LEN = 64, 2, 2, 64, 64, 24


def load_pairs(pattern: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """Every (jpg, txt) pair of the shards: images `n 3 size size` standardised per channel, captions."""
    images, captions = [], []
    for shard in sorted(glob.glob(pattern)):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key in sorted(samples):
            image = Image.open(io.BytesIO(samples[key]["jpg"])).convert("RGB").resize((size, size), Image.BICUBIC)
            images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
            captions.append(samples[key]["txt"].decode())
    x = torch.stack(images).float() / 255
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True), captions


class Tower(nn.Module):
    """Tokens `b n d` -> L2-normalised `b e` from a prepended [CLS] (padding masked as keys)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, num_tokens + 1, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, 0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.proj = nn.Linear(WIDTH, EMBED, bias=False)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos[:, : x.shape[1] + 1]
        if padding is not None:
            padding = torch.cat([torch.zeros(len(x), 1, dtype=torch.bool), padding], 1)
        return F.normalize(self.proj(self.norm(self.blocks(x, src_key_padding_mask=padding))[:, 0]), dim=-1)


class BareCLIP(nn.Module):
    def __init__(self, vocab_size: int, image_size: int, patch: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, WIDTH, patch, patch)
        self.visual = Tower((image_size // patch) ** 2)
        self.embed = nn.Embedding(vocab_size, WIDTH)
        self.text = Tower(MAX_LEN)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.patch(images).flatten(2).transpose(1, 2))  # `b d h w` -> `b (h w) d`

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(self.embed(ids), padding=mask == 0)


def t2i_r1(model: BareCLIP, images: torch.Tensor, tok: TextTokenizer, captions: list[str]) -> tuple[float, float]:
    """Text->image R@1 by caption identity (the top image's caption equals the query) and by exact pair."""
    with torch.no_grad():
        model.eval()
        ids, mask = tok(captions)
        top = (model.encode_text(ids, mask) @ model.encode_image(images).T).argmax(1).tolist()
    by_caption = float(np.mean([captions[j] == captions[i] for i, j in enumerate(top)]))
    return by_caption, float(np.mean([j == i for i, j in enumerate(top)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with train/*.tar, eval/*.tar, tokenizer.json")
    ap.add_argument("--image-size", type=int, default=32, help="images are resized to this (the shards hold 64 px)")
    ap.add_argument("--patch", type=int, default=8, help="patch size of the ViT")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0, help="torch seed")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    tok = load_tokenizer(f"{args.data}/tokenizer.json", MAX_LEN)
    train_x, train_c = load_pairs(f"{args.data}/train/*.tar", args.image_size)
    eval_x, eval_c = load_pairs(f"{args.data}/eval/*.tar", args.image_size)
    ids, mask = tok(train_c)
    model = BareCLIP(tok.vocab_size, args.image_size, args.patch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    labels = torch.arange(BATCH)
    for step in range(args.steps):
        rows = torch.randint(0, len(train_x), (BATCH,))
        logits = model.logit_scale.exp().clamp(max=100) * model.encode_image(train_x[rows]) @ \
            model.encode_text(ids[rows], mask[rows]).T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    caption, pair = t2i_r1(model, eval_x, tok, eval_c)
    print(f"t2i R@1 caption {caption:.3f} pair {pair:.3f}")


if __name__ == "__main__":
    main()
