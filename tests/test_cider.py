"""hfcap.metrics.cider against pycocoevalcap's CIDEr-D, computed here on the same tokens."""

import copy
import random
from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.cider.cider_scorer import CiderScorer  # noqa: E402

from hfcap.metrics.cider import CiderD, _intern, cider_d_corpus, simple_tokenize  # noqa: E402

WORDS = "a the dog cat man on of with in is sitting red big table street".split()


def _caption(rng, low=1, high=12):
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def _corpus(seed, num_images):
    """Images with 1-5 references from a 15-word vocabulary (many shared and repeated n-grams), plus edge cases."""
    rng = random.Random(seed)
    refs = [[_caption(rng) for _ in range(rng.randint(1, 5))] for _ in range(num_images)]
    refs[0] = [["dog"], ["a", "dog"], []]  # single-word and empty references
    refs[1] = [["a", "dog", "a", "dog", "a", "dog", "a", "dog", "on", "a", "dog"]] * 2  # repeated n-grams, duplicates
    return refs


def _candidates(seed, refs):
    """One candidate per image: random lengths plus the edge cases of CIDEr-D."""
    rng = random.Random(seed)
    candidates = [_caption(rng, 0, 16) for _ in refs]
    candidates[:8] = [
        [],  # empty
        ["a", "dog", "a", "dog", "a", "dog"],  # repeated n-grams (clipping)
        list(refs[2][0]),  # equal to a reference
        ["dog"],  # single word
        ["zebra", "skateboard", "a", "dog", "zebra", "skateboard"],  # unseen words and n-grams
        _caption(rng, 25, 30),  # far longer than the references (length penalty)
        ["the", "the", "the"],
        ["man", "on", "a", "zebra"],  # unseen word inside known n-grams
    ]
    return candidates


def _join(tokens):
    return " ".join(tokens)


def _pycoco_corpus(candidates, refs):
    """pycocoevalcap Cider().compute_score: df and N from ``refs``, candidate i against refs[i]."""
    return Cider().compute_score({i: [_join(r) for r in rs] for i, rs in enumerate(refs)},
                                 {i: [_join(c)] for i, c in enumerate(candidates)})


def _pycoco_with_df(candidates, candidate_refs, train_refs):
    """pycocoevalcap CiderScorer with the df of ``train_refs`` injected (as SCST codebases do).

    compute_cider sets N = number of cooked pairs, so exactly len(train_refs) pairs are cooked.
    """
    assert len(candidates) == len(train_refs)
    df_scorer = CiderScorer(n=4, sigma=6.0)
    for refs in train_refs:
        df_scorer.cook_append(None, [_join(r) for r in refs])
    df_scorer.compute_doc_freq()
    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, candidate_refs):
        scorer.cook_append(_join(candidate), [_join(r) for r in refs])
    scorer.document_frequency = copy.copy(df_scorer.document_frequency)
    return np.array(scorer.compute_cider()), dict(df_scorer.document_frequency)


@pytest.fixture(scope="module")
def train():
    return _corpus(0, 40)


@pytest.fixture(scope="module")
def scorer(train):
    return CiderD(train)


def test_precomputed_df_matches_pycocoevalcap(train, scorer):
    # pycocoevalcap computes df from the refs it scores against: the training refs, one candidate per image.
    expected = {}
    for seed in (1, 2, 3):
        candidates = _candidates(seed, train)
        _, scores = _pycoco_corpus(candidates, train)
        np.testing.assert_allclose(scorer.score(candidates, range(len(train))), scores, rtol=0, atol=1e-9)
        expected.update({(_join(c), i): score for i, (c, score) in enumerate(zip(candidates, scores))})
    # One shuffled batch holding several candidates per image gives the same per-caption scores.
    pairs = list(expected)
    random.Random(4).shuffle(pairs)
    batch = scorer.score([c.split() for c, _ in pairs], [i for _, i in pairs])
    np.testing.assert_allclose(batch, [expected[pair] for pair in pairs], rtol=0, atol=1e-9)


