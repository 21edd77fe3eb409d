"""ALBEF: protocol, gradients, losses at init, momentum teacher + alpha + queues, padding invariance, ITM
scores, a tiny overfit, the no-momentum path, presets (Hydra + meta-device base size), FLOPs, ITC-only
objectives (no fusion side, and the FLOPs that saves), 2 processes."""
from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmpt.cli.common import CONF_DIR
from mmpt.data.batch import Batch
from mmpt.engine.config import resolve, typed_config
from mmpt.engine.optim import param_groups
from mmpt.distributed import gather_rows
from mmpt.models.albef import ALBEF, ALBEFConfig, build_albef
from mmpt.models.momentum import MomentumConfig, MomentumTeacher
from mmpt.models.protocol import ModelOutput, PretrainModel
from mmpt.models.registry import build_model, preset_config
from mmpt.objectives.itc import ContrastiveLoss
from mmpt.objectives.itc_distill import alpha_at
from mmpt.objectives.queue import FeatureQueue
from tests.dist_helpers import run_ranks

B, L, VOCAB, QUEUE = 8, 16, 100, 64


def tiny_config(
    momentum: bool = True, queue: int = QUEUE, temperature_init: float = 0.07, **overrides: object
) -> ALBEFConfig:
    """The `tiny` preset (64 wide ViT x 2, 1 text + 1 fusion layer, ALBEF's temperature clamp [0.001, 0.5])
    at 32 px, 100 tokens of vocabulary, 16 positions and 32-d ITC; the momentum teacher on by default."""
    mom = {"enabled": momentum, "queue_size": queue, "alpha_warmup_steps": 10, "decay": 0.9}
    return preset_config(  # type: ignore[no-any-return]
        "albef", "tiny", vision={"image_size": 32}, text={"vocab_size": VOCAB, "max_text_len": L},
        contrastive={"embed_dim": 32, "temperature_init": temperature_init}, momentum=mom, **overrides,
    )  # fmt: skip


def make_batch(
    seed: int = 0, b: int = B, image_ids: list[str] | None = None, length: int = L, image_size: int = 32,
    vocab: int = VOCAB,
) -> Batch:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    lengths[0] = length  # one full-length caption: every position embedding is used
    mask = (torch.arange(length)[None] < lengths[:, None]).long()  # right padding, 1 = real token
    ids = ids.masked_fill(mask == 0, 0)
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(b), lengths - 1] = 3  # [SEP]
    return Batch(images=torch.randn(b, 3, image_size, image_size, generator=g), input_ids=ids, attention_mask=mask,
                 image_ids=image_ids or [])  # fmt: skip


def build(momentum: bool = True, seed: int = 0, queue: int = QUEUE, **overrides: object) -> ALBEF:
    torch.manual_seed(seed)
    return build_albef(tiny_config(momentum, queue, **overrides))


def total(out: ModelOutput) -> torch.Tensor:
    return sum(out.losses.values())  # type: ignore[return-value]


# ---- protocol, config, presets --------------------------------------------------------------------------

def test_protocol_and_registry() -> None:
    model = build()
    assert isinstance(model, PretrainModel) and model.objectives == ("itc", "itm", "mlm")
    assert model.data_kinds == ("pairs",) and model.capabilities == frozenset({"itm_score"})
    assert model.default_loss_weights == {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    built = build_model({"arch": "albef", "text": {"vocab_size": VOCAB, "max_text_len": L},
                         "momentum": {"enabled": True, "queue_size": 16}})  # fmt: skip
    assert isinstance(built, ALBEF) and built.config.momentum.enabled and built.itc.image_queue.size == 16
    assert built.config.text.vocab_size == VOCAB and built.config.text.width == 64  # the rest: the field defaults
    # A partial nested override starts from the field's default (momentum off unless enabled)
    assert ALBEFConfig(momentum={"queue_size": 16}).momentum == MomentumConfig(queue_size=16)
    assert ALBEFConfig(objectives=[]).objectives == ["itc", "itm", "mlm"]  # empty = the arch default
    out = model(make_batch(image_ids=[f"img{i % 4}" for i in range(B)]))
    assert set(out.losses) == {"itc", "itm", "mlm"} and all(v.ndim == 0 for v in out.losses.values())
    assert {"itc_acc", "temperature", "itm_acc", "mlm_acc", "distill_alpha"} <= set(out.metrics)
    assert all(not v.requires_grad and v.ndim == 0 for v in out.metrics.values())


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"vision": {"image_size": 30}}, r"multiple of vision\.patch_size"),
        ({"text": {"width": 30, "heads": 4}}, r"divisible by text\.heads"),
        ({"fusion_layers": 0}, "fusion_layers=0 must be >= 1"),
        ({"contrastive": {"temperature_init": 0.9, "max_temperature": 0.5}}, "temperature_init <= max_temperature"),
        ({"mlm": {"mask_prob": 0.0}}, r"mlm\.mask_prob"),
        ({"tokens": {"eos": 3, "mask": 3}}, "distinct"),
        ({"tokens": {"mask": 100}, "text": {"vocab_size": 100}}, r"tokens\.mask=100 must be in \[0, vocab_size=100\)"),
        ({"momentum": {"alpha": 1.5}}, "momentum.alpha"),
        ({"momentum": {"queue_size": 0}}, "queue_size"),
        ({"objectives": ["itc", "itc"]}, "distinct"),
        ({"objectives": ["itc", "caption"]}, "objectives"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match="invalid albef config") as info:
        ALBEFConfig(**overrides)
    info.match(match)


