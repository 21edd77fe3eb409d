"""Caption metrics: hand-computed BLEU, perfect-match cases, and agreement with pycocoevalcap."""
from __future__ import annotations

import math
import random
import shutil

import pytest

from mmpt.eval.caption_metrics import bleu, caption_scores, cider_d, cider_d_per_image, tokenize_caption


def test_tokenizer_ptb_like():
    assert tokenize_caption("A man's dog doesn't like cats.") == ["a", "man", "'s", "dog", "does", "n't", "like", "cats"]
    assert tokenize_caption("It's a black-and-white photo of 3.5 cats...") == [
        "it", "'s", "a", "black-and-white", "photo", "of", "3.5", "cats"]
    assert tokenize_caption('"Two" dogs\u2019 toys, (red) -- and BLUE!?') == ["two", "dogs", "toys", "red", "and", "blue"]
    assert tokenize_caption("U.S. flag at 10:30; he can't, we cannot") == [
        "u.s.", "flag", "at", "10:30", "he", "ca", "n't", "we", "can", "not"]
    assert tokenize_caption("  ") == []


def test_bleu_hand_computed():
    refs = {
        "i1": ["the cat sat on the mat", "a cat is on a mat"],
        "i2": ["a dog runs", "a brown dog runs fast"],
    }
    hyps = {"i1": "a cat sat on the mat", "i2": "a dog"}
    # i1 (len 6, closest ref 6): 1-grams 6/6, 2-grams 5/5 ("a cat" from ref 2, the rest from ref 1),
    #     3-grams 3/4 ("a cat sat" unmatched), 4-grams 2/3 ("a cat sat on" unmatched).
    # i2 (len 2, closest ref 3): 1-grams 2/2, 2-grams 1/1, no 3/4-grams.
    # corpus: p1 = 8/8, p2 = 6/6, p3 = 3/4, p4 = 2/3; hyp length 8 < ref length 9 -> BP = exp(1 - 9/8).
    bp = math.exp(1 - 9 / 8)
    b = bleu(refs, hyps)
    assert b["hyp_len"] == 8 and b["ref_len"] == 9
    assert b["brevity_penalty"] == pytest.approx(bp)
    assert b["bleu1"] == pytest.approx(bp)
    assert b["bleu2"] == pytest.approx(bp)
    assert b["bleu3"] == pytest.approx((3 / 4) ** (1 / 3) * bp)
    assert b["bleu4"] == pytest.approx((1 / 2) ** (1 / 4) * bp)
    # i1 alone: no brevity penalty
    assert bleu({"i1": refs["i1"]}, {"i1": hyps["i1"]})["bleu4"] == pytest.approx(0.5 ** 0.25)


def test_bleu_closest_ref_length_and_no_smoothing():
    # hyp length 4, refs of length 3 and 5: equally close, the shorter one wins -> ratio 4/3, BP = 1
    b = bleu({0: ["a b c", "a b c e f"]}, {0: "a b c d"})
    assert b["ref_len"] == 3 and b["brevity_penalty"] == 1.0
    # precisions 3/4, 2/3, 1/2 and no 4-gram match: BLEU-4 collapses to ~0 (the toolkit's 1e-15
    # epsilon, no smoothing) while BLEU-3 is the cube root of the running product
    assert b["bleu3"] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert b["bleu4"] < 1e-3


def test_perfect_match():
    refs = {
        "a": ["a red car parked on the street", "a car on a road"],
        "b": ["two dogs play with a ball in the park"],
        "c": ["a man rides a horse on the beach", "someone riding"],
    }
    hyps = {k: v[0] for k, v in refs.items()}
    b = bleu(refs, hyps)
    assert [b[f"bleu{k}"] for k in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-8)
    # identical corpora (one reference each): every order's clipped cosine is 1, no length penalty -> 10
    single = {k: [v[0]] for k, v in refs.items()}
    assert cider_d(single, hyps) == pytest.approx(10.0)
    assert all(s == pytest.approx(10.0) for s in cider_d_per_image(single, hyps).values())
    # no shared n-gram at all -> 0; one image only -> every idf is log(1) - log(1) = 0 -> 0
    assert cider_d(single, {k: "zebra giraffe elephant lion" for k in refs}) == 0.0
    assert cider_d({"a": refs["a"]}, {"a": hyps["a"]}) == 0.0


