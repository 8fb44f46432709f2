"""Shared test helpers: tiny random Show-Attend-Tell models and their processors (in memory or saved as a model
directory), small test images, and the tutorial-trained SAT of the reference fixtures. Plain functions; test modules
import them (`from conftest import tiny_sat`), and one fixture, `one_thread`.

`HF_HUB_OFFLINE=1` is set first, before anything imports huggingface_hub (which reads it once, at import): no test
reaches the Hub. Tests that run a fake Hub give their subprocess its own environment with `HF_HUB_OFFLINE=0`.
"""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hfcap.models.show_attend_tell import (  # noqa: E402
    ShowAttendTellConfig,
    ShowAttendTellForConditionalGeneration,
)
from hfcap.processing import (  # noqa: E402
    CaptioningProcessor,
    build_word_level_tokenizer,
    make_image_processor,
    tokenizer_from_vocabulary,
)

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): their
    matrices gain nothing from threads, and on a shared 2-core machine thread synchronisation dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAT_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference" / "sat"
"""The Show-Attend-Tell reference cases made with the tutorial's own code (`small`, `small-b`)."""

TRAIN_CAPTIONS = [
    ["a red circle on the left", "a red circle"],
    ["a blue square at the top", "one blue square"],
    ["two green triangles", "green triangles on the right"],
    ["a yellow star", "a small yellow star on the left"],
]
"""Reference captions of four images (the vocabulary of `tiny_sat`)."""


def tiny_processor(captions, image_size: int = 32, **processor_kwargs) -> CaptioningProcessor:
    """A CaptioningProcessor for `image_size` px images whose word-level vocabulary is every word of `captions`
    (a flat list of strings; `min_frequency=1`)."""
    tokenizer = build_word_level_tokenizer(captions, min_frequency=1)
    return CaptioningProcessor(make_image_processor(image_size), tokenizer, **processor_kwargs)


def tiny_sat_model(processor, *, seed: int = 0, **config) -> ShowAttendTellForConditionalGeneration:
    """A random Show-Attend-Tell (initialised after `torch.manual_seed(seed)`) that fits `processor`: vocabulary size,
    and special token ids come from it, every other setting from `config` (ShowAttendTellConfig fields)."""
    tokenizer = processor.tokenizer
    config = ShowAttendTellConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        **config,
    )
    torch.manual_seed(seed)
    return ShowAttendTellForConditionalGeneration(config)


def tiny_sat(use_backbone=True, seed=0, dropout=0.0):
    """`(model, processor)`: a random Show-Attend-Tell on timm's `test_resnet` (96 channels, 2x2 grid, 16-d
    attention/embedding/LSTM) for 32 px images, over the words of `TRAIN_CAPTIONS` (captions cut at 12 words)."""
    processor = tiny_processor([c for caps in TRAIN_CAPTIONS for c in caps], image_size=32, max_caption_length=12)
    model = tiny_sat_model(
        processor, seed=seed, backbone="test_resnet", use_backbone=use_backbone, visual_feature_dim=96, encoder_grid_size=2,
        attention_dim=16, embed_dim=16, d_model=16, dropout=dropout,
    )
    return model, processor


CAPTIONER_VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "man", "dog", "riding", "horse", "on", "the", "beach"]
"""The words of `save_tiny_captioner`'s model; a token's id is its position."""


def save_tiny_captioner(directory, *, seed: int = 0, constant_token: int | None = None) -> Path:
    """Save a tiny random Show-Attend-Tell (timm resnet10t at 64 px, 8-d attention/embedding/LSTM, the words of
    `CAPTIONER_VOCAB`) and its CaptioningProcessor to `directory`; generation defaults are the model's own (5 beams,
    51 new tokens).

    With `constant_token`, the output layer ignores the decoder state and always ranks that token first, so every
    decoding strategy emits it at every step (or ends at once if it is eos).
    """
    tokenizer = tokenizer_from_vocabulary(
        CAPTIONER_VOCAB, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    processor = CaptioningProcessor(make_image_processor(64), tokenizer)
    model = tiny_sat_model(
        processor, seed=seed, backbone="resnet10t", visual_feature_dim=512, attention_dim=8, embed_dim=8, d_model=8,
        encoder_grid_size=2,
    ).eval()
    with torch.no_grad():
        if constant_token is None:  # larger weights than the init, so that the captions depend on the image
            model.decoder.init_h.weight.normal_(std=0.2)
            model.decoder.init_c.weight.normal_(std=0.2)
            model.decoder.fc.weight.normal_(std=3.0)
            model.decoder.fc.bias.normal_()
        else:
            model.decoder.fc.weight.zero_()
            one_hot = torch.nn.functional.one_hot(torch.tensor(constant_token), len(CAPTIONER_VOCAB))
            model.decoder.fc.bias.copy_(one_hot * 10.0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return Path(directory)


def save_images(directory) -> list[Path]:
    """Three small PNGs of different content and modes (RGB, grayscale, RGBA)."""
    rng = np.random.default_rng(0)
    paths = [Path(directory, f"image{i}.png") for i in range(3)]
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(paths[1])
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA").save(paths[2])
    return paths


def tutorial_sat_model(case: str) -> ShowAttendTellForConditionalGeneration:
    """The features-only Show-Attend-Tell of reference case `case` ("small", "small-b"), in eval mode: sizes from the
    case's `DecoderWithAttention` constructor, special ids from its word map, and the tutorial-trained decoder weights
    (`decoder_state_dict.pth`, loaded strictly under the same parameter names)."""
    case_dir = SAT_FIXTURES / case
    spec = json.loads((case_dir / "case.json").read_text())
    dims = spec["constructor"]["DecoderWithAttention"]
    specials = spec["word_map"]["specials"]
    config = ShowAttendTellConfig(
        **{key: dims[key] for key in ("vocab_size", "attention_dim", "embed_dim")},
        visual_feature_dim=dims["encoder_dim"],
        d_model=dims["decoder_dim"],
        dropout=dims["dropout"],
        use_backbone=False,
        pad_token_id=specials["<pad>"],
        bos_token_id=specials["<start>"],
        eos_token_id=specials["<end>"],
        decoder_start_token_id=specials["<start>"],
    )
    model = ShowAttendTellForConditionalGeneration(config).eval()
    model.decoder.load_state_dict(torch.load(case_dir / "decoder_state_dict.pth", weights_only=True), strict=True)
    return model
