"""Image loading (every PIL mode, arrays, bad files), image processor, CaptioningProcessor layouts and save/load."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, PreTrainedConfig
from transformers.image_utils import PILImageResampling

from hfcap.processing import (
    CaptioningProcessor,
    ImageLoadError,
    load_image,
    make_image_processor,
    tokenizer_from_vocabulary,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "man", "dog", "riding", "horse"]  # id = position
PAD, BOS, EOS, UNK, A, MAN, DOG, RIDING, HORSE = range(len(VOCAB))
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
WHITE, RED = (255, 255, 255), (255, 0, 0)


@pytest.fixture(scope="module")
def processor():
    tokenizer = tokenizer_from_vocabulary(VOCAB, **SPECIALS)
    return CaptioningProcessor(make_image_processor(8), tokenizer, max_caption_length=3)


def _palette_image(transparent_index=None):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def _new(mode, value, size=(2, 1)):
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    "image, expected",
    [
        (_new("RGB", (1, 2, 3)), (1, 2, 3)),
        (_new("L", 77), (77, 77, 77)),
        (_new("1", 1), WHITE),
        (_new("LA", (77, 255)), (77, 77, 77)),
        (_new("LA", (77, 0)), WHITE),
        (_new("LA", (77, 128)), (166, 166, 166)),  # 77 * 128/255 + 255 * 127/255
        (_new("RGBA", (255, 0, 0, 0)), WHITE),  # composited on white, not on black / not the hidden red
        (_new("RGBA", (255, 0, 0, 255)), RED),
        (_new("RGBA", (255, 0, 0, 128)), (255, 127, 127)),
        (_new("CMYK", (0, 255, 255, 0)), RED),
        (_new("I;16", 65535), WHITE),  # 16-bit scaled: 65535 -> 255
        (_new("I;16", 25700), (100, 100, 100)),  # 25700 / 257 = 100
        (_new("I;16", 1000), (4, 4, 4)),  # not clipped at 255 the way PIL's convert would
        (_new("I;16B", 65535), WHITE),
        (_new("I;16B", 25700), (100, 100, 100)),
        (_new("I", 25700), (100, 100, 100)),
        (_new("I", 70000), WHITE),
        (_new("I", -5), (0, 0, 0)),
        (_new("F", 0.5), (128, 128, 128)),  # [0, 1] float image
        (_new("F", 200.0), (200, 200, 200)),  # 0..255 float image (PIL convention)
        (np.full((2, 3), 9, np.uint8), (9, 9, 9)),
        (np.full((2, 3, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((2, 3, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((2, 3, 4), (255, 0, 0, 0), np.uint8), WHITE),
        (torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None].expand(3, 2, 5), (1, 2, 3)),
    ],
    ids=lambda x: getattr(x, "mode", None) or getattr(x, "shape", None) if not isinstance(x, tuple) else "",
)
def test_load_image_modes(image, expected):
    rgb = load_image(image)
    assert rgb.mode == "RGB"
    assert set(rgb.getdata()) == {expected}


def test_load_image_palette_with_and_without_transparency():
    assert list(load_image(_palette_image()).getdata()) == [RED, (0, 0, 255)]
    assert list(load_image(_palette_image(transparent_index=0)).getdata()) == [WHITE, (0, 0, 255)]


def test_load_image_files(tmp_path):
    _new("I;16", 65535).save(tmp_path / "deep.png")
    _new("RGBA", (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert set(load_image(tmp_path / "deep.png").getdata()) == {WHITE}
    assert set(load_image(str(tmp_path / "clear.png")).getdata()) == {WHITE}
    photo = load_image(FIXTURES / "real" / "photo_1.jpg")
    with Image.open(FIXTURES / "real" / "photo_1.jpg") as raw:
        assert photo.mode == "RGB" and photo.size == raw.size


def test_load_image_bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    jpeg = (FIXTURES / "real" / "photo_1.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    for name in ["missing.jpg", "notes.txt", "garbage.png", "truncated.jpg"]:
        with pytest.raises(ImageLoadError, match=name):
            load_image(tmp_path / name)
    assert issubclass(ImageLoadError, ValueError)
    with pytest.raises(ImageLoadError, match="dtype float32"):
        load_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ImageLoadError, match=r"shape \(2, 2, 2\)"):
        load_image(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="unsupported image type int"):
        load_image(3)


def test_image_processor_normalisation_and_shapes():
    pixels = np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    processor = make_image_processor(8)
    assert processor.do_convert_rgb and processor.resample == PILImageResampling.BILINEAR
    values = processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    expected = ((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-6)

    processor = make_image_processor((6, 10), resample="bicubic", image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert processor.resample == PILImageResampling.BICUBIC
    values = processor([Image.new("RGB", (20, 13), (0, 51, 255))] * 2, return_tensors="pt")["pixel_values"]
    assert values.shape == (2, 3, 6, 10)
    np.testing.assert_allclose(values[:, :, 0, 0].numpy(), [[-1.0, -0.6, 1.0]] * 2, atol=1e-6)
    with pytest.raises(ValueError, match="unknown resample 'cubic'"):
        make_image_processor(8, resample="cubic")


def test_processor_layouts(processor):
    red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    batch = processor(
        images=[red, np.zeros((8, 8), np.uint8)],
        text=["", "A man"],
        text_target=["a man riding", "Dog zebra!"],
    )
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    np.testing.assert_allclose(batch["pixel_values"][0, :, 0, 0].numpy(), (1 - MEAN) / STD, atol=1e-6)  # white
    np.testing.assert_allclose(batch["pixel_values"][1, :, 0, 0].numpy(), -MEAN / STD, atol=1e-6)  # black
    assert batch["input_ids"].tolist() == [[PAD, PAD, BOS], [BOS, A, MAN]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert batch["labels"].tolist() == [[A, MAN, RIDING, EOS], [DOG, UNK, EOS, -100]]  # unknown caption word -> unk
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long

    single = processor(images=red, text="", padding=True)  # the image-text-to-text pipeline's call
    assert single["input_ids"].tolist() == [[BOS]] and single["attention_mask"].tolist() == [[1]]
    assert set(single) == {"pixel_values", "input_ids", "attention_mask"}
    assert processor(text_target="a dog", return_tensors=None)["labels"] == [[A, DOG, EOS]]
    assert processor.model_input_names == ["pixel_values", "input_ids", "attention_mask"]


def test_processor_truncation_warning(processor):
    with pytest.warns(UserWarning, match="1 of 2 captions had more than max_caption_length=3 words"):
        labels = processor(text_target=["a man riding a horse", "a dog"])["labels"]
    assert labels.tolist() == [[A, MAN, RIDING, EOS], [A, DOG, EOS, -100]]


def test_processor_errors(processor):
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['zebra', 'Cat'\]"):
        processor(text="a zebra riding a Cat")
    with pytest.raises(ValueError, match="at least one of images, text or text_target"):
        processor()
    with pytest.raises(ValueError, match="batch sizes differ or are empty: {'images': 1, 'text': 2}"):
        processor(images=np.zeros((8, 8), np.uint8), text=["", ""])
    with pytest.raises(ValueError, match="batch sizes differ or are empty: {'text_target': 0}"):
        processor(text_target=[])
    with pytest.raises(ImageLoadError, match="nowhere.png"):
        processor(images=["nowhere.png"])


def test_decode_stops_at_eos(processor):
    generated = torch.tensor([[BOS, A, MAN, EOS, DOG, PAD], [BOS, DOG, UNK, HORSE, PAD, PAD]])
    assert processor.batch_decode(generated) == ["a man", "dog <unk> horse"]
    assert processor.batch_decode(generated, skip_special_tokens=False)[0] == "<bos> a man <eos> dog <pad>"
    assert processor.decode([A, DOG, EOS, -100, -100]) == "a dog"  # labels decode too
    assert processor.post_process_image_text_to_text(generated) == ["a man", "dog <unk> horse"]
    assert processor.post_process_image_text_to_text(generated[0]) == ["a man"]


class _DummyConfig(PreTrainedConfig):
    model_type = "hfcap_test_processor"


@pytest.fixture
def dummy_config():
    """A config class whose AutoProcessor is CaptioningProcessor (as `import hfcap` registers each model's)."""
    AutoConfig.register(_DummyConfig.model_type, _DummyConfig, exist_ok=True)
    AutoProcessor.register(_DummyConfig, CaptioningProcessor, exist_ok=True)
    return _DummyConfig


def test_save_load_with_autoprocessor(processor, dummy_config, tmp_path):
    processor.save_pretrained(tmp_path)
    dummy_config().save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CaptioningProcessor and loaded.max_caption_length == 3
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    kwargs = dict(images=[Image.new("L", (11, 7), 30)], text=["a man"], text_target=["a dog riding a horse"])
    with pytest.warns(UserWarning):
        expected = processor(**kwargs)
    with pytest.warns(UserWarning):
        got = loaded(**kwargs)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_directory_without_processor_files_names_them(processor, dummy_config, tmp_path):
    """A model directory saved without its processor: a FileNotFoundError naming the missing files and how to write
    them, not transformers' request for a preprocessor_config.json (which a CaptioningProcessor never writes)."""
    dummy_config().save_pretrained(tmp_path)
    message = f"from {re.escape(str(tmp_path))}: it has no processor_config.json, tokenizer.json, tokenizer_config.json"
    for load in (AutoProcessor.from_pretrained, CaptioningProcessor.from_pretrained):
        with pytest.raises(FileNotFoundError, match=rf"{message}\..*processor\.save_pretrained\(directory\)"):
            load(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()  # transformers would load a tokenizer without pad/bos/eos
    with pytest.raises(FileNotFoundError, match=r"it has no tokenizer_config\.json\."):
        AutoProcessor.from_pretrained(tmp_path)