def test_caption_scores_keys_and_validation():
    refs = {1: ["A dog runs on grass.", "a dog running"], 2: ["Two cats sleep on a sofa"]}
    hyps = {1: "a dog runs on the grass", 2: ["two cats on a sofa"]}  # toolkit-style one-element list ok
    s = caption_scores(refs, hyps)
    assert set(s) == {"caption/bleu1", "caption/bleu2", "caption/bleu3", "caption/bleu4", "caption/cider"}
    assert all(isinstance(v, float) for v in s.values())
    assert s["caption/bleu4"] == pytest.approx(bleu(refs, hyps)["bleu4"])
    assert s["caption/cider"] == pytest.approx(cider_d(refs, hyps))
    with pytest.raises(ValueError, match="same ids"):
        caption_scores(refs, {1: "a dog"})
    with pytest.raises(ValueError, match="non-empty"):
        bleu({1: []}, {1: "a dog"})
    with pytest.raises(ValueError, match="one hypothesis"):
        cider_d({1: ["a dog"]}, {1: ["a dog", "a cat"]})


def _random_corpus(seed: int, n_images: int = 20):
    rng = random.Random(seed)
    vocab = "a the cat dog man sits on mat red blue big small runs near".split()

    def cap(min_len: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(min_len, 10)))

    refs = {f"img{i}": [cap(1) for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    # some hypotheses copy a reference, some are empty or one word
    hyps = {k: rng.choice(v) if rng.random() < 0.2 else cap(0) for k, v in refs.items()}
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocoevalcap(seed):
    bleu_mod = pytest.importorskip(
        "pycocoevalcap.bleu.bleu", reason="pycocoevalcap not installed (pip install pycocoevalcap)")
    cider_mod = pytest.importorskip(
        "pycocoevalcap.cider.cider", reason="pycocoevalcap not installed (pip install pycocoevalcap)")
    refs, hyps = _random_corpus(seed)
    res = {k: [h] for k, h in hyps.items()}  # both sides get the same pre-tokenized strings
    try:
        ref_bleu, _ = bleu_mod.Bleu(4).compute_score(refs, res, verbose=0)
    except TypeError:  # older releases have no `verbose`
        ref_bleu, _ = bleu_mod.Bleu(4).compute_score(refs, res)
    ref_cider, ref_cider_per_image = cider_mod.Cider().compute_score(refs, res)

    ours = bleu(refs, hyps, tokenize=False)
    for k in range(4):
        assert ours[f"bleu{k + 1}"] == pytest.approx(ref_bleu[k], abs=1e-6)
    assert cider_d(refs, hyps, tokenize=False) == pytest.approx(float(ref_cider), abs=1e-6)
    per_image = cider_d_per_image(refs, hyps, tokenize=False)
    assert list(per_image.values()) == pytest.approx([float(x) for x in ref_cider_per_image], abs=1e-6)
    assert 0.0 < ours["bleu4"] < 1.0 and float(ref_cider) > 0.0  # non-degenerate corpus


def test_tokenizer_agrees_with_ptb_on_plain_captions():
    """Runs the toolkit's Java PTB tokenizer once on ordinary captions (punctuation, clitics, numbers)."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer", reason="pycocoevalcap not installed")
    if shutil.which("java") is None:
        pytest.skip("java not found: the toolkit's PTB tokenizer needs it")
    captions = [
        "A man's dog doesn't like cats.",
        "It's a black-and-white photo of 3.5 cats...",
        '"Quoted" text -- here - there',
        "U.S. flag on a pole at 10:30 a.m.",
        "I'm sure they'll go, we've been; you'd see!",
        "People's hats, a t-shirt and 1,000 balloons?",
        "He can't swim: she cannot either",
        "A  MAN RIDING a horse on the beach .",
    ]
    out = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, c in enumerate(captions):
        assert " ".join(tokenize_caption(c)) == out[i][0], c
