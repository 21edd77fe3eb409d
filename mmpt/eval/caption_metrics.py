"""Captioning metrics (corpus BLEU-1..4 and CIDEr-D) with the conventions of the COCO caption toolkit.

The numbers match ``pycocoevalcap`` (``Bleu(4)`` and ``Cider()``) when both are given the same
whitespace-tokenized strings; this is an independent pure-Python implementation (no Java, no
toolkit dependency at runtime).

Inputs everywhere are ``refs: {image_id: [reference caption, ...]}`` and
``hyps: {image_id: caption}`` (a one-element list, the toolkit's format, is accepted too). Both
must cover exactly the same ids. With ``tokenize=True`` (default) every string goes through
:func:`tokenize_caption`; with ``tokenize=False`` strings are split on whitespace as-is, which is
what the toolkit scorers do after its PTB tokenization step. A callable may be passed instead to
use another tokenizer (``str -> list[str]``).

Toolkit conventions reproduced here (deliberately, quirks included):

BLEU
  * n-gram matches are clipped by the maximum count of that n-gram in any single reference;
    statistics are summed over the corpus before the precisions are taken (corpus BLEU, not a
    mean of sentence BLEUs).
  * reference length per sentence is the "closest" one: the reference length with the smallest
    ``|ref_len - hyp_len|``, ties going to the shorter reference; the brevity penalty is
    ``exp(1 - R/H)`` when the ratio ``(H + 1e-15) / (R + 1e-9)`` is below 1.
  * no smoothing beyond the toolkit's epsilons: each precision is ``(matches + 1e-15) /
    (total + 1e-9)``, so an n-gram order with no match drives BLEU-n (and higher) to ~0, and
    BLEU-k is the k-th root of the running product of precisions 1..k.

CIDEr-D (the toolkit's ``Cider`` scorer, which is CIDEr-D)
  * n = 1..4, tf-idf vectors per n-gram order; document frequency counts, for each image, the
    n-grams found in *any* of its references (hypotheses do not contribute); idf is
    ``log(num_images) - log(max(1, df))``, so with a single image every weight is 0 and the score
    is 0, and n-grams unseen in the references get the full ``log(num_images)``.
  * per reference and order: ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` (clipped "cosine"; 0 if a
    norm is 0) times the length penalty ``exp(-delta^2 / (2 sigma^2))``, sigma = 6, where delta is
    the difference of the *bigram counts* of hypothesis and reference (the toolkit's length; equal
    to the word-count difference unless one side is empty, and always 0 when ``n < 2``).
  * image score = mean over orders of the sum over references, divided by the number of
    references, times 10; the corpus score is the mean over images.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence

__all__ = ["tokenize_caption", "bleu", "cider_d", "cider_d_per_image", "caption_scores"]

Tokenizer = Callable[[str], list[str]]

# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
# English clitics split off as their own token, as the PTB tokenizer does ("doesn't" -> "does n't",
# "can't" -> "ca n't", "man's" -> "man 's").
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'m|'d|'ll|'re|'ve)(?!\w)")
# Words PTB splits in two: "cannot" -> "can not", "gonna" -> "gon na", ...
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|m|d|ll|re|ve)(?!\w)"   # clitics produced above
    r"|\b(?:[^\W\d_]\.){2,}"           # dotted acronyms: u.s. a.m. e.g.
    r"|\d+(?:[.,:/]\d+)+"              # numbers with separators: 3.5 1,000 10:30 1/2/2003
    r"|\w+(?:[-'/]\w+)*"               # words with inner - ' /: black-and-white o'clock black/white
    r"|[&%$#@]"                        # symbols the PTB tokenizer keeps as tokens
)


def tokenize_caption(text: str) -> list[str]:
    """Lowercase and tokenize a caption approximately like the toolkit's PTBTokenizer step.

    The toolkit runs Stanford's PTBTokenizer (``-lowerCase``) and then drops the punctuation
    tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``. This function:

    * lowercases, normalises curly apostrophes, splits clitics (``n't 's 'm 'd 'll 're 've``)
      off as separate tokens like PTB, and ``cannot gonna wanna gotta`` into two words;
    * keeps words with inner ``-``, ``'`` or ``/`` whole (``black-and-white``, ``o'clock``, ``a/b``),
      numbers with inner ``. , : /`` (``3.5``, ``1,000``, ``10:30``), dotted acronyms (``u.s.``),
      and ``& % $ # @`` as single-character tokens;
    * drops every other punctuation character.

    Known differences from the toolkit (rare in captions):

    * brackets: PTB turns them into ``-LRB-``/``-RRB-``/``-LSB-``...; because the toolkit lowercases
      before filtering, the lowercased ``-lrb-`` etc. survive its filter and count as words there;
      here brackets are simply dropped;
    * PTB keeps a trailing period on known abbreviations (``mr.``, ``st.``) and keeps multi-char
      punctuation runs it does not list (``?!``); here those periods/runs are dropped;
    * PTB keeps other symbols as or inside tokens (``star * s``, ``c++``, ``<angle>``); here they
      are dropped; leading clitics (``'tis`` -> PTB ``'t is``) and ``rock'n'roll`` are not split.
    """
    text = text.translate(_APOSTROPHES).lower()
    text = _CLITIC.sub(r" \1", text)
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    return _TOKEN.findall(text)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _tokenizer(tokenize: bool | Tokenizer) -> Tokenizer:
    if callable(tokenize):
        return tokenize
    return tokenize_caption if tokenize else str.split


def _validate(
    refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str | Sequence[str]]
) -> list[tuple[Hashable, str, list[str]]]:
    """Check the inputs; return [(id, hypothesis, [reference, ...]), ...] in ``refs`` order."""
    if set(refs) != set(hyps):
        missing = [k for k in refs if k not in hyps][:5]
        extra = [k for k in hyps if k not in refs][:5]
        raise ValueError(f"refs and hyps must have the same ids (missing hyps for {missing}, no refs for {extra})")
    if not refs:
        raise ValueError("empty corpus: no images to score")
    out = []
    for key, rs in refs.items():
        h = hyps[key]
        if not isinstance(h, str):
            if len(h) != 1 or not isinstance(h[0], str):
                raise ValueError(f"image {key!r}: expected one hypothesis string, got {h!r}")
            h = h[0]
        if isinstance(rs, str) or len(rs) == 0 or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"image {key!r}: references must be a non-empty list of strings")
        out.append((key, h, list(rs)))
    return out


def _pairs(
    refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str | Sequence[str]], tokenize: bool | Tokenizer
) -> list[tuple[list[str], list[list[str]]]]:
    """Validated, tokenized corpus: [(hyp_tokens, [ref_tokens, ...]), ...] in ``refs`` order."""
    tok = _tokenizer(tokenize)
    return [(tok(h), [tok(r) for r in rs]) for _, h, rs in _validate(refs, hyps)]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples) of ``tokens``."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1))
    return counts


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------
_SMALL, _TINY = 1e-9, 1e-15  # the toolkit's guards against division by zero


def bleu(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str | Sequence[str]],
    n: int = 4,
    tokenize: bool | Tokenizer = True,
) -> dict[str, float]:
    """Corpus BLEU-1..n as in the COCO toolkit (``Bleu(n)`` with the "closest" reference length).

    Returns ``{"bleu1": .., ..., f"bleu{n}": .., "brevity_penalty": .., "hyp_len": .., "ref_len": ..}``
    (lengths are corpus totals in tokens, the reference one summing each sentence's closest length).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    matches = [0] * n
    totals = [0] * n
    hyp_len = ref_len = 0
    for hyp, rs in _pairs(refs, hyps, tokenize):
        h = len(hyp)
        hyp_len += h
        ref_len += min((len(r) for r in rs), key=lambda length: (abs(length - h), length))
        max_ref: Counter = Counter()
        for r in rs:
            max_ref |= _ngrams(r, n)  # element-wise max over references
        for gram, c in _ngrams(hyp, n).items():
            matches[len(gram) - 1] += min(c, max_ref.get(gram, 0))
        for k in range(1, n + 1):
            totals[k - 1] += max(0, h - k + 1)

    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    bp = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0
    out: dict[str, float] = {}
    prod = 1.0
    for k in range(1, n + 1):
        prod *= (matches[k - 1] + _TINY) / (totals[k - 1] + _SMALL)
        out[f"bleu{k}"] = prod ** (1.0 / k) * bp
    out.update(brevity_penalty=bp, hyp_len=float(hyp_len), ref_len=float(ref_len))
    return out


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------
def _tfidf(counts: Counter, n: int, df: Counter, log_num_docs: float) -> tuple[list[dict], list[float], int]:
    """Per-order tf-idf vectors, their L2 norms, and the toolkit's "length" (the bigram count)."""
    vecs: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_num_docs - math.log(max(1.0, df.get(gram, 0))))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, norms, length


