"""Word-level caption tokenizer on 🤗 `tokenizers` (WordLevel model), wrapped as a `PreTrainedTokenizerFast`.

Text is normalised the Karpathy/COCO way: Unicode NFD, accents stripped, lowercased; then split on whitespace and at
every punctuation character, the punctuation itself being dropped ("A man's T-shirt." -> a man s t shirt, the split
ExpansionNet v2 also makes). Authors' vocabulary entries that contain punctuation (M2's "'s", ExpansionNet's '"')
keep their ids and decode normally, but `encode` never produces them.

`tokenizer(text)` follows the 🤗 convention and adds `bos ... eos` (a `TemplateProcessing` post-processor);
`CaptioningProcessor` encodes with `add_special_tokens=False` and builds its own layouts.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in built tokenizers


def _new_tokenizer(model: models.WordLevel) -> Tokenizer:
    """A `tokenizers.Tokenizer` with the caption normalisation and word split."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="removed")]
    )
    return tok


def _wrap(tok: Tokenizer, pad_token: str, bos_token: str, eos_token: str, unk_token: str, model_max_length):
    """Add the `bos ... eos` template to `tok` and return it as a transformers tokenizer with its special tokens."""
    bos_id, eos_id = tok.token_to_id(bos_token), tok.token_to_id(eos_token)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A {eos_token}", special_tokens=[(bos_token, bos_id), (eos_token, eos_id)]
    )
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad_token,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        clean_up_tokenization_spaces=False,  # decode = words joined by single spaces, nothing merged
        split_special_tokens=True,  # input is plain text: "a mouse PAD" must not encode ExpansionNet's PAD
        **kwargs,
    )


def build_word_level_tokenizer(
    captions: Iterable[str], min_frequency: int = 5, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Build a vocabulary from training captions.

    Specials get `<pad>`=0 `<bos>`=1 `<eos>`=2 `<unk>`=3; then every word seen at least `min_frequency` times, most
    frequent first (ties alphabetical). Rarer words encode to `<unk>`.
    """
    tok = _new_tokenizer(models.WordLevel(unk_token="<unk>"))
    trainer = trainers.WordLevelTrainer(
        min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(captions, trainer)
    return _wrap(tok, *SPECIAL_TOKENS, model_max_length)


def tokenizer_from_vocabulary(
    tokens: list[str],
    *,
    pad_token: str,
    bos_token: str,
    eos_token: str,
    unk_token: str,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Tokenizer with a fixed vocabulary: `tokens[i]` gets id `i` (authors' ids kept exactly).

    The four special tokens must be entries of `tokens`, e.g. SAT `<pad>`=0 ... `<unk>`,`<start>`,`<end>` last;
    M2 `<unk>`=0 `<pad>`=1 `<bos>`=2 `<eos>`=3; ExpansionNet v2 `EOS`=77 `PAD`=78 `SOS`=79 `UNK`=80.
    """
    vocab = {}
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise ValueError(f"vocabulary entry {i} must be a non-empty string, got {token!r}")
        if token in vocab:
            raise ValueError(f"duplicate vocabulary token {token!r} at ids {vocab[token]} and {i}")
        vocab[token] = i
    specials = {"pad_token": pad_token, "bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token}
    missing = [f"{name}={token!r}" for name, token in specials.items() if token not in vocab]
    if missing:
        raise ValueError(f"special tokens not in the vocabulary: {', '.join(missing)}")
    tok = _new_tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    return _wrap(tok, pad_token, bos_token, eos_token, unk_token, model_max_length)