def composed_model(preset: str, overrides: list[str]) -> ALBEFConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}", *overrides])
    return typed_config(resolve(cfg)).model  # type: ignore[return-value]


def test_presets_compose() -> None:
    tiny = composed_model("albef/tiny", ["data.image_size=32"])
    assert isinstance(tiny, ALBEFConfig)
    assert (tiny.vision.image_size, tiny.vision.width, tiny.contrastive.embed_dim) == (32, 64, 64)
    assert (tiny.text.layers, tiny.fusion_layers, tiny.objectives) == (2, 2, ["itc", "itm", "mlm"])
    assert (tiny.contrastive.min_temperature, tiny.contrastive.max_temperature) == (0.001, 0.5)  # ALBEF's clamp
    # the tiny defaults measured on data no preset was tuned on (RESULTS.md, issue 11)
    assert tiny.contrastive.temperature_init == 0.03 and tiny.contrastive.duplicate_positives
    assert tiny.itm.hardness_warmup_steps == 1000 and tiny.loss_weights == {"itm": 0.25, "mlm": 0.25}
    # tiny: no momentum teacher unless turned on; its queue settings are the preset's
    assert not tiny.momentum.enabled and tiny.momentum.queue_size == 1024 and tiny.momentum.alpha_warmup_steps == 200
    on = composed_model("albef/tiny", ["data.image_size=32", "model.momentum.enabled=true", "model.objectives=[itc]"])
    assert on.momentum.enabled and on.momentum.queue_size == 1024 and on.objectives == ["itc"]
    base = composed_model("albef/base", ["data.image_size=256", "tokenizer.vocab_size=30522", "data.max_text_len=30"])
    assert base == preset_config("albef", "base")
    assert base.momentum.enabled and base.text.norm_first is False and base.fusion_layers == 6


