"""ITM leaves its prior: tiny VLMo and tiny ALBEF, trained on ITC + ITM with uniform negatives over a fixed set of
64 synthetic scenes (the demo generator, 32 px), push the ITM loss well below the 1/3-prior cross-entropy.

A regression guard for the whole ITM path of both models (negative rows, labels, the pooled fused token, the
head and its gradients): wiring that hides the pairing from the ITM head leaves the loss at the prior
ln(3) - 2/3 ln(2) = 0.6365. Checked by hand: negative rows that are the positives themselves (both models), and
VLMo text tokens that cannot attend to the image tokens in the fused pass, both stay at 0.636-0.637 for all 200
steps; the code as is ends at 0.33 (VLMo) and 0.40 (ALBEF).

Uniform negatives: the models' step buffer stays 0 (after_optimizer_step is never called) with a hardness
ramp, so `hard_negative_rows` draws uniformly among the allowed rows (never the same image id or an identical
caption; the synthetic captions repeat by design).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmpt.data.batch import Batch
from mmpt.data.synthetic import caption_for, draw_scene, sample_rng, sample_scene
from mmpt.models.albef import ALBEF, ALBEFConfig
from mmpt.models.vlmo import VLMo, VLMoConfig
from tests.test_vlmo import one_thread  # noqa: F401  (autouse: one intra-op thread, as in test_vlmo)

PRIOR = math.log(3) - 2 / 3 * math.log(2)  # CE of the constant prediction p(match) = 1/3: 0.6365
N_PAIRS, IMG, L = 64, 32, 16
# Leaving the prior is a plateau escape whose length depends on the initialisation: VLMo (seeds 0/1/2) first
# went below 0.6 at step 94/82/78 and averaged 0.494/0.296/0.321 over steps 241-250. Seed 1 escapes early; the
# run is deterministic (fixed data, word-level ids, seeded init, masks and negatives).
SEED, STEPS = 1, 200


def make_scenes() -> tuple[Batch, int]:
    """64 synthetic pairs (seed 0) as one normalised batch, and the vocabulary size.

    Word-level ids from the sorted caption words (after the 5 special ids: [PAD] 0, [CLS] 2, [SEP] 3, [MASK] 4),
    [CLS] words [SEP], right-padded to L: deterministic, unlike a trained WordPiece vocabulary's tie order.
    """
    captions, pixels = [], []
    for i in range(N_PAIRS):
        rng = sample_rng(0, i)
        scene = sample_scene(rng, IMG)
        pixels.append(np.asarray(draw_scene(scene, rng, IMG), dtype=np.float32))
        captions.append(caption_for(scene))
    vocab = {w: 5 + k for k, w in enumerate(sorted({w for c in captions for w in c.split()}))}
    ids = torch.zeros(N_PAIRS, L, dtype=torch.long)
    for i, c in enumerate(captions):
        row = [2, *(vocab[w] for w in c.split()), 3]
        ids[i, : len(row)] = torch.tensor(row)
    mask = (ids != 0).long()
    images = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    batch = Batch(images=images, input_ids=ids, attention_mask=mask, image_ids=[f"s0-{i}" for i in range(N_PAIRS)],
                  captions=captions)  # fmt: skip
    return batch, 5 + len(vocab)


@pytest.fixture(scope="module")
def scenes() -> tuple[Batch, int]:
    return make_scenes()


def build(arch: str, vocab: int, seed: int = SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    grid, text = {"image_size": IMG, "patch_size": 8}, {"vocab_size": vocab, "max_text_len": L}
    itm = {"hardness_warmup_steps": 10**9}  # hardness stays 0 at step 0: uniform negatives
    if arch == "vlmo":  # the tiny preset's layout (mmpt/conf/model/vlmo/tiny.yaml), 32 wide
        multiway = {"width": 32, "layers": 2, "heads": 2, "vl_layers": 1, "type_embed": True, "norm_eps": 1e-6}
        return VLMo(VLMoConfig(multiway={**multiway, **grid, **text}, contrastive={"embed_dim": 32}, itm=itm))
    # the tiny preset's layout (1 text + 1 fusion layer, ALBEF's temperature clamp), 32 wide, no momentum
    tower = {"width": 32, "layers": 2, "heads": 2}
    contrastive = {"embed_dim": 32, "min_temperature": 0.001, "max_temperature": 0.5}
    return ALBEF(ALBEFConfig(vision={**tower, **grid}, text={**tower, "layers": 1, **text}, fusion_layers=1,
                             contrastive=contrastive, itm=itm, momentum={"enabled": False}))  # fmt: skip


@pytest.mark.slow  # a learning test: 200 AdamW steps per model
@pytest.mark.parametrize("arch", ["vlmo", "albef"])
def test_itm_leaves_the_prior_with_uniform_negatives(arch: str, scenes: tuple[Batch, int]) -> None:
    batch, vocab = scenes
    model = build(arch, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    itm = []
    for _ in range(STEPS):
        out = model(batch)
        opt.zero_grad()
        (out.losses["itc"] + out.losses["itm"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        itm.append(out.losses["itm"].item())
    assert float(model.step[0]) == 0.0  # negatives stayed uniform
    last = sum(itm[-10:]) / 10
    assert last < 0.5 < PRIOR, (arch, last, [round(v, 3) for v in itm[::10]])  # a wiring bug stays at PRIOR