def test_corpus_mode_matches_pycocoevalcap():
    refs = _corpus(5, 30)
    candidates = _candidates(6, refs)
    mean, scores = cider_d_corpus(candidates, refs)
    expected_mean, expected = _pycoco_corpus(candidates, refs)
    assert scores.max() > 1.0  # a real range of scores, not all zeros
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert mean == pytest.approx(expected_mean, abs=1e-9)
    # Two images: the tiny-set regime of the spec (a candidate equal to a reference scored 5.45 there).
    two = [[["a", "dog", "on", "the", "street"]], [["a", "cat", "on", "a", "table"]]]
    np.testing.assert_allclose(cider_d_corpus([two[0][0], ["a", "cat"]], two)[1],
                               _pycoco_corpus([two[0][0], ["a", "cat"]], two)[1], rtol=0, atol=1e-9)


# Long words sharing their first 7 or more letters (strings are interned 7 bytes, then 3 at a time), short ones.
STRING_WORDS = [
    "skateboarder", "skateboarders", "skateboarding", "abcdefg", "abcdefgh", "abcdefghi", "abcdefghij",
    "abcdefghijk", "refrigerator", "refrigerators", "x" * 20, "x" * 21, "a\0b", "a", "dog", "on", "the", "it's",
]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f"]


def _string_corpus(seed, num_images, words):
    """Caption strings of ``words`` joined by assorted whitespace (what str.split splits on), some empty."""
    rng = random.Random(seed)

    def text():
        parts = [rng.choice(["", *WHITESPACE])]
        for _ in range(rng.randint(0, 12)):
            parts += [rng.choice(words), rng.choice(WHITESPACE)]
        return "".join(parts[: rng.choice([-1, len(parts)])])

    return [text() for _ in range(num_images)], [[text() for _ in range(rng.randint(1, 5))] for _ in range(num_images)]


@pytest.mark.parametrize("extra_words", [[], ["café", "naïve", "dog\u00a0on", "\u3000the"]], ids=["ascii", "unicode"])
def test_corpus_mode_on_strings_matches_pycocoevalcap(extra_words):
    candidates, refs = _string_corpus(10, 40, STRING_WORDS + extra_words)
    candidates[:4] = ["skateboarding dog", "abcdefghi abcdefgh", "", " \t "]  # near misses of long words, empty
    refs[0] = refs[1] = ["a skateboarder dog", "abcdefghij abcdefgh"]
    candidates[4] = refs[4][0] = "the  abcdefghijk\tx refrigerators on it's skateboarders"  # a real match
    _, scores = cider_d_corpus(candidates, refs)
    _, expected = Cider().compute_score(dict(enumerate(refs)), {i: [c] for i, c in enumerate(candidates)})
    assert scores.max() > 1.0
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    _, from_tokens = cider_d_corpus([c.split() for c in candidates], [[r.split() for r in rs] for rs in refs])
    np.testing.assert_allclose(scores, from_tokens, rtol=0, atol=1e-12)


def test_corpus_mode_refuses_mixed_or_unlisted_captions():
    with pytest.raises(TypeError, match="not a mix"):
        cider_d_corpus(["a dog", ["a", "cat"]], [["a dog"], ["a cat"]])
    with pytest.raises(TypeError, match="not a single string"):
        cider_d_corpus(["a dog", "a cat"], ["a dog", "a cat"])


def test_intern_gives_equal_keys_equal_dense_ids():
    # 5,000 distinct keys, repeated, in a table of 2**16 slots: many collide and are placed by linear probing.
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 2**63, 5_000, dtype=np.uint64)
    distinct[:100] = np.arange(100, dtype=np.uint64) << np.uint64(40)  # keys differing only in high bits
    keys = distinct[rng.integers(0, len(distinct), 30_000)]
    ids = _intern(keys)
    _, expected = np.unique(keys, return_inverse=True)
    assert ids.max() == len(np.unique(keys)) - 1
    assert len(set(zip(ids.tolist(), expected.tolist()))) == len(np.unique(keys))  # the same partition
    assert len(_intern(np.zeros(0, np.uint64))) == 0


