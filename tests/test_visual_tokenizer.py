"""Visual tokenizers: k-means (algorithm, codebook file, CLI), frozen VQ-KD-style ViT, pixel targets."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmpt.cli.data import iter_image_bytes, main
from mmpt.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, decode_image
from mmpt.visual_tokenizer import (
    FrozenViTConfig,
    FrozenViTTokenizer,
    KMeansTokenizer,
    PixelTokenizer,
    VisualTokenizer,
    VisualTokenizerConfig,
    VisualTokenizerError,
    build_visual_tokenizer,
    fit_kmeans,
    save_frozen_tokenizer,
)
from mmpt.visual_tokenizer.kmeans import assign, kmeans_plus_plus, lloyd_step

# ---- hand references ------------------------------------------------------------------------------------


def patch_by_hand(pixels: torch.Tensor, i: int, j: int, p: int) -> torch.Tensor:
    """Patch (row i, col j) of `c h w` pixels, flattened in (p1 p2 c) order, by plain slicing."""
    return pixels[:, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)


def features_by_hand(images: torch.Tensor, mean, std, p: int, eps: float) -> torch.Tensor:
    """`b c h w` normalised images -> `b n (p p c)` per-patch normalised pixel patches, row-major."""
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = []
    for image in images:
        pixels = image * s + m
        rows = []
        for i in range(image.shape[1] // p):
            for j in range(image.shape[2] // p):
                v = patch_by_hand(pixels, i, j, p)
                mu = v.sum() / v.numel()
                sigma = ((v - mu) ** 2).sum().div(v.numel()).sqrt()
                rows.append((v - mu) / (sigma + eps))
        out.append(torch.stack(rows))
    return torch.stack(out)


def nearest_by_hand(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1).argmin(dim=1)


def normalise(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---- k-means --------------------------------------------------------------------------------------------

CENTRES = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])


def planted(points_per_centre: int = 50, noise: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(points_per_centre)
    return CENTRES[labels] + noise * torch.randn(len(labels), 2, generator=g), labels


def test_kmeans_recovers_planted_clusters():
    x, labels = planted()
    result = fit_kmeans(x, 4, iters=20, seed=0)
    # each true centre has exactly one fitted centre close to it (within the noise of a 50-point mean)
    match = nearest_by_hand(CENTRES, result.centres)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(result.centres[match], CENTRES, atol=0.15)
    # and every point lands with its own cluster
    ids, _ = assign(x, result.centres)
    assert torch.equal(ids, match[labels])
    assert result.iterations < 20  # converged and stopped early
    assert result.inertia == sorted(result.inertia, reverse=True)  # Lloyd never increases the objective


def test_assignment_equals_brute_force_nearest_centre():
    g = torch.Generator().manual_seed(1)
    x, centres = torch.randn(101, 5, generator=g), torch.randn(7, 5, generator=g)
    for chunk in (None, 13):  # one chunk, and several of unequal size
        ids, d2 = assign(x, centres, chunk)
        expected = nearest_by_hand(x, centres)
        assert torch.equal(ids, expected)
        assert torch.allclose(d2, ((x - centres[expected]) ** 2).sum(-1), atol=1e-5)


def test_kmeans_is_deterministic_per_seed():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(2))
    a, b = fit_kmeans(x, 8, iters=5, seed=3), fit_kmeans(x, 8, iters=5, seed=3)
    c = fit_kmeans(x, 8, iters=5, seed=4)
    assert torch.equal(a.centres, b.centres) and a.inertia == b.inertia
    assert not torch.equal(a.centres, c.centres)


def test_kmeans_plus_plus_picks_distinct_data_points():
    x, _ = planted(points_per_centre=20, noise=0.1)
    centres = kmeans_plus_plus(x, 4, torch.Generator().manual_seed(0))
    # every centre is a data point, and D^2 sampling puts one in each well-separated cluster
    assert all(any(torch.equal(c, p) for p in x) for c in centres)
    assert sorted(nearest_by_hand(centres, CENTRES).tolist()) == [0, 1, 2, 3]
    # fewer distinct points than k: zero remaining mass falls back to a uniform draw instead of failing
    dup = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(5, 1)
    assert kmeans_plus_plus(dup, 4, torch.Generator().manual_seed(0)).shape == (4, 2)


def test_empty_cluster_is_reseeded_on_the_worst_served_point():
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [13.0, 0.0]])
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]])  # the third centre attracts no point
    new, ids, inertia, reseeded = lloyd_step(x, init)
    assert ids.tolist() == [0, 0, 1, 1]
    assert inertia == pytest.approx(0 + 4 + 0 + 9)
    assert reseeded == 1
    # means of the two used clusters; the empty one moves onto (13, 0), the point farthest from its centre
    assert torch.allclose(new, torch.tensor([[0.0, 1.0], [11.5, 0.0], [13.0, 0.0]]))
    result = fit_kmeans(x, 3, iters=10, init=init)
    assert result.reseeded == 1
    assert torch.bincount(assign(x, result.centres)[0], minlength=3).min() >= 1


def test_kmeans_rejects_more_codes_than_points():
    with pytest.raises(ValueError, match="k <= number of points"):
        fit_kmeans(torch.randn(3, 2), 4)


# ---- pixel targets and the k-means tokenizer ------------------------------------------------------------


def test_pixel_targets_equal_a_hand_computation():
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).sin().abs()  # in [0, 1]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tok = PixelTokenizer(patch_size=2, image_size=4, mean=mean, std=std, eps=0.01)
    targets = tok.encode(normalise(pixels, mean, std))
    assert targets.shape == (2, 4, 2 * 2 * 3) and tok.target_dim == 12 and tok.vocab_size == 0 and not tok.discrete
    # patch n = (i, j) row-major; values in (p1 p2 c) order; (x - mean) / (population std + eps)
    for b in range(2):
        for n, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            v = [pixels[b, c, i * 2 + y, j * 2 + x].item() for y in range(2) for x in range(2) for c in range(3)]
            mu = sum(v) / 12
            sigma = (sum((a - mu) ** 2 for a in v) / 12) ** 0.5
            assert targets[b, n].tolist() == pytest.approx([(a - mu) / (sigma + 0.01) for a in v], abs=1e-4)


def test_pixel_targets_ignore_brightness_and_contrast():
    pixels = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    tok = PixelTokenizer(patch_size=4, eps=0.0)
    a = tok.encode(normalise(pixels))
    b = tok.encode(normalise(0.6 * pixels + 0.3))  # same shapes, other exposure
    assert torch.allclose(a, b, atol=1e-4)


def small_kmeans_tokenizer(k: int = 5, p: int = 4, size: int = 8, eps: float = 0.01) -> KMeansTokenizer:
    codebook = torch.randn(k, p * p * 3, generator=torch.Generator().manual_seed(5))
    return KMeansTokenizer(codebook, p, size, CLIP_MEAN, CLIP_STD, eps)


def test_kmeans_tokenizer_ids_are_the_nearest_code_of_each_patch():
    tok = small_kmeans_tokenizer()
    images = normalise(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(6)))
    ids = tok.encode(images)
    assert ids.shape == (3, 4) and ids.dtype == torch.int64
    feats = features_by_hand(images, CLIP_MEAN, CLIP_STD, 4, 0.01)
    assert torch.equal(ids, nearest_by_hand(feats.reshape(12, -1), tok.codebook).reshape(3, 4))
    assert isinstance(tok, VisualTokenizer) and tok.discrete and tok.target_dim == 5


def test_tokenizers_are_frozen_and_move_with_their_owner():
    tok = small_kmeans_tokenizer()
    images = normalise(torch.rand(1, 3, 8, 8)).requires_grad_()
    assert tok.encode(images).grad_fn is None
    tok.train()
    assert not tok.training  # stays in eval mode when its owner trains
    owner = torch.nn.Module()
    owner.tok = tok
    owner.to("meta")
    assert {t.device.type for t in [*tok.buffers(), *tok.parameters()]} == {"meta"}


def test_tokenizer_rejects_images_it_was_not_fitted_for():
    tok = small_kmeans_tokenizer()
    with pytest.raises(ValueError, match="built for 8x8 images, got 16x16"):
        tok.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"`b 3 h w`"):
        tok.encode(torch.zeros(1, 1, 8, 8))


def test_kmeans_codebook_file_round_trip_and_normalisation(tmp_path):
    tok = small_kmeans_tokenizer()
    assert tok.save(tmp_path / "cb.safetensors") == "safetensors"
    cfg = VisualTokenizerConfig(kind="kmeans", path=str(tmp_path / "cb.safetensors"), patch_size=4, image_size=8)
    loaded = build_visual_tokenizer(cfg)
    assert torch.equal(loaded.codebook, tok.codebook)
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded.encode(normalise(pixels)), tok.encode(normalise(pixels)))
    # data normalised differently: the tokenizer undoes the configured normalisation, same ids
    other = VisualTokenizerConfig(kind="kmeans", path=cfg.path, mean=[0.5] * 3, std=[0.5] * 3)
    assert torch.equal(build_visual_tokenizer(other).encode(normalise(pixels, [0.5] * 3, [0.5] * 3)),
                       tok.encode(normalise(pixels)))  # fmt: skip


# ---- frozen ViT tokenizer -------------------------------------------------------------------------------

FROZEN = FrozenViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, codebook_size=16, code_dim=8)


def test_frozen_tokenizer_round_trip_and_cosine_codes(tmp_path):
    torch.manual_seed(0)
    tok = FrozenViTTokenizer(FROZEN)
    save_frozen_tokenizer(tok, tmp_path / "vqkd.pt")
    loaded = build_visual_tokenizer(VisualTokenizerConfig(kind="frozen", path=str(tmp_path / "vqkd.pt")))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = loaded.encode(images)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    assert torch.equal(ids, tok.encode(images))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # VQ-KD inference by hand: patch tokens (no [CLS]) -> task layer -> cosine to the codebook -> argmax
    with torch.no_grad():
        z = F.normalize(tok.task_layer(tok.encoder(images)[:, 1:]), dim=-1)
        expected = (z @ F.normalize(tok.codebook, dim=-1).T).argmax(-1)
    assert torch.equal(ids, expected)
    # images normalised with other statistics are re-normalised to the encoder's: same codes
    pixels = images * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    other = build_visual_tokenizer(
        VisualTokenizerConfig(kind="frozen", path=str(tmp_path / "vqkd.pt"), mean=[0.5] * 3, std=[0.25] * 3)
    )
    assert torch.equal(other.encode(normalise(pixels, [0.5] * 3, [0.25] * 3)), ids)


def test_frozen_loading_reports_mismatched_keys(tmp_path):
    tok = FrozenViTTokenizer(FROZEN)
    save_frozen_tokenizer(tok, tmp_path / "ok.pt")
    obj = torch.load(tmp_path / "ok.pt", weights_only=True)
    state = dict(obj["state_dict"])
    state.pop("task_layer.2.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"config": obj["config"], "state_dict": state}, tmp_path / "keys.pt")
    expected = r"missing keys \['task_layer.2.bias'\], unexpected keys \['extra.weight'\]"
    with pytest.raises(VisualTokenizerError, match=expected):
        build_visual_tokenizer(VisualTokenizerConfig(kind="frozen", path=str(tmp_path / "keys.pt")))
    torch.save({"config": {**obj["config"], "depth": 3}, "state_dict": obj["state_dict"]}, tmp_path / "cfg.pt")
    with pytest.raises(VisualTokenizerError, match=r"unknown keys \['depth'\]"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="frozen", path=str(tmp_path / "cfg.pt")))
    torch.save({"config": {**obj["config"], "width": 64}, "state_dict": obj["state_dict"]}, tmp_path / "shape.pt")
    with pytest.raises(VisualTokenizerError, match="does not match its config"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="frozen", path=str(tmp_path / "shape.pt")))


def test_wrong_or_missing_files_and_settings_are_clear_errors(tmp_path):
    small_kmeans_tokenizer().save(tmp_path / "cb.safetensors")
    save_frozen_tokenizer(FrozenViTTokenizer(FROZEN), tmp_path / "vqkd.pt")
    with pytest.raises(FileNotFoundError, match="mmpt-data visual-tokenizer"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="kmeans", path=str(tmp_path / "nope.safetensors")))
    with pytest.raises(VisualTokenizerError, match="set kind: frozen"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="kmeans", path=str(tmp_path / "vqkd.pt")))
    with pytest.raises(VisualTokenizerError, match="needs kind: kmeans"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="frozen", path=str(tmp_path / "cb.safetensors")))
    with pytest.raises(VisualTokenizerError, match="patch_size=4 but the config asks for patch_size=8"):
        build_visual_tokenizer(
            VisualTokenizerConfig(kind="kmeans", path=str(tmp_path / "cb.safetensors"), patch_size=8)
        )
    with pytest.raises(VisualTokenizerError, match="not one of"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="dalle"))
    with pytest.raises(VisualTokenizerError, match="needs patch_size"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="pixels"))
    with pytest.raises(VisualTokenizerError, match="needs `path`"):
        build_visual_tokenizer(VisualTokenizerConfig(kind="kmeans"))


# ---- the CLI on real shards -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vt_shards")
    argv = ["synthetic", "--out", str(out), "--num-samples", "16", "--shard-size", "8", "--image-size", "32"]
    assert main(argv) == 0
    return out


def fit_cli(shards: Path, out: Path, *extra: str) -> int:
    return main(["visual-tokenizer", "--shards", f"{shards}/{{00000..00001}}.tar", "--codebook-size", "12",
                 "--out", str(out), "--patch-size", "8", "--image-size", "32", "--iters", "5", "--device", "cpu",
                 *extra])  # fmt: skip


def test_cli_fits_a_codebook_that_the_factory_loads(shards, tmp_path, capsys):
    assert fit_cli(shards, tmp_path / "a" / "cb.safetensors") == 0
    captured = capsys.readouterr()
    assert "fitted 12 codes on 256 patches of 16 images" in captured.out
    assert "k-means iterations" in captured.err  # the progress bars ran (on stderr)
    tok = build_visual_tokenizer(VisualTokenizerConfig(kind="kmeans", path=str(tmp_path / "a" / "cb.safetensors")))
    assert (tok.vocab_size, tok.patch_size, tok.image_size) == (12, 8, 32)
    paths = sorted(str(p) for p in shards.glob("*.tar"))
    transform = EvalTransform(32)
    images = torch.stack([transform(decode_image(data)) for _, data in iter_image_bytes(paths)])
    ids = tok.encode(images)
    assert ids.shape == (16, 16) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 12
    assert len(ids.unique()) >= 6  # the codes are spread over the data, not collapsed onto one
    # same seed -> same codebook; another seed -> another one
    assert fit_cli(shards, tmp_path / "b.safetensors") == 0
    assert fit_cli(shards, tmp_path / "c.safetensors", "--seed", "1") == 0
    load = lambda name: build_visual_tokenizer(VisualTokenizerConfig(kind="kmeans", path=str(tmp_path / name)))
    assert torch.equal(load("b.safetensors").codebook, tok.codebook)
    assert not torch.equal(load("c.safetensors").codebook, tok.codebook)


def test_cli_user_errors_exit_2(shards, tmp_path, capsys):
    assert main(["visual-tokenizer", "--shards", f"{shards}/*.tar", "--codebook-size", "1000", "--out",
                 str(tmp_path / "x"), "--image-size", "32", "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err  # progress bars first (lines end in \r), then the one error line
    assert err.strip().splitlines()[-1].startswith("error: 16 readable image(s) in 2 shard(s) give 256 patches")
    assert err.count("error:") == 1 and "Traceback" not in err
    assert fit_cli(shards, tmp_path / "x", "--image-size", "30") == 2
    assert capsys.readouterr().err.startswith("error: --image-size 30 must be a positive multiple of --patch-size 8")
    bad = tmp_path / "00000.tar"
    bad.write_bytes(b"not a tar")
    assert main(["visual-tokenizer", "--shards", str(bad), "--codebook-size", "2", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot read images")
    assert not (tmp_path / "x").exists()


def test_cli_skips_undecodable_images(shards, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(corrupt, "w") as tar, tarfile.open(shards / "00000.tar") as src:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == "000000000.jpg":
                data = b"garbage"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert main(["visual-tokenizer", "--shards", str(corrupt), "--codebook-size", "4", "--out", str(tmp_path / "c"),
                 "--image-size", "32", "--iters", "2", "--device", "cpu"]) == 0  # fmt: skip
    assert "of 7 images (1 unreadable skipped)" in capsys.readouterr().out


def test_file_tokenizers_build_on_the_meta_device(tmp_path, recwarn):
    """Config validation builds models under `torch.device("meta")`: loading must still check the file."""
    small_kmeans_tokenizer().save(tmp_path / "cb.safetensors")
    save_frozen_tokenizer(FrozenViTTokenizer(FROZEN), tmp_path / "vqkd.pt")
    with torch.device("meta"):
        for kind, name in (("kmeans", "cb.safetensors"), ("frozen", "vqkd.pt")):
            tok = build_visual_tokenizer(VisualTokenizerConfig(kind=kind, path=str(tmp_path / name)))
            assert {t.device.type for t in tok.state_dict().values()} == {"meta"}
    assert not [w for w in recwarn if "meta" in str(w.message)]
