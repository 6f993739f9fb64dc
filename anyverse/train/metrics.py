"""Caption metrics: corpus BLEU-4 and CIDEr-D as the COCO caption evaluation computes them, and CLIPScore.

BLEU-4 and CIDEr-D repeat pycocoevalcap's ``bleu_scorer.py`` and ``cider_scorer.py`` arithmetic step for step (its
epsilons, closest reference length, document frequencies from the evaluated references and its quirks), so the
numbers compare with published COCO results. Only tokenisation differs: instead of the Java PTB tokenizer,
:func:`tokenize` does the same job in pure Python (lowercase, split contractions, drop punctuation).

FID and FAD need backbone weights anyverse neither ships nor loads (Inception-v3 ``pt_inception``, VGGish), and
their usual implementations need torchvision / torchaudio, which do not load here: :data:`NOT_COMPUTED` says so.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "NOT_COMPUTED",
    "CaptionScores",
    "bleu4",
    "cider",
    "clip_score",
    "read_media",
    "read_predictions",
    "read_references",
    "score_captions",
    "tokenize",
]

NOT_COMPUTED = {
    "fid": "needs local weights: the pt_inception-2015-12-05 Inception-v3 network, which anyverse does not ship; "
           "FID is not implemented without torchvision",
    "fad": "needs local weights: the VGGish audio network, which anyverse does not ship; "
           "FAD is not implemented without torchaudio",
}

# PTB splits these off the word before them ("don't" -> "do n't", "dog's" -> "dog 's").
_SUFFIXES = "s|re|ve|ll|d|m"
# Abbreviations PTB keeps their period on (so "st." and "st" are different tokens, as in the COCO evaluation).
_ABBREVIATIONS = ("mr|mrs|ms|dr|st|jr|sr|mt|vs|etc|ave|inc|co|ltd|gen|capt|prof"
                  "|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")
_TOKEN = re.compile(
    rf"(?:n't|'(?:{_SUFFIXES}))\b"
    rf"|\b(?:{_ABBREVIATIONS})\.|\bno\.(?=\s*\d)"
    # a word; inside it stay hyphens, slashes, periods (u.s.a, dog.cat), apostrophes that start no contraction
    # (o'clock), and , or : between digits (1,000 10:30); an acronym keeps its final period (a.m.)
    rf"|\w+(?:(?:[-/.]|'(?!(?:{_SUFFIXES}|t)\b)|(?<=\d)[,:](?=\d))\w+)*(?:(?<=\.\w)\.)?"
    r"|[^\w\s]"
)
_NT = re.compile(r"(\w)(n't)\b")
_CANNOT = re.compile(r"\bcannot\b")
# PTB writes brackets as -LRB- etc.; pycocoevalcap lowercases first, so its "-LRB-" filter misses them and they
# stay in the token stream. Kept that way for identical scores.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# What pycocoevalcap removes after PTB tokenising: . ? ! , : ; - -- ... and quotes.
_PUNCTUATION = frozenset(".?!,:;-'\"`")

BLEU_SMALL = 1e-9  # pycocoevalcap's epsilons: 0/0 n-gram precisions become ~1e-6, never a division error
BLEU_TINY = 1e-15
CIDER_N = 4
CIDER_SIGMA = 6.0
CLIP_WEIGHT = 2.5  # Hessel et al. 2021: rescales cosines into roughly [0, 1] for typical CLIP models
CLIP_PREFIX = "A photo depicts "  # the official CLIPScore code prefixes every candidate with this


def tokenize(text: str) -> list[str]:
    """Lowercased PTB-style tokens with punctuation removed, like pycocoevalcap's PTBTokenizer (minus Java)."""
    text = _CANNOT.sub("can not", _NT.sub(r"\1 \2", text.lower()))
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return [t for t in tokens if not set(t) <= _PUNCTUATION]


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    """N-gram counts for 1..n, inserted in pycocoevalcap's order (by length, then position) for equal float sums."""
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference caption")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 over all candidates, as pycocoevalcap's ``Bleu(4)`` with ``option='closest'``."""
    _check(candidates, references)
    n = 4
    test_len = ref_len = 0
    guess, correct = [0] * n, [0] * n
    for candidate, refs in zip(candidates, references, strict=True):
        words = tokenize(candidate)
        max_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = tokenize(ref)
            ref_lens.append(len(ref_words))
            for ngram, count in _ngrams(ref_words, n).items():
                max_counts[ngram] = max(max_counts.get(ngram, 0), count)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in ref_lens)[1]  # closest; ties: shorter
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for ngram, count in _ngrams(words, n).items():
            correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), count)
    score = 1.0
    for k in range(n):
        score *= (correct[k] + BLEU_TINY) / (guess[k] + BLEU_SMALL)
    score **= 1.0 / n
    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