def test_external_references_and_injected_df_match_pycocoevalcap(train, scorer):
    val = _corpus(7, 12)
    candidates = _candidates(8, train)  # 40 candidates, one per training image count, scored against val refs
    images = [i % len(val) for i in range(len(candidates))]
    expected, train_df = _pycoco_with_df(candidates, [val[i] for i in images], train)
    np.testing.assert_allclose(scorer.score(candidates, images, references=val), expected, rtol=0, atol=1e-9)
    injected = CiderD(val, document_frequency=train_df, num_documents=len(train))
    np.testing.assert_allclose(injected.score(candidates, images), expected, rtol=0, atol=1e-9)


def test_sigma_and_mapping_references(train):
    candidates = _candidates(9, train)
    references = {f"img{i}": refs for i, refs in enumerate(train)}
    got = CiderD(references, sigma=3.0).score(candidates, list(references))
    scorer = CiderScorer(n=4, sigma=3.0)
    for candidate, refs in zip(candidates, train):
        scorer.cook_append(_join(candidate), [_join(r) for r in refs])
    np.testing.assert_allclose(got, scorer.compute_score()[1], rtol=0, atol=1e-9)


def test_unseen_ngrams_do_not_grow_the_tables(train, scorer):
    size = scorer.num_ngrams
    novel = [["zebra", "giraffe", "on", "a", "surfboard"], ["a", "giraffe", "giraffe"], ["zebra"]]
    first = scorer.score(novel, [0, 1, 2])
    assert scorer.num_ngrams == size
    # Unseen ids are local to a call: scoring alone, in another order or again gives the same numbers.
    np.testing.assert_array_equal(scorer.score(novel[::-1], [2, 1, 0])[::-1], first)
    for j in range(3):
        assert scorer.score([novel[j]], [j])[0] == pytest.approx(first[j], abs=1e-12)
    # pycocoevalcap's defaultdict, by contrast, gains every unseen n-gram it looks up.
    reference = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(novel, train):
        reference.cook_append(_join(candidate), [_join(r) for r in refs])
    reference.document_frequency = defaultdict(float, {("a",): 1.0})
    reference.compute_cider()
    assert len(reference.document_frequency) > 1


def test_bad_input_is_refused(scorer):
    with pytest.raises(TypeError, match="lists of words"):
        scorer.score(["a dog on the street"], [0])
    with pytest.raises(ValueError, match="image indices"):
        scorer.score([["a", "dog"]], [0, 1])
    with pytest.raises(IndexError, match=r"\[0, 40\)"):
        scorer.score([["a", "dog"]], [40])
    with pytest.raises(ValueError, match="image 1 has no reference"):
        CiderD([[["a", "dog"]], []])
    with pytest.raises(ValueError, match="together"):
        CiderD([[["a"]]], document_frequency={("a",): 1})
    with pytest.raises(KeyError, match="not in the references"):
        CiderD({"x": [["a"]]}).score([["a"]], ["y"])


def test_simple_tokenize_matches_the_word_level_tokenizer_pipeline():
    tokenizers = pytest.importorskip("tokenizers")
    normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.NFD(), tokenizers.normalizers.StripAccents(), tokenizers.normalizers.Lowercase()]
    )
    pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Punctuation(behavior="removed")]
    )
    texts = [
        "A dog's toy.", "Café déjà-vu!", "two  cats\ton a (red) bed...", "It's 3:30 p.m., OK?",
        "naïve résumé — “quoted” «text»", "$100 + 50% off #1 @home ~ ^ | `x` <eos>",
        "日本語のテキスト。",
        "हिन्दी पाठ", "İSTANBUL", "", "   ",
    ]
    for text in texts:
        expected = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
        assert simple_tokenize(text) == expected, text
    assert simple_tokenize("A dog's toy.") == ["a", "dog", "s", "toy"]
