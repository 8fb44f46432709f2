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
tuples. Here n-grams are integer ids built order by order: the id of a k-gram is its rank among the sorted keys
``word << 32 | id of the (k-1)-gram after the word`` of that order, and one stable radix pass over the words,
taken in the order of the (k-1)-grams after them, yields the ids, document frequencies and term frequencies of a
whole corpus; everything else is numpy arithmetic. Caption strings are split and their words interned from the
bytes with a vectorised hash table, without a Python object per word.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, repeat

import numpy as np

_BYTE_MASKS = np.array([(1 << 8 * size) - 1 for size in range(8)], np.uint64)  # the low 0..7 bytes of a uint64
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, the multiplier of Fibonacci hashing
_EMPTY = np.uint64(2**64 - 1)  # a free slot of _intern's table


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
    if str in map(type, references):
        raise TypeError("the references of an image must be a list of captions, not a single string")
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
        return np.fromiter(map(vocabulary.__getitem__, words), np.int32, len(words)), lengths, vocabulary
    ids = np.fromiter(map(vocabulary.get, words, repeat(-1)), np.int32, len(words))
    unseen = np.flatnonzero(ids < 0)
    if len(unseen):
        local: dict[str, int] = {}
        ids[unseen] = [len(vocabulary) + local.setdefault(words[i], len(local)) for i in unseen]
    return ids, lengths, vocabulary


def _intern(keys: np.ndarray) -> np.ndarray:
    """Dense ids of uint64 keys below ``2**63``: equal keys, equal ids (numbered in no particular order).

    A vectorised open-addressing hash table (linear probing), at most half full; a key's id is the rank of the slot
    holding it.
    """
    bits = max(1, (2 * len(keys)).bit_length())
    slot = np.multiply(keys, _FIBONACCI)
    slot >>= np.uint64(64 - bits)  # Fibonacci hashing: the top bits of key * 2**64 / golden ratio
    slot = slot.view(np.int64)
    table = np.full(1 << bits, _EMPTY)
    table[slot] = keys  # the table is empty: every key claims its slot, one of several claimants wins
    pending = np.flatnonzero(table[slot] != keys)
    while len(pending):  # the losers probe the next slot, claim it if free, stop at their own key
        slot[pending] = (slot[pending] + 1) & ((1 << bits) - 1)
        at, key = slot[pending], keys[pending]
        free = table[at] == _EMPTY
        table[at[free]] = key[free]
        pending = pending[table[at] != key]
    occupied = np.flatnonzero(table != _EMPTY)
    ids = np.empty(len(table), np.int32)  # read only where occupied
    ids[occupied] = np.arange(len(occupied), dtype=np.int32)
    return ids[slot]


