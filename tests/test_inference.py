"""Tests of hfcap.inference (`hfcap caption`) and attention_from_generate on a real tiny Show-Attend-Tell model."""

import numpy as np
import pytest
import torch
from conftest import tiny_processor, tiny_sat_model
from PIL import Image
from transformers import BertConfig

from hfcap.cli import main
from hfcap.generation import reference_beam_search
from hfcap.inference import caption_images
from hfcap.loading import load_captioner
from hfcap.models.show_attend_tell import ShowAttendTellForConditionalGeneration
from hfcap.visualize import attention_from_generate

CAPTION = "a red circle on the left"
P, LABEL = 224, 224 // 8


def _tiny_sat(seed=0):
    """A random 64 px SAT (frozen timm resnet10t, 4x4 grid, 16-d decoder) and its processor."""
    processor = tiny_processor([CAPTION, "two blue squares", "a green star above a circle"], image_size=64)
    model = tiny_sat_model(
        processor, seed=seed, backbone="resnet10t", visual_feature_dim=512, encoder_grid_size=4, attention_dim=16,
        embed_dim=16, d_model=16, dropout=0.0,
    )
    return model, processor


def _images(rng, count):
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SAT that has memorised CAPTION for every image, saved with its processor."""
    model, processor = _tiny_sat()
    batch = processor(images=_images(np.random.default_rng(0), 4), text_target=[CAPTION] * 4)
    with torch.no_grad():  # the backbone is frozen: encode once, then train the decoder on the features
        features = model.eval().encoder(pixel_values=batch["pixel_values"]).last_hidden_state
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(100):
        optimizer.zero_grad()
        model(visual_features=features, labels=batch["labels"]).loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("tiny_sat")
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, image in enumerate(_images(np.random.default_rng(1), 2)):
        paths.append(folder / f"img{index}.png")
        (image.convert("L") if index else image).save(paths[-1])  # the second one grayscale
    return paths


def _caption_cli(*argv):
    return main(["caption", *map(str, argv)])


def test_caption_images_and_load_captioner(model_dir, image_files):
    model, processor = load_captioner(model_dir)
    assert isinstance(model, ShowAttendTellForConditionalGeneration) and not model.training
    assert caption_images(model, processor, image_files, num_beams=1) == [CAPTION, CAPTION]
    assert caption_images(model, processor, image_files[0], num_beams=3, num_return_sequences=2)[0] == CAPTION


def test_cli_prints_captions_and_draws_the_attention_map(model_dir, image_files, tmp_path, capsys):
    out = tmp_path / "maps" / "attention.png"
    assert _caption_cli(image_files[0], "--model", model_dir, "--attention-map", out, "--num-beams", "1") == 0
    assert capsys.readouterr().out == f"{image_files[0]}\t{CAPTION}\n"
    with Image.open(out) as figure:
        # 6 words + the image = 7 panels: 5 columns, 2 rows of 224 px panels over 28 px label strips
        assert figure.format == "PNG" and figure.size == (5 * P, 2 * (P + LABEL))


@pytest.mark.parametrize("decoding", [["--num-beams", "3"], ["--num-beams", "3", "--reference-beam-search"]])
def test_cli_several_images_with_beam_search(model_dir, image_files, tmp_path, capsys, decoding):
    out = tmp_path / "map.png"
    argv = [*image_files, "--model", model_dir, "--attention-map", out, "--max-new-tokens", "8", *decoding]
    assert _caption_cli(*argv) == 0
    assert capsys.readouterr().out.splitlines() == [f"{path}\t{CAPTION}" for path in image_files]
    assert not out.exists()
    for index in range(2):
        with Image.open(tmp_path / f"map_{index}.png") as figure:
            assert figure.size == (5 * P, 2 * (P + LABEL))


def test_cli_errors(model_dir, image_files, tmp_path, capsys):
    """Every error is one line on stderr with the exit status of its kind (hfcap.cli.EXIT_CODES)."""
    missing = tmp_path / "missing.png"
    assert _caption_cli(image_files[0], missing, "--model", model_dir) == 2  # ImageLoadError: an invalid input
    assert f"image file not found: {missing}" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert _caption_cli(corrupt, "--model", model_dir) == 2
    assert str(corrupt) in capsys.readouterr().err
    bert = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(bert)
    assert _caption_cli(image_files[0], "--model", bert) == 2
    assert "holds a 'bert' model, not an hfcap model" in capsys.readouterr().err
    model_only = tmp_path / "model_only"
    load_captioner(model_dir)[0].save_pretrained(model_only)
    assert _caption_cli(image_files[0], "--model", model_only) == 2
    assert "has no loadable CaptioningProcessor" in capsys.readouterr().err
    assert _caption_cli(image_files[0], "--model", tmp_path / "nowhere") == 3
    error = capsys.readouterr().err
    assert error == f"hfcap caption: error: model directory not found: {tmp_path / 'nowhere'} (--debug shows the traceback)\n"


def _assert_teacher_forced_attention(model, pixel_values, token_ids, attentions):
    """``attentions`` (T, N) are the α a teacher-forced pass over ``token_ids`` computes for each of them."""
    assert len(token_ids) == attentions.shape[0] > 0 and attentions.shape[1] == 16
    decoder_input_ids = torch.tensor([[model.config.decoder_start_token_id] + token_ids[:-1]])
    with torch.no_grad():
        forced = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, output_attentions=True)
    torch.testing.assert_close(attentions, forced.cross_attentions[0][0, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_attention_from_generate_matches_teacher_forcing(num_beams):
    """Each generated token's α (following beam_indices for beams) is the teacher-forced α of the final caption."""
    model, processor = _tiny_sat(seed=3)
    model.eval()
    pixel_values = processor(images=_images(np.random.default_rng(2), 2))["pixel_values"]
    output = model.generate(
        pixel_values=pixel_values,
        num_beams=num_beams,
        min_new_tokens=6,  # no early eos from the random model: six tokens to check
        max_new_tokens=6,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    if num_beams > 1:  # the beams really are reordered, so following beam_indices matters
        assert (output.beam_indices != output.beam_indices[:, :1]).any()
    for index in range(2):
        token_ids, attentions = attention_from_generate(output, index, eos_token_id=model.config.eos_token_id)
        _assert_teacher_forced_attention(model, pixel_values[index : index + 1], token_ids, attentions)


def test_attention_from_generate_with_reference_beam_search(model_dir):
    model, processor = load_captioner(model_dir)
    pixel_values = processor(images=_images(np.random.default_rng(4), 1))["pixel_values"]
    output = model.generate(
        pixel_values=pixel_values,
        num_beams=3,
        custom_generate=reference_beam_search,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    token_ids, attentions = attention_from_generate(output, 0, eos_token_id=model.config.eos_token_id)
    assert processor.tokenizer.convert_ids_to_tokens(token_ids) == CAPTION.split()
    _assert_teacher_forced_attention(model, pixel_values, token_ids, attentions)