Vector = list[dict[tuple[str, ...], float]]


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (n=4, sigma=6, x10) as pycocoevalcap's ``Cider``: idf from this corpus's references."""
    _check(candidates, references)
    tests = [_ngrams(tokenize(c), CIDER_N) for c in candidates]
    refs = [[_ngrams(tokenize(r), CIDER_N) for r in rs] for rs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter(g for rs in refs for g in {g for r in rs for g in r})
    log_n_docs = math.log(len(refs))

    def vectorise(counts: Counter[tuple[str, ...]]) -> tuple[Vector, list[float], int]:
        vec: Vector = [{} for _ in range(CIDER_N)]
        norm = [0.0] * CIDER_N
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            vec[k][ngram] = tf * (log_n_docs - math.log(max(1.0, doc_freq[ngram])))
            norm[k] += vec[k][ngram] ** 2
            if k == 1:  # pycocoevalcap's "length" counts bigrams, not words; kept for identical numbers
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp: tuple[Vector, list[float], int], ref: tuple[Vector, list[float], int]) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.e ** (-(float(len_h - len_r) ** 2) / (2 * CIDER_SIGMA**2))
        values = []
        for k in range(CIDER_N):
            value = 0.0
            for ngram, weight in vec_h[k].items():
                value += min(weight, vec_r[k].get(ngram, 0.0)) * vec_r[k].get(ngram, 0.0)  # CIDEr-D clipping
            if norm_h[k] != 0 and norm_r[k] != 0:
                value /= norm_h[k] * norm_r[k]
            values.append(value * penalty)
        return values

    scores = []
    for test, rs in zip(tests, refs, strict=True):
        hyp = vectorise(test)
        per_n = [0.0] * CIDER_N
        for r in rs:
            per_n = [a + b for a, b in zip(per_n, similarity(hyp, vectorise(r)), strict=True)]
        scores.append(sum(per_n) / CIDER_N / len(rs) * 10.0)
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------ JSONL files


def _lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` per non-blank line; a line that is not a JSON object with an ``id`` is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str | int):
                raise ValueError(f"{where}: expected a JSON object with a string or integer \"id\"")
            yield where, obj


def _text(where: str, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: \"{key}\" must be a string")
    return value


def read_predictions(path: Path) -> dict[str, str]:
    """Id -> caption from JSONL ``{"id", "caption"}`` lines; ids compare as strings (1 and "1" are the same)."""
    predictions: dict[str, str] = {}
    for where, obj in _lines(path):
        key = str(obj["id"])
        if key in predictions:
            raise ValueError(f"{where}: id {key!r} predicted twice")
        predictions[key] = _text(where, obj.get("caption"), "caption")
    if not predictions:
        raise ValueError(f"{path}: no predictions")
    return predictions


def read_references(path: Path) -> dict[str, list[str]]:
    """Id -> captions from ``{"id", "captions": [...]}`` or ``{"id", "caption"}`` lines; an id may repeat."""
    references: dict[str, list[str]] = {}
    for where, obj in _lines(path):
        if "captions" in obj:
            captions = obj["captions"]
            if not isinstance(captions, list) or not captions:
                raise ValueError(f"{where}: \"captions\" must be a non-empty list of strings")
            texts = [_text(where, c, "captions") for c in captions]
        else:
            texts = [_text(where, obj.get("caption"), "caption")]
        references.setdefault(str(obj["id"]), []).extend(texts)
    if not references:
        raise ValueError(f"{path}: no references")
    return references


def read_media(path: Path) -> dict[str, Path]:
    """Id -> file from ``{"id", "path"}`` lines; relative paths are relative to the JSONL file's directory."""
    media: dict[str, Path] = {}
    for where, obj in _lines(path):
        media[str(obj["id"])] = path.parent / _text(where, obj.get("path"), "path")
    return media


@dataclass
class CaptionScores:
    bleu4: float
    cider: float
    n: int
    missing: list[str]  # predicted ids with no reference caption: not scored


def score_captions(predictions: dict[str, str], references: dict[str, list[str]]) -> CaptionScores:
    """BLEU-4 and CIDEr over the predicted ids that have references; the others are listed, not fatal."""
    scored = [key for key in predictions if key in references]
    missing = [key for key in predictions if key not in references]
    if not scored:
        raise ValueError(f"none of the {len(predictions)} predicted ids has a reference caption")
    candidates = [predictions[key] for key in scored]
    refs = [references[key] for key in scored]
    return CaptionScores(bleu4(candidates, refs), cider(candidates, refs), len(scored), missing)


# ------------------------------------------------------------------------------------------------- CLIPScore


def clip_score(model_dir: Path, pairs: Iterable[tuple[Image.Image, str]], device: torch.device | str = "cpu",
               batch_size: int = 32) -> float:
    """Mean CLIPScore, 2.5 * max(cos(image, "A photo depicts " + caption), 0), with a local CLIP directory.

    ``model_dir`` holds a ``CLIPModel`` and its ``CLIPProcessor`` (``save_pretrained`` of both); nothing is
    downloaded. ``pairs`` is consumed a batch at a time, so images can be decoded lazily. Captions longer than the
    text model's context are truncated, as the official code does.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    if not model_dir.is_dir():
        raise FileNotFoundError(f"CLIP model {model_dir}: no such directory")
    try:
        model: Any = CLIPModel.from_pretrained(model_dir, local_files_only=True)
        model.to(device).eval()
        processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(f"CLIP model {model_dir}: not a CLIP model + processor directory ({first})") from None
    scores: list[float] = []
    remaining = iter(pairs)
    with torch.inference_mode():
        while batch := list(itertools.islice(remaining, batch_size)):
            images, captions = zip(*batch, strict=True)
            inputs = processor(text=[CLIP_PREFIX + c for c in captions], images=list(images), return_tensors="pt",
                               padding=True, truncation=True).to(device)
            out = model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
            scores.extend((CLIP_WEIGHT * cos.clamp(min=0)).tolist())
    if not scores:
        raise ValueError("CLIPScore: no image-caption pairs (no predicted id has an image)")
    return sum(scores) / len(scores)