def _split_strings(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word ids (distinct, not dense) and per-sentence lengths of strings split on whitespace, as ``str.split()``.

    ASCII text is split and interned from its bytes, with no Python object per word: a word is keyed by its first 7
    bytes and its length (8 meaning longer), and while it goes on by its id so far and its next 3 bytes (with the
    number left, 4 meaning more). Other text goes through ``str.split``.
    """
    joined = "\n".join(sentences)
    if not joined.isascii():
        words, lengths, _ = _word_ids([sentence.split() for sentence in sentences])
        return words, lengths
    data = np.zeros(len(joined) + 8, np.uint8)  # 8 bytes of padding for the last word's window
    data[: len(joined)] = np.frombuffer(joined.encode("ascii"), np.uint8)
    window = np.ndarray((len(joined),), "<u8", data, strides=(1,))  # window[i]: bytes i..i+7, byte i lowest
    space = np.ones(len(joined) + 2, bool)  # padded with a space at both ends
    # str.split()'s ASCII whitespace: \t \n \v \f \r (9-13), the separators \x1c-\x1f and the space (28-32).
    text = data[: len(joined)]
    np.less(text - 9, 5, out=space[1:-1])
    space[1:-1] |= text - 28 < 5
    edges = np.flatnonzero(space[1:] != space[:-1])  # alternately the start and the end of a word
    starts, length = edges[::2], (edges[1::2] - edges[::2]).astype(np.uint64)
    ids = _intern(window[starts] & _BYTE_MASKS[np.minimum(length, 7)] | np.minimum(length, 8) << np.uint64(56))
    longer, done = np.flatnonzero(length > 7), 7
    while len(longer):
        left = length[longer] - np.uint64(done)
        rest = window[starts[longer] + done] & _BYTE_MASKS[np.minimum(left, 3)]
        rest |= np.minimum(left, 4) << np.uint64(24)
        ids[longer] = ids.max() + 1 + _intern(ids[longer].astype(np.uint64) << np.uint64(27) | rest)
        longer, done = longer[left > 3], done + 3
    sizes = np.fromiter(map(len, sentences), np.int64, len(sentences)) + 1  # with the newline after each
    first_words = np.searchsorted(starts, np.cumsum(sizes) - sizes)
    return ids, np.diff(first_words, append=len(starts))


def _corpus_words(sentences: list) -> tuple[np.ndarray, np.ndarray]:
    """Word ids and per-sentence lengths of token lists, or of strings split on whitespace (``str.split``)."""
    kinds = set(map(type, sentences))
    if str not in kinds:
        words, lengths, _ = _word_ids(sentences)
        return words, lengths
    if kinds != {str}:
        raise TypeError("captions must be all strings or all lists of words, not a mix")
    return _split_strings(sentences)


def _stable_argsort(keys: np.ndarray, bits: int) -> np.ndarray:
    """Stable argsort of non-negative integer keys below ``2**bits``: LSD radix sort, 16 bits a pass.

    numpy radix-sorts uint16 keys, several times faster than its merge sort of int64 keys.
    """
    order = np.argsort(keys.astype(np.uint16), kind="stable")
    for shift in range(16, bits, 16):
        order = order[np.argsort((keys[order] >> shift).astype(np.uint16), kind="stable")]
    return order


def _count_ngrams(
    words: np.ndarray, lengths: np.ndarray, n: int, tables: list[np.ndarray] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """For each order k = 1..n: ``(table, ids, sentences, tf)`` of every distinct (k-gram, sentence) pair.

    The pairs come grouped by k-gram, sentences ascending within a group. A k-gram is the key
    ``word << 32 | id of the (k-1)-gram after the word`` (a unigram: the word) and its id is its row in ``table``,
    the sorted keys of the order. Without ``tables`` they are built from these sentences, otherwise ``tables[k-1]``
    is used and k-grams missing from it get ids ``>= len(table)`` (consistent within the call; the table is not
    modified).

    One radix pass per order (two past 65,536 words): the word occurrences, sorted by the id of the (k-1)-gram that
    starts after them, are sorted stably by their word, which sorts the k-grams starting at them by
    (word, (k-1)-gram).
    """
    sentence = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)  # int32: less memory to fault in
    first_word = np.zeros(len(words), bool)
    first_word[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
    word_bits = int(words.max(initial=0)).bit_length()
    at = np.arange(len(words), dtype=np.int32)  # start of each k-gram occurrence, by the (k-1)-gram after it
    rank = np.zeros(len(words), np.int32)  # local rank of that (k-1)-gram
    group_ids = None  # table id of each local rank (None: the rank itself)
    for k in range(n):
        if k:
            extends = np.flatnonzero(~first_word[at])  # the k-gram at at - 1: its word, then the (k-1)-gram at at
            at, rank = at[extends], rank[extends]
            at -= 1
        word = words[at]
        order = _stable_argsort(word, word_bits)
        at, rank, word = at[order], rank[order], word[order]
        new = _changes(word) | _changes(rank)
        if k:
            suffix = rank[new] if group_ids is None else group_ids[rank[new]]
            keys = (word[new].astype(np.int64) << 32) | suffix
        else:
            keys = word[new].astype(np.int64)
        rank = np.cumsum(new, dtype=np.int32)
        rank -= 1
        if tables is None:
            table = keys
        else:
            table = tables[k]
            group_ids, known = _find(table, keys)
            group_ids[~known] = len(table) + np.arange(np.count_nonzero(~known))
        sent = sentence[at]
        first = np.flatnonzero(new | _changes(sent))
        ids = rank[first] if group_ids is None else group_ids[rank[first]]
        yield table, ids, sent[first], np.diff(first, append=len(at))


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


def _image_major(
    ids: np.ndarray, ref: np.ndarray, values: np.ndarray, image_of_ref: np.ndarray, num_images: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reference entries ``(ref, n-gram id, value)`` image by image, ids ascending: ``(image ptr, ids, refs, values)``.

    The lookup table of :func:`_clipped_overlap`: the references of one image holding an n-gram are consecutive.
    """
    image = image_of_ref[ref]
    key = image.astype(np.int64) * (int(ids.max(initial=0)) + 1) + ids
    order = _stable_argsort(key, int(key.max(initial=0)).bit_length())
    ptr = np.concatenate([[0], np.cumsum(np.bincount(image, minlength=num_images))])
    return ptr, ids[order].astype(np.int32), ref[order].astype(np.int32), values[order]


def _clipped_overlap(
    candidates: tuple[np.ndarray, np.ndarray, np.ndarray],
    references: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    images: np.ndarray,
    pair_base: np.ndarray,
    num_pairs: int,
) -> np.ndarray:
    """sum_w min(g(c)[w], g(s)[w]) * g(s)[w] of every (candidate c, reference s of its image) pair.

    ``candidates`` are entries ``(candidate, n-gram id, value)``, ``references`` an :func:`_image_major` table,
    ``images`` the image of each candidate; the pair (c, s) is ``pair_base[c] + s``.
    """
    cand, cand_ids, cand_values = candidates
    ptr, ref_ids, ref_of, ref_values = references
    used, slot = np.unique(images, return_inverse=True)
    count = ptr[used + 1] - ptr[used]
    entries = _ranges(ptr[used], count)
    # The used images' entries keyed (slot << 32 | id) are ascending; the sentinel key ends every scan below.
    keys = np.append((np.repeat(np.arange(len(used)), count) << 32) | ref_ids[entries], np.iinfo(np.int64).max)
    query = (slot[cand] << 32) | cand_ids
    at = np.searchsorted(keys, query)  # first reference entry of the candidate's image holding its n-gram
    base = pair_base[cand]
    clipped = np.zeros(num_pairs)
    while len(at):  # the references of one image holding the n-gram are consecutive
        match = keys[at] == query
        at, query, base, cand_values = at[match], query[match], base[match], cand_values[match]
        entry = entries[at]
        ref_value = ref_values[entry]
        clipped += np.bincount(base + ref_of[entry], np.minimum(cand_values, ref_value) * ref_value, num_pairs)
        at += 1
    return clipped


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
        self._image_of_ref = np.repeat(np.arange(len(references)), counts)
        self._tables, self._idf, self._refs = [], [], []
        for k, (table, ids, sentence, tf) in enumerate(_count_ngrams(words, lengths, n)):
            self._tables.append(table)
            if document_frequency is None:
                # df counts each image once, however many of its references hold the n-gram.
                image = self._image_of_ref[sentence]
                df = np.bincount(ids[_changes(ids) | _changes(image)], minlength=len(table))
            else:
                whole = np.flatnonzero((sentence >= num_refs) & (lengths[sentence] == k + 1))
                df = np.zeros(len(table))
                df[ids[whole]] = [document_frequency[tuple(extra[s - num_refs])] for s in sentence[whole]]
            idf = self.ref_len - np.log(np.maximum(1.0, df))
            self._idf.append(np.append(idf, self.ref_len))  # last entry: n-grams unseen here (df 0)
            real = sentence < num_refs
            ids, sentence, tf = ids[real], sentence[real], tf[real]
            values = tf * idf[ids]
            norms = np.sqrt(np.bincount(sentence, values * values, minlength=num_refs))
            self._refs.append((_image_major(ids, sentence, values, self._image_of_ref, len(references)), norms))

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
            ref_ptr, image_of_ref = self._ref_ptr, self._image_of_ref
        else:
            counts = _check_references(references)
            ref_ptr, image_of_ref = np.concatenate([[0], np.cumsum(counts)]), np.repeat(np.arange(len(counts)), counts)
            sentences += [sentence for refs in references for sentence in refs]
            _check_tokens(sentences[num:], "references")
        images = self._image_positions(image_indices, len(ref_ptr) - 1, references is None)
        words, lengths, _ = _word_ids(sentences, self._vocabulary)

        # (candidate, reference) pairs: every candidate against each reference of its image.
        per_candidate = ref_ptr[images + 1] - ref_ptr[images]
        pair_candidate = np.repeat(np.arange(num), per_candidate)
        pair_ref = _ranges(ref_ptr[images], per_candidate)
        pair_base = np.cumsum(per_candidate) - per_candidate - ref_ptr[images]  # pair (c, s) = pair_base[c] + s
        ref_lengths = self._ref_lengths[pair_ref] if references is None else lengths[num + pair_ref]
        penalty = _length_penalty(lengths[pair_candidate], ref_lengths, self.n, self.sigma)

        total = np.zeros(len(pair_ref))
        for k, (_, ids, sentence, tf) in enumerate(_count_ngrams(words, lengths, self.n, self._tables)):
            values = tf * self._idf[k][np.minimum(ids, len(self._idf[k]) - 1)]
            norms = np.sqrt(np.bincount(sentence, values * values, minlength=len(sentences)))
            if references is None:
                refs, ref_norms = self._refs[k]
                cand = slice(None)
            else:
                cand, ref = sentence < num, sentence >= num
                refs = _image_major(ids[ref], sentence[ref] - num, values[ref], image_of_ref, len(references))
                ref_norms = norms[num:]
            entries = (sentence[cand], ids[cand], values[cand])
            clipped = _clipped_overlap(entries, refs, images, pair_base, len(pair_ref))
            total += _cosine(clipped, norms[pair_candidate], ref_norms[pair_ref])
        return 10.0 * np.bincount(pair_candidate, total * penalty, num) / self.n / per_candidate


def cider_d_corpus(
    candidates: Sequence[Sequence[str] | str],
    references: Sequence[Sequence[Sequence[str] | str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """Corpus-mode CIDEr-D, as pycocoevalcap ``Cider().compute_score``: df from the evaluated references.

    ``candidates[i]`` is scored against ``references[i]``. Captions are token lists, or tokenised strings split on
    whitespace as pycocoevalcap does (all of one kind). Returns ``(mean, per-caption scores)``. With a single image
    every idf is 0 and so is the score; tiny test sets need a fixed df (:class:`CiderD`). EOS handling as in
    :class:`CiderD`.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not len(candidates):
        raise ValueError("cider_d_corpus needs at least one candidate")
    counts = _check_references(references)
    # Image by image, the candidate first: in an n-gram's group its entry leads the image's reference entries.
    sentences = [sentence for candidate, refs in zip(candidates, references) for sentence in (candidate, *refs)]
    words, lengths = _corpus_words(sentences)
    first_of_image = np.cumsum(counts + 1) - (counts + 1)
    image = np.repeat(np.arange(len(counts)), counts + 1)
    candidate_of = first_of_image[image].astype(np.int32)  # sentence index of the candidate of each sentence's image
    is_ref = candidate_of != np.arange(len(sentences))
    ref_len = np.log(float(len(counts)))
    total = np.zeros(len(sentences))
    for table, ids, sentence, tf in _count_ngrams(words, lengths, n):
        own_candidate = candidate_of[sentence]
        ref = sentence != own_candidate
        # same_run[e]: entry e continues the run of entry e - 1 (same n-gram, same image: the sentence of e - 1 is
        # not before the candidate of e's image); False past the end.
        same_run = np.zeros(len(ids) + 1, bool)
        np.equal(ids[1:], ids[:-1], out=same_run[1:-1])
        same_run[1:-1] &= sentence[:-1] >= own_candidate[1:]
        # df(w) = images whose references hold w: count each run at its first reference entry.
        first_ref = ref.copy()
        first_ref[1:] &= ~(same_run[1:-1] & ref[:-1])
        df = np.bincount(ids[first_ref], minlength=len(table))
        values = (ref_len - np.log(np.maximum(1.0, df)))[ids]
        values *= tf
        norms = np.sqrt(np.bincount(sentence, values * values, len(sentences)))
        # The reference entries sharing a candidate entry's n-gram follow it in its run.
        clipped = np.zeros(len(sentences))
        cand = np.flatnonzero(~ref)
        cand_values, follower = values[cand], cand + 1
        while len(follower):
            match = same_run[follower]
            cand_values, follower = cand_values[match], follower[match]
            ref_values = values[follower]
            clipped += np.bincount(sentence[follower], np.minimum(cand_values, ref_values) * ref_values, len(sentences))
            follower += 1
        total += _cosine(clipped, norms[candidate_of], norms)
    penalty = _length_penalty(lengths[candidate_of], lengths, n, sigma)
    scores = 10.0 * np.bincount(image, np.where(is_ref, total * penalty, 0.0), len(counts)) / n / counts
    return float(scores.mean()), scores
