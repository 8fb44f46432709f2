"""Word-level tokenizer: built vocabularies, the authors' fixed vocabularies (real files), save/load round trip."""

import collections
import json
import pickle
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hfcap.processing import build_word_level_tokenizer, tokenizer_from_vocabulary

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
WORD = re.compile(r"[a-z0-9]+")  # tokens reachable through encode (no punctuation, no whitespace, lowercase)


class _AllowlistUnpickler(pickle.Unpickler):
    """Test-only reader of the authors' vocab pickles: M2's `data.vocab.Vocab` becomes a plain object."""

    class Vocab:
        pass

    ALLOWED = {
        ("data.vocab", "Vocab"): Vocab,
        ("data.vocab", "_default_unk_index"): int,
        ("collections", "Counter"): collections.Counter,
        ("collections", "defaultdict"): collections.defaultdict,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return self.ALLOWED[module, name]


def _unpickle(path):
    with open(path, "rb") as f:
        return _AllowlistUnpickler(f).load()


@pytest.fixture(scope="module")
def expansionnet_vocab():
    """ExpansionNet v2's released vocabulary: (idx2word_list, word2idx_dict)."""
    data = _unpickle(FIXTURES / "real" / "expansionnet_v2_demo_coco_tokens.pickle")
    return data["idx2word_list"], data["word2idx_dict"]


@pytest.fixture(scope="module")
def expansionnet_tokenizer(expansionnet_vocab):
    tokens, _ = expansionnet_vocab
    return tokenizer_from_vocabulary(tokens, pad_token="PAD", bos_token="SOS", eos_token="EOS", unk_token="UNK")


CAPTIONS = ["a dog runs"] * 5 + ["a cat sleeps"] * 4 + ["A DOG, on the grass!"]


def test_build_specials_and_min_frequency():
    tok = build_word_level_tokenizer(CAPTIONS, min_frequency=5)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    # counts after normalisation: a 10, dog 6, runs 5 (kept); cat/sleeps 4, on/the/grass 1 (dropped)
    assert set(tok.get_vocab()) == {"<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "runs"}
    assert tok.convert_ids_to_tokens([4, 5, 6]) == ["a", "dog", "runs"]  # most frequent first
    assert tok("a cat runs", add_special_tokens=False)["input_ids"] == [4, 3, 6]
    assert set(build_word_level_tokenizer(CAPTIONS, min_frequency=4).get_vocab()) >= {"cat", "sleeps"}
    ties = build_word_level_tokenizer(["zebra yak apple", "apple yak zebra"], min_frequency=1)
    assert ties.convert_ids_to_tokens([4, 5, 6]) == ["apple", "yak", "zebra"]  # equal counts: alphabetical


def test_normalisation_lowercase_punctuation_accents():
    tok = tokenizer_from_vocabulary(
        ["<pad>", "<bos>", "<eos>", "<unk>", "a", "man", "s", "t", "shirt", "cafe", "dog"], **SPECIALS
    )
    ids = tok("  A MAN's T-Shirt,\tin a Café... DOG!", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "man", "s", "t", "shirt", "<unk>", "a", "cafe", "dog"]
    assert tok("a dog")["input_ids"] == [1, 4, 10, 2]  # __call__ adds bos ... eos
    assert tok.decode([1, 4, 10, 2]) == "<bos> a dog <eos>"
    assert tok.decode([1, 4, 10, 2], skip_special_tokens=True) == "a dog"
    assert tok.batch_decode([[4, 5], [10]]) == ["a man", "dog"]


def test_model_max_length():
    assert build_word_level_tokenizer(CAPTIONS, model_max_length=22).model_max_length == 22


def test_vocabulary_errors():
    with pytest.raises(ValueError, match="duplicate vocabulary token 'a' at ids 4 and 5"):
        tokenizer_from_vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"], **SPECIALS)
    with pytest.raises(ValueError, match="bos_token='<start>'"):
        tokenizer_from_vocabulary(["<pad>", "<unk>"], **{**SPECIALS, "bos_token": "<start>", "eos_token": "<unk>"})


def test_expansionnet_v2_vocabulary_ids(expansionnet_vocab, expansionnet_tokenizer):
    tokens, word2idx = expansionnet_vocab
    tok = expansionnet_tokenizer
    assert len(tok) == 10000
    assert [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id] == [77, 78, 79, 80]
    assert tok.convert_tokens_to_ids(tokens) == list(range(10000))
    words = [t for t in tokens if WORD.fullmatch(t)]
    assert len(words) > 9900
    assert tok(" ".join(words), add_special_tokens=False)["input_ids"] == [word2idx[w] for w in words]
    assert tok.decode([word2idx[w] for w in words[:50]]) == " ".join(words[:50])
    # special-token names typed as words are plain words, never the special ids
    expected = [word2idx["a"], word2idx["mouse"], word2idx["pad"]]
    assert tok("a mouse PAD", add_special_tokens=False)["input_ids"] == expected


def test_m2_vocabulary_ids():
    itos = _unpickle(FIXTURES / "real" / "m2_vocab.pkl").itos
    tok = tokenizer_from_vocabulary(itos, **SPECIALS)
    assert [tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(itos) == list(range(len(itos)))
    stoi = {t: i for i, t in enumerate(itos)}
    words = [t for t in itos if WORD.fullmatch(t)]
    assert tok(" ".join(words), add_special_tokens=False)["input_ids"] == [stoi[w] for w in words]


@pytest.mark.parametrize("case", ["small", "small-b"])
def test_show_attend_tell_wordmap_ids(case):
    word_map = json.loads((FIXTURES / "reference" / "sat" / case / "WORDMAP.json").read_text())
    tokens = sorted(word_map, key=word_map.get)
    assert [word_map[t] for t in tokens] == list(range(len(tokens)))
    tok = tokenizer_from_vocabulary(tokens, **{**SPECIALS, "bos_token": "<start>", "eos_token": "<end>"})
    n = len(tokens)
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, n - 3, n - 2, n - 1]
    words = [t for t in tokens if WORD.fullmatch(t)]
    assert tok(" ".join(words))["input_ids"] == [n - 2] + [word_map[w] for w in words] + [n - 1]


def test_save_load_with_autotokenizer(tmp_path, expansionnet_tokenizer):
    built = build_word_level_tokenizer(CAPTIONS, min_frequency=1, model_max_length=30)
    texts = ["A dog runs!", "the cat sleeps on the GRASS", "zebra", "", "a <unk> EOS pad"]
    for name, tok in [("built", built), ("expansionnet", expansionnet_tokenizer)]:
        tok.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.all_special_ids == tok.all_special_ids
        assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
        assert loaded(texts, add_special_tokens=False)["input_ids"] == tok(texts, add_special_tokens=False)["input_ids"]
        ids = tok(texts)["input_ids"]
        assert loaded.batch_decode(ids) == tok.batch_decode(ids)
        assert loaded.model_max_length == tok.model_max_length