def cider_d_per_image(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str | Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool | Tokenizer = True,
) -> dict[Hashable, float]:
    """CIDEr-D of each image (see the module docstring); ids in ``refs`` order."""
    pairs = _pairs(refs, hyps, tokenize)
    ref_counts = [[_ngrams(r, n) for r in rs] for _, rs in pairs]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set().union(*counts))  # each image counts once per n-gram
    log_num_docs = math.log(len(pairs))
    two_sigma_sq = 2.0 * sigma * sigma

    scores = {}
    for key, (hyp, _), rcounts in zip(refs.keys(), pairs, ref_counts):
        h_vecs, h_norms, h_len = _tfidf(_ngrams(hyp, n), n, df, log_num_docs)
        per_order = [0.0] * n
        for rc in rcounts:
            r_vecs, r_norms, r_len = _tfidf(rc, n, df, log_num_docs)
            penalty = math.exp(-float(h_len - r_len) ** 2 / two_sigma_sq)
            for k in range(n):
                rv = r_vecs[k]
                s = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in h_vecs[k].items())
                if h_norms[k] != 0.0 and r_norms[k] != 0.0:
                    s /= h_norms[k] * r_norms[k]
                per_order[k] += s * penalty
        scores[key] = 10.0 * (sum(per_order) / n) / len(rcounts)
    return scores


