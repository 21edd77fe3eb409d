"""mmpt's training step vs its peers', in one process, at equal geometry (parameter counts printed).

    python scripts/bench/bench_vs_peers.py [--only clip,coca,beit3,albef] [--rounds 6] [--steps 4]
        [--batch 32] [--image-size 64] [--width 128] [--layers 4] [--threads 1] [--precision fp32|bf16] [--profile]

Pairs: CLIP and CoCa vs open_clip, BEiT-3's Multiway backbone vs torchscale, ALBEF's towers (ViT + text +
fusion layers) vs TorchMultimodal. A training step is forward + backward + optimizer step, each side at its
recommended settings: open_clip's models with its ClipLoss / CoCaLoss and torch.optim.AdamW as open_clip_train
builds it (decay groups, default implementation); mmpt's models with their own losses, stepped the way mmpt's
trainer steps them (the DeepSpeed engine built from mmpt's config with its defaults: one process at stage 0,
mmpt's `build_optimizer`, gradient clipping at 1.0, `engine_step.backward_and_step`, in bf16 the
multi-tensor step of `mmpt/engine/bf16_step.py`).
`--precision bf16` is each side's mixed-precision recipe: mmpt's `trainer.precision=bf16` (DeepSpeed bf16:
bf16 weights and activations, fp32 master weights, gradients and optimizer state); the peers' standard PyTorch
AMP (open_clip_train's `--precision amp_bf16`: `torch.autocast` in bf16 around forward and loss, fp32 weights
and optimizer). On CPUs with AMX (Sapphire Rapids and later) bf16 matrix multiplies run many times faster
than fp32, so the rest of the step weighs more. For BEiT-3 and ALBEF the bench puts the same small loss on both
backbones' outputs (a vocabulary head on the fused text tokens; ITC on the unimodal [CLS] + the fused [CLS]), so
only the backbones differ. Rounds alternate which side runs first; each prints samples/s (per wall-clock second and per
CPU second of the process), the medians are reported with the ratio mmpt / peer (> 1: mmpt is faster).

The peers are dev-time installs in a separate venv (open_clip needs torchvision; see docs/PERFORMANCE.md):
    python3.11 -m venv /work/bench_venv
    /work/bench_venv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 torchscale \
        torchmultimodal-nightly deepspeed==0.19.8 numpy iopath omegaconf hydra-core webdataset tokenizers einops
    PYTHONPATH=. /work/bench_venv/bin/python scripts/bench/bench_vs_peers.py [--precision bf16]
A peer that does not import prints a skip line. `--profile` prints torch.profiler's op table (self CPU
time) of one step of each side instead of timing.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.data.batch import Batch
from mmpt.engine.trainer import PRECISION_DTYPES

Step = Callable[[], None]


@dataclass
class Side:
    label: str
    model: nn.Module
    step: Step


@dataclass
class Match:
    name: str
    ours: Side
    peer: Side


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def mmpt_update(model: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, Callable[[torch.Tensor], None]]:
    """mmpt's side of a step after the loss: the DeepSpeed engine built as the trainer builds it (its default
    config at `--precision`), returned with the module it casts (bf16: the weights become bf16) and the update
    `engine_step.backward_and_step` (backward, mmpt's clipping, step)."""
    from mmpt.engine.config import OptimizerConfig, TrainConfig
    from mmpt.engine.dist_env import init_process_group
    from mmpt.engine.engine_init import initialize_engine
    from mmpt.engine.engine_step import backward_and_step
    from mmpt.engine.optim import build_optimizer
    from mmpt.engine.run_setup import current_env

    cfg = TrainConfig()
    if not torch.distributed.is_initialized():  # the trainer's one-rank gloo group (a free port, its timeout)
        init_process_group(current_env(), cfg.trainer.dist_timeout_s)
    cfg.data.batch_size, cfg.trainer.precision = args.batch, args.precision
    engine, clip = initialize_engine(model, build_optimizer(model, OptimizerConfig(lr=1e-4)), cfg, world_size=1)
    return engine, lambda loss: backward_and_step(engine, loss, clip)


def peer_autocast(args: argparse.Namespace) -> Callable[[], contextlib.AbstractContextManager]:
    """The peers' mixed precision: torch.autocast in bf16 around forward and loss (open_clip_train's amp_bf16)."""
    if args.precision == "bf16":
        return lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def peer_optimizer(model: nn.Module, weight_decay: float = 0.2) -> torch.optim.Optimizer:
    """torch.optim.AdamW as open_clip_train builds it: no decay for 1-d params, norms, biases, logit_scale;
    betas (0.9, 0.98), eps 1e-6; the default (per-tensor) implementation, as it does not ask for fused."""
    def exclude(name: str, p: nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


def caption_batch(batch: int, seq_len: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0; BOS 1 first, EOS = vocab - 1 last, the largest id as CLIP's EOT) and their mask."""
    ids = torch.randint(2, vocab - 1, (batch, seq_len), generator=gen)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=gen)
    positions = torch.arange(seq_len)
    mask = (positions[None, :] < lengths[:, None]).long()
    ids[:, 0] = 1
    ids[torch.arange(batch), lengths - 1] = vocab - 1
    return ids * mask, mask


def random_pairs(args: argparse.Namespace, seq_len: int, vocab: int) -> Batch:
    """The one input batch both sides of a match read: random images `b 3 h w` and `caption_batch` captions."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    ids, mask = caption_batch(args.batch, seq_len, vocab, gen)
    return Batch(images=images, input_ids=ids, attention_mask=mask)


# ---- CLIP ------------------------------------------------------------------------------------------------
def clip_match(args: argparse.Namespace) -> Match | str:
    if importlib.util.find_spec("open_clip") is None:
        return "open_clip is not installed"
    import open_clip

    from mmpt.models.clip import build_clip
    from mmpt.models.registry import preset_config

    w, depth, heads = args.width, args.layers, max(1, args.width // 64)
    vocab, seq = 1000, 32
    cfg = preset_config(
        "clip", "openai_tiny", quick_gelu=False,
        vision={"image_size": args.image_size, "patch_size": args.patch_size, "width": w, "layers": depth, "heads": heads},
        text={"width": w, "layers": depth, "heads": heads, "vocab_size": vocab, "max_text_len": seq},
        contrastive={"embed_dim": w},
    )  # fmt: skip
    batch = random_pairs(args, seq, vocab)
    images, ids, mask = batch.images, batch.input_ids, batch.attention_mask

    ours, ours_update = mmpt_update(build_clip(cfg).train(), args)

    def ours_step() -> None:
        ours_update(ours(batch.to("cpu", PRECISION_DTYPES[args.precision])).losses["itc"])

    peer = open_clip.CLIP(
        embed_dim=w,
        vision_cfg={"image_size": args.image_size, "patch_size": args.patch_size, "width": w, "layers": depth,
                    "head_width": w // heads},
        text_cfg={"context_length": seq, "vocab_size": vocab, "width": w, "heads": heads, "layers": depth},
        output_dict=True,
    ).train()  # fmt: skip
    peer_loss, peer_opt, amp = open_clip.ClipLoss(), peer_optimizer(peer), peer_autocast(args)

    def peer_step() -> None:
        with amp():
            out = peer(images, ids)
            loss = peer_loss(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer_step(loss, peer_opt)

    return Match("CLIP", Side("mmpt", ours, ours_step), Side(f"open_clip {open_clip.__version__}", peer, peer_step))


# ---- CoCa ------------------------------------------------------------------------------------------------
def coca_match(args: argparse.Namespace) -> Match | str:
    """open_clip's CoCa layout on both sides (mmpt: `model.layout=open_clip`): ViT with [CLS], one pooler of
    1 + 64 queries at the embedding width, a self + a cross block per decoder layer; embed_dim = text width."""
    if importlib.util.find_spec("open_clip") is None:
        return "open_clip is not installed"
    import open_clip

    from mmpt.models.coca import build_coca
    from mmpt.models.registry import preset_config

    w, depth, heads, queries = args.width, args.layers, max(1, args.width // 64), 64
    vocab, seq = 1000, 32
    cfg = preset_config(
        "coca", "tiny", layout="open_clip", image_pool="attention", num_decoder_queries=queries,
        multimodal_layers=depth,
        vision={"image_size": args.image_size, "patch_size": args.patch_size, "width": w, "layers": depth, "heads": heads,
                "pre_norm": True, "patch_bias": False},
        text={"width": w, "layers": depth, "heads": heads, "vocab_size": vocab, "max_text_len": seq},
        contrastive={"embed_dim": w},
    )  # fmt: skip
    batch = random_pairs(args, seq, vocab)
    images, ids, mask = batch.images, batch.input_ids, batch.attention_mask

    model = build_coca(cfg).train()
    weights = model.default_loss_weights  # itc 1, caption 2: open_clip's CoCa recipe too
    ours, ours_update = mmpt_update(model, args)

    def ours_step() -> None:
        losses = ours(batch.to("cpu", PRECISION_DTYPES[args.precision])).losses
        ours_update(sum(weights[k] * v for k, v in losses.items()))

    peer = open_clip.CoCa(
        embed_dim=w,
        multimodal_cfg={"context_length": seq, "vocab_size": vocab, "width": w, "heads": heads, "layers": depth},
        text_cfg={"context_length": seq, "vocab_size": vocab, "width": w, "heads": heads, "layers": depth,
                  "embed_cls": True, "output_tokens": True},
        vision_cfg={"image_size": args.image_size, "patch_size": args.patch_size, "width": w, "layers": depth,
                    "head_width": w // heads, "attentional_pool": True, "attn_pooler_queries": 1 + queries,
                    "attn_pooler_heads": heads, "output_tokens": True},
    ).train()  # fmt: skip
    peer_loss, peer_opt = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0), peer_optimizer(peer)
    amp = peer_autocast(args)

    def peer_step() -> None:
        with amp():
            out = peer(images, ids)
            clip_loss, caption_loss = peer_loss(out["image_features"], out["text_features"], out["logits"],
                                                out["labels"], out["logit_scale"])  # fmt: skip
        optimizer_step(clip_loss + caption_loss, peer_opt)

    return Match("CoCa", Side("mmpt", ours, ours_step), Side(f"open_clip {open_clip.__version__}", peer, peer_step))


# ---- BEiT-3 ----------------------------------------------------------------------------------------------
class WithHead(nn.Module):
    """A backbone and the bench's vocabulary head, so both count in the parameters and the optimizer."""

    def __init__(self, backbone: nn.Module, width: int, vocab: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, vocab, bias=False)


def text_token_loss(head: nn.Linear, text_out: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same loss on both backbones: the vocabulary head on every fused text token, cross-entropy to the
    ids at the real positions (an MLM-shaped head and loss; masking itself does not change the step's cost)."""
    targets = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(head(text_out).flatten(0, 1), targets.flatten(), ignore_index=-100)


def beit3_match(args: argparse.Namespace) -> Match | str:
    """BEiT-3's released layout (Multiway attention + FFN with Sub-LN, per-modality final norms), fused pass."""
    if importlib.util.find_spec("torchscale") is None:
        return "torchscale is not installed"
    import torchscale
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3

    from mmpt.models.registry import build_model, preset_config

    w, depth, heads, vocab, seq = args.width, args.layers, max(1, args.width // 64), 1000, 32
    cfg = preset_config("beit3", "tiny", objectives=["itc"], multiway={
        "width": w, "layers": depth, "heads": heads, "image_size": args.image_size, "patch_size": args.patch_size,
        "vocab_size": vocab, "max_text_len": seq})  # fmt: skip
    pairs = random_pairs(args, seq, vocab)
    images, ids, mask = pairs.images, pairs.input_ids, pairs.attention_mask

    engine, ours_update = mmpt_update(WithHead(build_model(cfg).encoder, w, vocab).train(), args)
    ours = engine.module

    def ours_step() -> None:
        out = ours.backbone.encode_pair(images.to(PRECISION_DTYPES[args.precision]), ids, mask)
        split = ours.backbone.num_image_tokens
        ours_update(text_token_loss(ours.head, out[:, split:], ids, mask))

    ts_args = EncoderConfig(
        vocab_size=vocab, multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        drop_path_rate=0.0, encoder_embed_dim=w, encoder_attention_heads=heads, encoder_ffn_embed_dim=4 * w,
        encoder_layers=depth, checkpoint_activations=False, img_size=args.image_size, patch_size=args.patch_size,
        max_source_positions=seq + 2,  # fairseq positions start at 2
    )  # fmt: skip  (BEiT-3's own _get_base_config, at this geometry)
    peer = WithHead(TorchscaleBEiT3(ts_args), w, vocab).train()
    peer_opt, amp = peer_optimizer(peer), peer_autocast(args)
    padding = mask == 0

    def peer_step() -> None:
        with amp():
            out = peer.backbone(textual_tokens=ids, visual_tokens=images, text_padding_position=padding)
            split = out["multiway_split_position"]
            loss = text_token_loss(peer.head, out["encoder_out"][:, split:], ids, mask)
        optimizer_step(loss, peer_opt)

    version = getattr(torchscale, "__version__", "")
    return Match("BEiT-3", Side("mmpt", engine, ours_step), Side(f"torchscale {version}".strip(), peer, peer_step))


# ---- ALBEF towers ----------------------------------------------------------------------------------------
class Towers(nn.Module):
    def __init__(self, visual: nn.Module, text: nn.Module, fusion: nn.Module | None = None) -> None:
        super().__init__()
        self.visual, self.text, self.fusion = visual, text, fusion


def towers_loss(image_tokens: torch.Tensor, text_tokens: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """The same loss on both sides: ITC on the unimodal [CLS] (temperature 0.07) + a square on the fused [CLS]."""
    img, txt = F.normalize(image_tokens[:, 0], dim=-1), F.normalize(text_tokens[:, 0], dim=-1)
    logits = img @ txt.T / 0.07
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) + fused[:, 0].pow(2).mean()


def albef_match(args: argparse.Namespace) -> Match | str:
    """ViT + BERT-layout (post-LN) text layers + fusion layers with cross-attention, ALBEF's split."""
    if importlib.util.find_spec("torchmultimodal") is None:
        return "torchmultimodal is not installed"
    try:
        from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
        from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
        from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
    except ImportError as exc:  # e.g. its iopath dependency
        return f"torchmultimodal does not import: {exc}"

    from mmpt.models.registry import build_model, preset_config

    w, depth, heads, vocab, seq = args.width, args.layers, max(1, args.width // 64), 1000, 32
    text_layers = max(1, depth // 2)
    cfg = preset_config(
        "albef", "tiny", objectives=["itc", "itm"], fusion_layers=depth - text_layers, momentum={"enabled": False},
        vision={"image_size": args.image_size, "patch_size": args.patch_size, "width": w, "layers": depth, "heads": heads},
        text={"width": w, "layers": text_layers, "heads": heads, "vocab_size": vocab, "max_text_len": seq,
              "norm_first": False, "norm_eps": 1e-12},
    )  # fmt: skip
    pairs = random_pairs(args, seq, vocab)
    images, ids, mask = pairs.images, pairs.input_ids, pairs.attention_mask

    model = build_model(cfg)
    engine, ours_update = mmpt_update(Towers(model.visual, model.text).train(), args)
    ours = engine.module

    def ours_step() -> None:
        image_tokens = ours.visual(images.to(PRECISION_DTYPES[args.precision]))
        text_tokens = ours.text.encode(ids, mask)
        fused = ours.text.fuse(text_tokens, mask, image_tokens)
        ours_update(towers_loss(image_tokens, text_tokens, fused))

    peer = Towers(
        ALBEFVisionEncoder(args.image_size, args.patch_size, depth, heads, w, 4 * w),
        bert_text_encoder(hidden_size=w, num_hidden_layers=text_layers, num_attention_heads=heads,
                          intermediate_size=4 * w, dropout=0.0, vocab_size=vocab, max_position_embeddings=seq),
        ALBEFMultimodalEncoder(w, depth - text_layers, heads, 4 * w),
    ).train()  # fmt: skip
    peer_opt, amp = peer_optimizer(peer), peer_autocast(args)

    def peer_step() -> None:
        with amp():
            image_tokens = peer.visual(images)
            text_tokens = peer.text(ids, mask).last_hidden_state
            fused = peer.fusion(text_tokens, mask, image_tokens)
            loss = towers_loss(image_tokens, text_tokens, fused)
        optimizer_step(loss, peer_opt)

    return Match("ALBEF towers", Side("mmpt", engine, ours_step), Side("TorchMultimodal", peer, peer_step))


MATCHES: dict[str, Callable[[argparse.Namespace], Match | str]] = {
    "clip": clip_match,
    "coca": coca_match,
    "beit3": beit3_match,
    "albef": albef_match,
}


# ---- timing --------------------------------------------------------------------------------------------
def samples_per_s(step: Step, steps: int, batch: int) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process). On a machine shared with
    other jobs the wall clock also counts time spent waiting for a core; the process's CPU time does not,
    so with one thread the second figure is the steadier one (both are printed)."""
    step()  # warm-up (allocator, lazy state)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - wall), steps * batch / (time.process_time() - cpu)


def profile(match: Match, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for side in (match.ours, match.peer):
        side.step()
        side.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            side.step()
        print(f"--- {match.name} / {side.label}: one training step, ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run(match: Match, args: argparse.Namespace) -> tuple[float, float]:
    """Interleaved rounds; returns the median ratios mmpt / peer by wall clock and by CPU time."""
    ours_n, peer_n = count_params(match.ours.model), count_params(match.peer.model)
    gap = ours_n / peer_n - 1
    print(f"{match.name}: parameters mmpt {ours_n:,} | {match.peer.label} {peer_n:,} ({gap:+.2%})"
          + ("" if abs(gap) <= 0.01 else "  WARNING: more than 1% apart"))
    wall: dict[str, list[float]] = {"ours": [], "peer": []}
    cpu: dict[str, list[float]] = {"ours": [], "peer": []}
    for r in range(args.rounds):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for key in order:
            w, c = samples_per_s(getattr(match, key).step, args.steps, args.batch)
            wall[key].append(w)
            cpu[key].append(c)
    for key, side in (("ours", match.ours), ("peer", match.peer)):
        print(f"  {side.label:<24} {statistics.median(wall[key]):8.1f} samples/s wall "
              f"{statistics.median(cpu[key]):8.1f} per CPU-s  (wall rounds: {', '.join(f'{x:.1f}' for x in wall[key])})")
    ratios = []
    for name, rates in (("wall", wall), ("CPU", cpu)):
        per_round = [a / b for a, b in zip(rates["ours"], rates["peer"])]
        ratios.append(statistics.median(rates["ours"]) / statistics.median(rates["peer"]))
        print(f"  ratio mmpt / peer ({name}): {ratios[-1]:.3f}  (per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    return ratios[0], ratios[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(MATCHES), help="comma-separated subset of " + ",".join(MATCHES))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: mmpt's trainer.precision=bf16 vs the peers' torch.autocast bf16 (amp_bf16)")
    ap.add_argument("--profile", action="store_true", help="print op tables of one step per side instead")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__} | threads {args.threads} | batch {args.batch} | {args.image_size} px / "
          f"patch {args.patch_size} | width {args.width} x {args.layers} layers | {args.precision} | "
          f"{args.rounds} rounds x {args.steps} steps")
    ratios: dict[str, tuple[float, float]] = {}
    for key in args.only.split(","):
        torch.manual_seed(0)
        match = MATCHES[key](args)
        if isinstance(match, str):
            print(f"{key}: skipped ({match})")
            continue
        if args.profile:
            profile(match, args.profile_rows)
        else:
            ratios[match.name] = run(match, args)
        del match
    if ratios:
        print("summary mmpt / peer (wall | CPU time): " + ", ".join(f"{k} {w:.2f}x | {c:.2f}x" for k, (w, c) in ratios.items()))


if __name__ == "__main__":
    main()
