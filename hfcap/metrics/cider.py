"""Fast, exact CIDEr-D (the metric pycocoevalcap reports as "CIDEr") for SCST rewards and evaluation.

For a candidate ``c`` and the references ``s_1..s_m`` of its image (pycocoevalcap ``cider_scorer.py``)::

    g_n(x)[w]  = tf_x(w) * (log N - log max(1, df(w)))        TF-IDF of the n-grams w of order n
    val_n(c,s) = sum_w min(g_n(c)[w], g_n(s)[w]) * g_n(s)[w] / (|g_n(c)| |g_n(s)|)     clipped cosine
                 * exp(-(l_c - l_s)^2 / (2 sigma^2))            Gaussian length penalty
    CIDEr-D(c) = 10 * mean_n( sum_j val_n(c, s_j) ) / m

``df(w)`` is the number of images whose reference set contains ``w`` and ``N`` the number of those images.
pycocoevalcap's "length" ``l`` is the number of bigram occurrences (words - 1, 0 for an empty caption); the
deltas, and therefore the scores, are reproduced exactly.

pycocoevalcap re-counts and re-weights every reference for every candidate with Python dicts of n-gram
tuples. Here n-grams are integer ids built order by order: the id of a k-gram is its rank among the sorted
keys ``(id of its (k-1)-gram prefix << 31) | word id`` of that order, so one sort per order yields the ids,
document frequencies and term frequencies of a whole corpus, and everything else is numpy arithmetic.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, repeat

import numpy as np

_WORD_BITS = 31  # word ids < 2**31 and prefix ids < 2**32, so a key fits in int64


class _PunctuationToSpace(dict):
    """``str.translate`` table mapping punctuation (ASCII or Unicode category P*) to a space, filled lazily."""

    def __missing__(self, code: int) -> int:
        char = chr(code)
        self[code] = 32 if char in string.punctuation or unicodedata.category(char).startswith("P") else code
        return self[code]


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()


def simple_tokenize(text: str) -> list[str]:
    """Words of a caption the way hfcap's word-level tokenizer splits it (the tokenisation of SCST rewards).

    NFD + strip accents + lowercase, then whitespace split with punctuation removed (punctuation also
    separates words, as ``tokenizers``' ``Punctuation(behavior="removed")`` does): ``"A dog's toy."`` ->
    ``["a", "dog", "s", "toy"]``.
    """
    text = unicodedata.normalize("NFD", text)
    text = "".join(char for char in text if not unicodedata.category(char).startswith("M"))  # strip accents
    return text.lower().translate(_PUNCTUATION_TO_SPACE).split()


def _changes(values: np.ndarray) -> np.ndarray:
    """Mask of the positions where a sorted run starts (the value differs from the previous one)."""
    out = np.empty(len(values), bool)
    out[:1] = True
    np.not_equal(values[1:], values[:-1], out=out[1:])
    return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start, start + count)`` for every (start, count)."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts - starts, counts)


def _find(sorted_keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each query key in ``sorted_keys`` and whether it is there."""
    if not len(sorted_keys):
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    found = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    return found, sorted_keys[found] == query


def _check_tokens(sentences: Sequence, what: str) -> None:
    if str in map(type, sentences):
        raise TypeError(f"{what} must be lists of words, not strings; split them with hfcap.metrics.simple_tokenize")


def _check_references(references: Sequence) -> np.ndarray:
    """Number of references per image; every image needs at least one."""
    counts = np.fromiter(map(len, references), np.int64, len(references))
    if (counts == 0).any():
        raise ValueError(f"image {int(np.argmax(counts == 0))} has no reference caption")
    return counts


def _word_ids(
    sentences: Sequence[Sequence[str]], vocabulary: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Flat word ids, per-sentence lengths and the vocabulary (built from the sentences when None).

    Words outside a given vocabulary get ids past it; it is not modified.
    """
    words = list(chain.from_iterable(sentences))
    lengths = np.fromiter(map(len, sentences), np.int64, len(sentences))
    if vocabulary is None:
        vocabulary = dict(zip(dict.fromkeys(words), range(len(words))))
        return np.fromiter(map(vocabulary.__getitem__, words), np.int64, len(words)), lengths, vocabulary
    ids = np.fromiter(map(vocabulary.get, words, repeat(-1)), np.int64, len(words))
    unseen = np.flatnonzero(ids < 0)
    if len(unseen):
        local: dict[str, int] = {}
        ids[unseen] = [len(vocabulary) + local.setdefault(words[i], len(local)) for i in unseen]
    return ids, lengths, vocabulary


def _count_ngrams(
    words: np.ndarray, lengths: np.ndarray, n: int, tables: list[np.ndarray] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """For each order k = 1..n: ``(table, ids, sentences, tf)`` of every distinct (k-gram, sentence) pair.

    The pairs come grouped by k-gram, sentences ascending within a group. ``table`` holds the sorted keys of the
    order; without ``tables`` it is built from these sentences, otherwise ``tables[k-1]`` is used and k-grams
    missing from it get ids ``>= len(table)`` (consistent within the call; the table is not modified).
    """
    sentence = np.repeat(np.arange(len(lengths)), lengths)
    left = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(words))  # words from here to the sentence end
    prefix = np.zeros(len(words), np.int64)
    at = np.arange(len(words))
    for k in range(n):
        at = at[left[at] > k]
        keys = (prefix[at] << _WORD_BITS) | words[at + k]
        # Stable: sentences stay ascending within a k-gram. numpy radix-sorts 16-bit keys (unigrams, usually).
        order = np.argsort(keys.astype(np.uint16) if keys.max(initial=0) < 1 << 16 else keys, kind="stable")
        keys, at = keys[order], at[order]
        new = _changes(keys)
        ids = np.cumsum(new) - 1
        if tables is None:
            table = keys[new]
        else:
            table = tables[k]
            group_ids, known = _find(table, keys[new])
            group_ids[~known] = len(table) + np.arange(np.count_nonzero(~known))
            ids = group_ids[ids]
        prefix[at] = ids
        sent = sentence[at]
        first = np.flatnonzero(new | _changes(sent))
        yield table, ids[first], sent[first], np.diff(np.append(first, len(at)))


def _length_penalty(candidate_lengths: np.ndarray, reference_lengths: np.ndarray, n: int, sigma: float) -> np.ndarray:
    """exp(-delta^2 / 2 sigma^2) on pycocoevalcap's lengths: the bigram counts (words - 1, never negative)."""
    if n < 2:
        return np.ones(len(reference_lengths))
    delta = (np.maximum(candidate_lengths - 1, 0) - np.maximum(reference_lengths - 1, 0)).astype(float)
    return np.e ** (-(delta**2) / (2 * sigma**2))


def _cosine(clipped: np.ndarray, candidate_norms: np.ndarray, reference_norms: np.ndarray) -> np.ndarray:
    """clipped / (|g(c)| |g(s)|), left undivided where a norm is 0 (as pycocoevalcap)."""
    denominator = candidate_norms * reference_norms
    return np.divide(clipped, denominator, out=clipped.astype(float), where=denominator != 0)


def _clipped_overlap(
    candidates: tuple, references: tuple, pair_candidate: np.ndarray, pair_ref: np.ndarray
) -> np.ndarray:
    """sum_w min(g(c)[w], g(s)[w]) * g(s)[w] of every (candidate c, reference s) pair.

    ``candidates`` and ``references`` are ``(ptr, ids, values)`` rows (CSR, ids ascending within a row).
    """
    cand_ptr, cand_ids, cand_values = candidates
    ref_ptr, ref_ids, ref_values = references
    used, slot = np.unique(pair_ref, return_inverse=True)
    # The used references' entries keyed (slot << 32 | id) are ascending, so searchsorted finds the matches.
    ref_count = ref_ptr[used + 1] - ref_ptr[used]
    ref_entries = _ranges(ref_ptr[used], ref_count)
    ref_keys = (np.repeat(np.arange(len(used)), ref_count) << 32) | ref_ids[ref_entries]
    # Each candidate's entries, once per pair.
    cand_count = cand_ptr[pair_candidate + 1] - cand_ptr[pair_candidate]
    cand_entries = _ranges(cand_ptr[pair_candidate], cand_count)
    pair = np.repeat(np.arange(len(pair_ref)), cand_count)
    found, match = _find(ref_keys, (slot[pair] << 32) | cand_ids[cand_entries])
    ref_value = np.zeros(len(pair))
    ref_value[match] = ref_values[ref_entries[found[match]]]
    return np.bincount(pair, np.minimum(cand_values[cand_entries], ref_value) * ref_value, len(pair_ref))


class CiderD:
    """CIDEr-D with document frequencies fixed at construction, as SCST needs (pycocoevalcap maths, exactly).

    Args:
        references: the reference captions of every image as token lists, ``[[["a", "dog"], ...], ...]``, or a
            mapping ``image_id -> list of token lists`` (then ``score`` takes image ids instead of positions).
            Document frequencies come from them (``N`` = number of images), and their TF-IDF vectors, norms and
            lengths are cached.
        n: maximum n-gram order.
        sigma: standard deviation of the Gaussian length penalty.
        document_frequency: optional precomputed ``{ngram tuple: df}`` (e.g. pycocoevalcap's
            ``CiderScorer.document_frequency`` or the ``"document_frequency"`` of a self-critical.pytorch
            ``coco-train-words.p``) used instead of the one of ``references``; needs ``num_documents``.
        num_documents: ``N`` of ``document_frequency`` (the ``"ref_len"`` entry of those pickles).

    Whether ``<eos>`` counts as a word is the caller's choice: to score with EOS (SacreEOS "Standard", as
    self-critical.pytorch and ExpansionNet v2), append ``"<eos>"`` to every reference and every candidate.

    n-grams never seen in the references get ids local to one ``score`` call, so the tables never grow.
    """

    def __init__(
        self,
        references: Sequence[Sequence[Sequence[str]]] | Mapping,
        *,
        n: int = 4,
        sigma: float = 6.0,
        document_frequency: Mapping[tuple[str, ...], float] | None = None,
        num_documents: int | None = None,
    ):
        if (document_frequency is None) != (num_documents is None):
            raise ValueError("document_frequency and num_documents must be given together")
        self.n, self.sigma = n, sigma
        self._image_index = {key: i for i, key in enumerate(references)} if isinstance(references, Mapping) else None
        references = list(references.values()) if isinstance(references, Mapping) else list(references)
        if not references:
            raise ValueError("CiderD needs the references of at least one image")
        counts = _check_references(references)
        sentences = [sentence for refs in references for sentence in refs]
        _check_tokens(sentences, "references")
        # n-grams of the given df table enter the id tables as extra pseudo-sentences, not as references.
        extra = [list(ngram) for ngram in document_frequency] if document_frequency is not None else []
        num_refs = len(sentences)
        words, lengths, self._vocabulary = _word_ids(sentences + extra)
        self.ref_len = float(np.log(float(len(references) if document_frequency is None else num_documents)))
        self._ref_ptr = np.concatenate([[0], np.cumsum(counts)])
        self._ref_lengths = lengths[:num_refs]
        image_of_ref = np.repeat(np.arange(len(references)), counts)
        self._tables, self._idf, self._refs = [], [], []
        for k, (table, ids, sentence, tf) in enumerate(_count_ngrams(words, lengths, n)):
            self._tables.append(table)
            if document_frequency is None:
                # df counts each image once, however many of its references hold the n-gram.
                image = image_of_ref[sentence]
                df = np.bincount(ids[_changes(ids) | _changes(image)], minlength=len(table))
            else:
                whole = np.flatnonzero((sentence >= num_refs) & (lengths[sentence] == k + 1))
                df = np.zeros(len(table))
                df[ids[whole]] = [document_frequency[tuple(extra[s - num_refs])] for s in sentence[whole]]
            idf = self.ref_len - np.log(np.maximum(1.0, df))
            self._idf.append(np.append(idf, self.ref_len))  # last entry: n-grams unseen here (df 0)
            real = sentence < num_refs
            order = np.argsort(sentence[real], kind="stable")  # reference-major, ids ascending within a reference
            ids, sentence, tf = ids[real][order], sentence[real][order], tf[real][order]
            values = tf * idf[ids]
            norms = np.sqrt(np.bincount(sentence, values * values, minlength=num_refs))
            ptr = np.concatenate([[0], np.cumsum(np.bincount(sentence, minlength=num_refs))])
            self._refs.append((ptr, ids.astype(np.int32), values, norms))

    @property
    def num_ngrams(self) -> int:
        """Number of distinct n-grams (all orders) known to the document-frequency tables."""
        return sum(len(table) for table in self._tables)

    def _image_positions(self, image_indices: Sequence, num_images: int, from_init: bool) -> np.ndarray:
        if from_init and self._image_index is not None:
            missing = [key for key in image_indices if key not in self._image_index]
            if missing:
                raise KeyError(f"image ids not in the references: {missing[:5]}")
            images = np.array([self._image_index[key] for key in image_indices], np.int64)
        else:
            images = np.asarray(image_indices, np.int64).reshape(-1)
        if len(images) and (images.min() < 0 or images.max() >= num_images):
            raise IndexError(f"image indices must lie in [0, {num_images})")
        return images

    def score(
        self,
        candidates: Sequence[Sequence[str]],
        image_indices: Sequence,
        references: Sequence[Sequence[Sequence[str]]] | None = None,
    ) -> np.ndarray:
        """Per-candidate CIDEr-D (x10 scale), float64 array of ``len(candidates)``.

        Args:
            candidates: token lists (``simple_tokenize`` output, plus ``"<eos>"`` in EOS mode).
            image_indices: the image of each candidate: a position in the constructor's references (an image id
                if they were a mapping), or in ``references`` when given.
            references: score against these token-list references (e.g. validation captions) instead of the
                cached ones, still with the constructor's document frequencies.
        """
        _check_tokens(candidates, "candidates")
        if len(image_indices) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(image_indices)} image indices")
        num = len(candidates)
        sentences = list(candidates)
        if references is None:
            ref_ptr = self._ref_ptr
        else:
            ref_ptr = np.concatenate([[0], np.cumsum(_check_references(references))])
            sentences += [sentence for refs in references for sentence in refs]
            _check_tokens(sentences[num:], "references")
        images = self._image_positions(image_indices, len(ref_ptr) - 1, references is None)
        words, lengths, _ = _word_ids(sentences, self._vocabulary)

        # (candidate, reference) pairs: every candidate against each reference of its image.
        per_candidate = ref_ptr[images + 1] - ref_ptr[images]
        pair_candidate = np.repeat(np.arange(num), per_candidate)
        pair_ref = _ranges(ref_ptr[images], per_candidate)
        ref_lengths = self._ref_lengths[pair_ref] if references is None else lengths[num + pair_ref]
        penalty = _length_penalty(lengths[pair_candidate], ref_lengths, self.n, self.sigma)

        total = np.zeros(len(pair_ref))
        for k, (_, ids, sentence, tf) in enumerate(_count_ngrams(words, lengths, self.n, self._tables)):
            order = np.argsort((sentence << 32) | ids)  # sentence-major, ids ascending within a sentence
            ids, sentence, tf = ids[order], sentence[order], tf[order]
            values = tf * self._idf[k][np.minimum(ids, len(self._idf[k]) - 1)]
            norms = np.sqrt(np.bincount(sentence, values * values, minlength=len(sentences)))
            ptr = np.searchsorted(sentence, np.arange(len(sentences) + 1))
            if references is None:
                refs = self._refs[k]
            else:
                refs = (ptr[num:] - ptr[num], ids[ptr[num] :], values[ptr[num] :], norms[num:])
            clipped = _clipped_overlap((ptr, ids, values), refs[:3], pair_candidate, pair_ref)
            total += _cosine(clipped, norms[pair_candidate], refs[3][pair_ref])
        return 10.0 * np.bincount(pair_candidate, total * penalty, num) / self.n / per_candidate


def cider_d_corpus(
    candidates: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """Corpus-mode CIDEr-D, as pycocoevalcap ``Cider().compute_score``: df from the evaluated references.

    ``candidates[i]`` (a token list) is scored against ``references[i]``. Returns ``(mean, per-caption
    scores)``. With a single image every idf is 0 and so is the score; tiny test sets need a fixed df
    (:class:`CiderD`). EOS handling as in :class:`CiderD`.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not len(candidates):
        raise ValueError("cider_d_corpus needs at least one candidate")
    counts = _check_references(references)
    # Image by image, the candidate first: within an n-gram's group its entry leads the image's reference entries.
    sentences = [sentence for candidate, refs in zip(candidates, references) for sentence in (candidate, *refs)]
    _check_tokens(sentences, "candidates and references")
    first_of_image = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    image = np.repeat(np.arange(len(counts)), counts + 1)
    candidate_of = first_of_image[image]  # sentence index of the candidate of each sentence's image
    is_ref = np.ones(len(sentences), bool)
    is_ref[first_of_image] = False
    words, lengths, _ = _word_ids(sentences)
    ref_len = np.log(float(len(counts)))
    total = np.zeros(len(sentences))
    for table, ids, sentence, tf in _count_ngrams(words, lengths, n):
        run_start = _changes(ids) | _changes(image[sentence])  # runs of one n-gram within one image
        run = np.cumsum(run_start) - 1
        starts = np.flatnonzero(run_start)
        ref_entry = is_ref[sentence]
        # A run holds a reference unless it is the candidate's entry alone.
        in_refs = ref_entry[starts] | (np.diff(np.append(starts, len(ids))) > 1)
        df = np.bincount(ids[starts[in_refs]], minlength=len(table))
        values = tf * (ref_len - np.log(np.maximum(1.0, df)))[ids]
        norms = np.sqrt(np.bincount(sentence, values * values, minlength=len(sentences)))
        candidate_value = np.where(ref_entry[starts], 0.0, values[starts])[run]
        clipped = np.where(ref_entry, np.minimum(candidate_value, values) * values, 0.0)
        total += _cosine(np.bincount(sentence, clipped, len(sentences)), norms[candidate_of], norms)
    penalty = _length_penalty(lengths[candidate_of], lengths, n, sigma)
    scores = 10.0 * np.bincount(image, np.where(is_ref, total * penalty, 0.0), len(counts)) / n / counts
    return float(scores.mean()), scores