def test_base_parameter_count_on_meta() -> None:
    """Paper: ViT-B/16 85.8M + BERT text tower with cross-attention 123.7M = 209.5M, + two 768->256 ITC
    projections. Ours has 30 text positions (BERT: 512) and no BERT pooler; the MLM head is tied."""
    with torch.device("meta"):
        model = build_albef(preset_config("albef", "base"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    student = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    assert student == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert student == pytest.approx(209.5e6 + 2 * 768 * 256, rel=0.01), student
    assert count(model.visual) == pytest.approx(85.8e6, rel=0.001)
    assert count(model.text.encoder) + count(model.text.fusion) + count(model.text.fusion_norm) == pytest.approx(122.7e6, rel=0.001)
    assert model.teacher is not None and model.itc.image_queue.size == 65536


# ---- gradients, optimizer groups, losses ----------------------------------------------------------------

def test_forward_backward_reaches_every_trainable_parameter_only() -> None:
    model = build()
    total(model(make_batch())).backward()
    assert model.teacher is not None
    teacher = {id(p) for p in model.teacher.parameters()}
    for name, p in model.named_parameters():
        if id(p) in teacher:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimised = {id(p) for group in param_groups(model, 0.02) for p in group["params"]}
    assert optimised.isdisjoint(teacher)
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    # The MLM head is tied to the word embeddings, in the student and (separately) in the teacher copy.
    assert model.text.mlm_head.decoder.weight is model.text.encoder.embed.token_embed.weight
    t_text = model.teacher["text"]
    assert t_text.mlm_head.decoder.weight is t_text.encoder.embed.token_embed.weight
    assert t_text.mlm_head.decoder.weight is not model.text.mlm_head.decoder.weight


@pytest.mark.parametrize("momentum", [False, True])
def test_losses_at_init(momentum: bool) -> None:
    model = build(momentum)
    losses = {k: v.item() for k, v in model(make_batch()).losses.items()}
    if not momentum:
        assert abs(losses["itc"] - math.log(B)) < 0.5, losses
    assert abs(losses["itm"] - math.log(2)) < 0.15, losses  # ~uniform 2-way head
    assert abs(losses["mlm"] - math.log(VOCAB)) < 0.3, losses  # ~uniform over the vocabulary


def test_distilled_itc_at_init_matches_hand_computation() -> None:
    """Step 0: alpha = 0 and the teacher equals the student, so ITC is plain InfoNCE of the student rows
    against [teacher batch ; queue]. The queue holds random unit vectors whose logits at temperature 0.07
    spread widely, so the loss is not ln(B + QUEUE); at the hottest allowed temperature (0.5) it is close."""
    for temperature, tol in ((0.07, 1e-5), (0.5, 1e-5)):
        model = build(temperature_init=temperature)
        batch = make_batch()
        q_img, q_txt = model.itc.image_queue.feats.clone(), model.itc.text_queue.feats.clone()
        with torch.no_grad():
            img, txt = model.encode_image(batch.images), model.encode_text(batch.input_ids, batch.attention_mask)
        labels = torch.arange(B)
        s = 1 / temperature
        want = 0.5 * (torch.nn.functional.cross_entropy(s * img @ torch.cat([txt, q_txt]).T, labels)
                      + torch.nn.functional.cross_entropy(s * txt @ torch.cat([img, q_img]).T, labels))  # fmt: skip
        got = model(batch).losses["itc"]
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert abs(got.item() - math.log(B + QUEUE)) < 0.5, got


# ---- momentum teacher, alpha, queues, checkpoint state ---------------------------------------------------

def test_after_optimizer_step_moves_teacher_by_ema_and_advances_alpha() -> None:
    model = build()
    assert model.teacher is not None
    student, teacher = model.text.fusion.blocks[0].cross_attn.kv.weight, model.teacher["text"].fusion.blocks[0].cross_attn.kv.weight
    t0 = teacher.detach().clone()
    torch.testing.assert_close(t0, student.detach())  # the teacher starts as a copy
    assert model.distill_alpha().item() == 0.0
    with torch.no_grad():
        student.add_(torch.randn_like(student))  # stands in for an optimizer step
    s1 = student.detach().clone()
    model.after_optimizer_step(3)
    torch.testing.assert_close(teacher, 0.9 * t0 + 0.1 * s1)  # momentum 0.9 in tiny_config
    assert model.step.item() == 3
    assert model.distill_alpha().item() == pytest.approx(alpha_at(3, 0.4, 10))
    assert model(make_batch()).metrics["distill_alpha"].item() == pytest.approx(0.12)
    model.after_optimizer_step(25)
    assert model.distill_alpha().item() == pytest.approx(alpha_at(25, 0.4, 10)) == pytest.approx(0.4)


def teacher_text_feats(model: ALBEF, batch: Batch) -> torch.Tensor:
    assert model.teacher is not None
    with torch.no_grad():
        tokens = model.teacher["text"].encode(batch.input_ids, batch.attention_mask)
        return torch.nn.functional.normalize(model.teacher["text_proj"](tokens[:, 0]), dim=-1)


def test_queue_fills_across_steps_and_state_dict_resumes() -> None:
    model = build()
    queue: FeatureQueue = model.itc.text_queue
    b1, b2 = make_batch(1), make_batch(2)
    model(b1)
    torch.testing.assert_close(queue.feats[:B], teacher_text_feats(model, b1))
    model.after_optimizer_step(1)
    model(b2)
    assert queue.ptr.item() == 2 * B and model.itc.image_queue.ptr.item() == 2 * B
    torch.testing.assert_close(queue.feats[B : 2 * B], teacher_text_feats(model, b2))
    torch.testing.assert_close(queue.feats[:B], teacher_text_feats(build(), b1))  # older rows untouched
    model.after_optimizer_step(2)
    # Resume: step (alpha), queues and teacher all live in the state dict.
    state = model.state_dict()
    assert {"step", "itc.text_queue.feats", "itc.text_queue.ptr", "teacher.teachers.visual.patch_embed.pos_embed"} <= set(state)
    resumed = build(seed=1)
    resumed.load_state_dict(state)
    assert resumed.step.item() == 2 and resumed.distill_alpha().item() == pytest.approx(alpha_at(2, 0.4, 10))
    torch.testing.assert_close(resumed.itc.text_queue.feats, queue.feats)
    torch.testing.assert_close(teacher_text_feats(resumed, b1), teacher_text_feats(model, b1))


def test_momentum_disabled_path() -> None:
    model = build(momentum=False)
    assert model.teacher is None and isinstance(model.itc, ContrastiveLoss) and not hasattr(model.itc, "text_queue")
    keys = set(model.state_dict())
    assert not any(k.startswith("teacher") or "queue" in k for k in keys)
    assert not any(isinstance(m, MomentumTeacher) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.after_optimizer_step(5)  # only the step counter moves (ITM curriculum)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k != "step")
    assert int(model.step[0]) == 5
    out = model(make_batch())
    assert "distill_alpha" not in out.metrics
    total(out).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- encoders, ITM scores, training ----------------------------------------------------------------------

def test_encodings_normalized_and_padding_invariant() -> None:
    model = build().eval()
    batch = make_batch()
    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.input_ids, batch.attention_mask)
    assert img.shape == txt.shape == (B, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))
    pad = batch.attention_mask == 0
    assert pad.any()
    other = batch.input_ids.clone()
    other[pad] = torch.randint(5, VOCAB, (int(pad.sum()),))
    torch.testing.assert_close(model.encode_text(other, batch.attention_mask), txt)
    torch.testing.assert_close(
        model.itm_score(batch.images, other, batch.attention_mask),
        model.itm_score(batch.images, batch.input_ids, batch.attention_mask),
    )
    changed = batch.input_ids.clone()
    changed[:, 1] = (changed[:, 1] + 1) % VOCAB
    assert not torch.allclose(model.encode_text(changed, batch.attention_mask), txt)


def test_itm_score_shape_and_range() -> None:
    model = build().eval()
    batch = make_batch()
    scores = model.itm_score(batch.images, batch.input_ids, batch.attention_mask)
    assert scores.shape == (B,) and ((scores > 0) & (scores < 1)).all()
    # Row-aligned: scoring one pair alone gives the same number.
    one = model.itm_score(batch.images[2:3], batch.input_ids[2:3], batch.attention_mask[2:3])
    torch.testing.assert_close(one, scores[2:3])


@pytest.mark.parametrize("momentum, steps, ratio", [(False, 30, 0.75), (True, 40, 0.9)])
def test_adamw_steps_reduce_total_loss(momentum: bool, steps: int, ratio: float) -> None:
    """A fixed batch: with momentum the queue (here one global batch) refills with copies of the same pairs,
    which caps how low ITC can go, hence the looser bound (measured ratios ~0.61 and ~0.77-0.81)."""
    model = build(momentum, queue=B)
    batch = make_batch(image_ids=[f"img{i}" for i in range(B)])
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # reproducible MLM masks and hard negatives
        loss = total(model(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_optimizer_step(step + 1)
        losses.append(loss.item())
    assert sum(losses[-3:]) < ratio * sum(losses[:3]), losses
    if momentum:
        assert model.step.item() == steps and model.distill_alpha().item() == pytest.approx(0.4)


@pytest.mark.parametrize("momentum", [False, True])
def test_flops_per_sample_matches_flop_counter(momentum: bool) -> None:
    model = build(momentum)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the math backend's bmm's are what the counter sees
        total(model(make_batch(b=4))).backward()
    assert counter.get_total_flops() / 4 == pytest.approx(model.flops_per_sample(batch_size=4), rel=0.01)


# ---- two processes ------------------------------------------------------------------------------------

WORLD = 2


def global_image_ids() -> list[str]:
    return [f"img{i % 6}" for i in range(B)]  # rows 6, 7 (rank 1) show the images of rows 0, 1 (rank 0)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = build()  # same seed on every rank: same weights and the same initial queues
        full = make_batch(image_ids=global_image_ids())
        b = B // world
        rows = slice(rank * b, (rank + 1) * b)
        local = Batch(full.images[rows], full.input_ids[rows], full.attention_mask[rows], image_ids=full.image_ids[rows])
        opt = torch.optim.SGD(param_groups(model, 0.0), lr=0.1)
        torch.manual_seed(100 + rank)  # ranks draw different masks / negatives, as in training
        out = model(local)
        total(out).backward()
        for p in model.parameters():  # what DeepSpeed does: average gradients over ranks
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        model.after_optimizer_step(1)
        # gather_rows: values of the global rows, gradient only into this rank's own rows.
        glob = torch.arange(B * 3, dtype=torch.float64).reshape(B, 3)
        mine = glob[rows].clone().requires_grad_()
        index = torch.tensor([0, 5, 3, 6, 1, 5])
        picked = gather_rows(mine, index)
        picked.sum().backward()
        torch.save(
            {
                "losses": {k: v.detach() for k, v in out.losses.items()},
                "queues": {k: v.clone() for k, v in model.state_dict().items() if "queue" in k},
                "teacher": {k: v.clone() for k, v in model.teacher.state_dict().items()},  # type: ignore[union-attr]
                "picked": picked.detach(), "picked_grad": mine.grad,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_forward(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, WORLD)
    for r in ranks:
        assert all(torch.isfinite(v) for v in r["losses"].values()), r["losses"]
    # Queues: identical on both ranks, and holding the teacher features of the whole global batch in rank order.
    for key, value in ranks[0]["queues"].items():
        torch.testing.assert_close(ranks[1]["queues"][key], value, rtol=0, atol=0, msg=key)
    reference = build()
    full = make_batch(image_ids=global_image_ids())
    torch.testing.assert_close(ranks[0]["queues"]["itc.text_queue.feats"][:B], teacher_text_feats(reference, full))
    torch.testing.assert_close(ranks[0]["queues"]["itc.text_queue.feats"][B:], reference.itc.text_queue.feats[B:])
    assert ranks[0]["queues"]["itc.image_queue.ptr"].item() == B
    # Averaged gradients -> identical students -> identical teachers after the EMA step.
    for key, value in ranks[0]["teacher"].items():
        torch.testing.assert_close(ranks[1]["teacher"][key], value, rtol=0, atol=0, msg=key)
    # gather_rows: rank 0 owns rows 0-3, rank 1 rows 4-7; index [0, 5, 3, 6, 1, 5].
    glob = torch.arange(B * 3, dtype=torch.float64).reshape(B, 3)
    for r in ranks:
        torch.testing.assert_close(r["picked"], glob[[0, 5, 3, 6, 1, 5]])
    assert ranks[0]["picked_grad"][:, 0].tolist() == [1, 1, 0, 1]
    assert ranks[1]["picked_grad"][:, 0].tolist() == [0, 2, 1, 0]


def test_itm_hardness_ramps_from_uniform_to_albef() -> None:
    model = build(momentum=False)
    model.config.itm.hardness_warmup_steps = 0  # ALBEF's: hard from the start
    assert float(model.itm_hardness()) == 1.0
    model.config.itm.hardness_warmup_steps = 10
    model.after_optimizer_step(0)
    assert float(model.itm_hardness()) == 0.0
    model.after_optimizer_step(5)
    assert float(model.itm_hardness()) == pytest.approx(0.5)
    model.after_optimizer_step(50)
    assert float(model.itm_hardness()) == 1.0


@pytest.mark.parametrize("momentum", [False, True])
def test_fusion_grads_to_encoders_false_leaves_the_encoders_to_itc(momentum: bool) -> None:
    """ITM + MLM backward: with the switch off, no unimodal encoder weight gets a gradient except the word
    embeddings (tied to the MLM output layer); the fusion layers and heads still learn. On: the encoders learn."""

    def grads(model: ALBEF) -> dict[str, float]:
        out = model(make_batch(b=4))
        (out.losses["itm"] + out.losses["mlm"]).backward()
        return {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0
                for n, p in model.named_parameters() if p.requires_grad}

    on = grads(build(momentum))
    off = grads(build(momentum, fusion_grads_to_encoders=False))
    assert set(on) == set(off)
    encoders = [n for n in off if n.startswith(("visual.", "text.encoder."))]
    tied = "text.encoder.embed.token_embed.weight"
    assert encoders and tied in encoders
    assert all(off[n] == 0.0 for n in encoders if n != tied) and off[tied] > 0
    assert sum(on[n] > 0 for n in encoders if n != tied) >= len(encoders) - 2  # e.g. an unused pos row
    fusion = [n for n in off if n.startswith(("text.fusion.", "itm_head.", "text.mlm_head."))]
    assert fusion and all(off[n] > 0 for n in fusion)


# ---- objectives: ITC only ---------------------------------------------------------------------------------

def test_objectives_must_include_itc() -> None:
    """ITM mines its hard negatives by ITC similarity, so ALBEF refuses objective sets without itc."""
    for objectives in (["itm"], ["mlm"], ["itm", "mlm"]):
        with pytest.raises(ValueError, match="invalid albef config: .*must include itc"):
            ALBEFConfig(objectives=objectives)
    with pytest.raises(ValueError, match="must include itc"):
        preset_config("albef", "tiny", objectives=["itm"])


@pytest.mark.parametrize("momentum", [False, True])
def test_itc_only_builds_no_fusion_side(momentum: bool) -> None:
    """objectives=[itc]: no fusion layers, ITM head or MLM head (parameters, state dict, teacher copy), no
    itm_score (it refuses; GradCache only without a teacher), and forward returns the ITC loss only, with gradients
    to every parameter."""
    model = build(momentum, objectives=["itc"])
    assert model.objectives == ("itc",) and model.capabilities == (frozenset() if momentum else {"grad_cache"})
    assert model.text.fusion is None and model.itm_head is None and model.text.mlm_head is None
    assert isinstance(model.text.fusion_norm, torch.nn.Identity)
    parts = ("fusion", "itm_head", "mlm_head")
    assert not any(part in key for key in model.state_dict() for part in parts), sorted(model.state_dict())
    full = build(momentum)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    batch = make_batch(image_ids=[f"img{i}" for i in range(B)])
    with pytest.raises(ValueError, match="itm"):
        model.itm_score(batch.images, batch.input_ids, batch.attention_mask)
    out = model(batch)
    assert set(out.losses) == {"itc"} and torch.isfinite(out.losses["itc"])
    assert not {"itm_acc", "mlm_acc"} & set(out.metrics) and "itc_acc" in out.metrics
    assert ("distill_alpha" in out.metrics) == momentum
    total(out).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), [
        n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]


def quickstart_step_flops(objectives: list[str], b: int = B) -> tuple[float, float]:
    """FLOPs of one training step (forward + backward of one batch) of the quickstart's ALBEF geometry
    (`experiment=albef_tiny`: the tiny preset with 2 text + 2 fusion layers, 64 px, 24 tokens, momentum off)
    counted by FlopCounterMode, and the model's own flops_per_sample x batch."""
    torch.manual_seed(0)
    cfg = preset_config("albef", "tiny", objectives=objectives, text={"layers": 2, "max_text_len": 24},
                        fusion_layers=2, contrastive={"duplicate_positives": True})  # fmt: skip
    assert not cfg.momentum.enabled and cfg.vision.image_size == 64
    model = build_albef(cfg)
    ids = [f"img{i}" for i in range(b)]
    batch = make_batch(b=b, length=24, image_size=64, vocab=cfg.text.vocab_size, image_ids=ids)
    counter = FlopCounterMode(display=False)
    torch.manual_seed(1)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the math backend's bmm's are what the counter sees
        total(model(batch)).backward()
    return float(counter.get_total_flops()), b * model.flops_per_sample(batch_size=b)


def test_itc_only_step_costs_at_most_60_percent_of_the_full_step() -> None:
    """The issue's requirement: `model.objectives=[itc]` on ALBEF skips the fusion side, so its training step
    costs at most 60% of the FLOPs of the full [itc, itm, mlm] step at the same size (measured: 0.34)."""
    itc, itc_declared = quickstart_step_flops(["itc"])
    full, full_declared = quickstart_step_flops(["itc", "itm", "mlm"])
    ratio = itc / full
    print(f"ALBEF quickstart geometry, batch {B}: itc-only {itc:.4g} FLOPs, full {full:.4g} FLOPs, ratio {ratio:.3f}")
    assert ratio <= 0.6, (itc, full, ratio)
    # flops_per_sample (MFU) follows the objectives too
    assert itc_declared == pytest.approx(itc, rel=0.01) and full_declared == pytest.approx(full, rel=0.01)