def cider_d(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str | Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool | Tokenizer = True,
) -> float:
    """Corpus CIDEr-D (x10 scale, mean over images) as the COCO toolkit's ``Cider`` scorer."""
    per_image = cider_d_per_image(refs, hyps, n=n, sigma=sigma, tokenize=tokenize)
    return sum(per_image.values()) / len(per_image)


# ---------------------------------------------------------------------------------------------
# convenience
# ---------------------------------------------------------------------------------------------
def caption_scores(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str | Sequence[str]],
    tokenize: bool | Tokenizer = True,
) -> dict[str, float]:
    """Flat metrics dict for logging: ``caption/bleu1..4`` and ``caption/cider`` (CIDEr-D).

    Tokenizes once (``tokenize`` as in :func:`bleu`), then scores the whitespace-joined tokens.
    """
    tok = _tokenizer(tokenize)
    corpus = _validate(refs, hyps)
    t_refs = {k: [" ".join(tok(r)) for r in rs] for k, _, rs in corpus}
    t_hyps = {k: " ".join(tok(h)) for k, h, _ in corpus}
    b = bleu(t_refs, t_hyps, n=4, tokenize=False)
    out = {f"caption/bleu{k}": b[f"bleu{k}"] for k in range(1, 5)}
    out["caption/cider"] = cider_d(t_refs, t_hyps, tokenize=False)
    return out
