"""Tests of hfcap.visualize: the attention-map figure, the generate-output helper and the training-curve plot."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_processor, tiny_sat_model
from PIL import Image

from hfcap.cli import main
from hfcap.data import load_scenes
from hfcap.processing import ImageLoadError
from hfcap.training.curves import plot_training_curves
from hfcap.visualize import attention_from_generate, attention_map

P = 224
LABEL = P // 8


def _panel(figure, index, columns=5):
    """Pixels (H, W, 3) of panel ``index`` (without its label strip)."""
    left, top = (index % columns) * P, (index // columns) * (P + LABEL)
    return np.asarray(figure, dtype=np.float64)[top : top + P, left : left + P]


def _label(figure, index, columns=5):
    left, top = (index % columns) * P, (index // columns) * (P + LABEL) + P
    return np.asarray(figure.convert("L"), dtype=np.float64)[top : top + LABEL, left : left + P]


def _heat(pixels):
    """Jet heat: red minus blue (hot cells are red, cold ones blue)."""
    return float((pixels[..., 0] - pixels[..., 2]).mean())


def _gradient_image(width=80, height=60):
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 3, y * 4, 255 - x * 3], -1).astype(np.uint8))


def test_size_panels_and_words():
    words = ["a", "red", "square", "on", "the", "left"]
    attentions = torch.softmax(torch.randn(len(words), 49, generator=torch.Generator().manual_seed(0)), -1)
    figure = attention_map(_gradient_image(), words, attentions)
    assert figure.size == (5 * P, 2 * (P + LABEL))  # 7 panels: 5 columns, 2 rows
    assert figure.mode == "RGB"
    assert _label(figure, 0).min() == 255  # the image panel has no word
    labels = [_label(figure, index + 1) for index in range(len(words))]
    assert all(label.min() < 128 for label in labels)  # dark text in every word strip
    assert not np.array_equal(labels[1], labels[2])  # "red" and "square" are drawn differently
    assert np.asarray(figure)[P + LABEL + P + LABEL // 2, 3 * P].tolist() == [255, 255, 255]  # unused 8th cell empty
    panels = [_panel(figure, index) for index in range(len(words) + 1)]
    assert not np.allclose(panels[0], panels[1])  # overlay differs from the plain image
    assert not np.allclose(panels[1], panels[2])  # different α, different overlays


def test_layout_follows_max_columns_and_panel_size():
    figure = attention_map(_gradient_image(), ["x", "y"], np.full((2, 16), 1 / 16), max_columns=2, panel_size=64)
    assert figure.size == (2 * 64, 2 * (64 + 8))
    assert attention_map(_gradient_image(), [], np.zeros((0, 16))).size == (P, P + LABEL)


@pytest.mark.parametrize("smooth", [True, False])
def test_peaked_attention_lands_in_the_right_corner(smooth):
    """α peaked at the top-left cell (word 0) and the top-right one (word 1): hot where it should, not transposed."""
    grid = 7
    attentions = np.full((2, grid * grid), 1e-4)
    attentions[0, 0] = 1.0  # row 0, column 0
    attentions[1, grid - 1] = 1.0  # row 0, column 6 — lands bottom-left if rows and columns were swapped
    grey = Image.new("RGB", (90, 70), (128, 128, 128))
    figure = attention_map(grey, ["topleft", "topright"], attentions, smooth=smooth)
    cell = P // grid  # compare the corner cells' pixels
    top_left = _panel(figure, 1)
    assert _heat(top_left[:cell, :cell]) > _heat(top_left[-cell:, -cell:]) + 40
    top_right = _panel(figure, 2)
    assert _heat(top_right[:cell, -cell:]) > _heat(top_right[-cell:, :cell]) + 40
    assert _heat(top_right[:cell, -cell:]) > _heat(top_right[:cell, :cell]) + 40


def test_grid_inputs_are_equivalent():
    rng = np.random.default_rng(1)
    flat = rng.random((3, 6 * 4))
    image = _gradient_image()
    reference = np.asarray(attention_map(image, list("abc"), flat, grid_size=(6, 4)))
    assert np.array_equal(reference, np.asarray(attention_map(image, list("abc"), flat.reshape(3, 6, 4))))
    as_tensor = torch.from_numpy(flat).reshape(3, 6, 4)
    assert np.array_equal(reference, np.asarray(attention_map(image, list("abc"), as_tensor)))


def test_bad_inputs(tmp_path):
    image = _gradient_image()
    with pytest.raises(ImageLoadError, match="missing.png"):
        attention_map(tmp_path / "missing.png", ["a"], np.ones((1, 49)))
    with pytest.raises(ValueError, match="square grid from N=50"):
        attention_map(image, ["a"], np.ones((1, 50)))
    with pytest.raises(ValueError, match="3 steps but there are 2 caption tokens"):
        attention_map(image, ["a", "b"], np.ones((3, 49)))
    with pytest.raises(ValueError, match="does not match N=49"):
        attention_map(image, ["a"], np.ones((1, 49)), grid_size=8)


def test_attention_from_generate_follows_beams_and_stops_at_eos():
    """Two steps of a 2-image × 2-beam search: row r of step t has α peaked at position 10·t + r."""
    eos, pad, bos, positions = 2, 0, 1, 64

    def step(t, rows=4, heads=2):
        attention = torch.zeros(rows, heads, 1, positions)
        for row in range(rows):
            attention[row, :, 0, 10 * t + row] = 1.0
        return (attention, attention.clone())  # two layers

    output = SimpleNamespace(
        sequences=torch.tensor([[bos, 7, 8, eos], [bos, 9, eos, pad]]),
        beam_indices=torch.tensor([[1, 0, 0], [3, 2, -1]]),
        cross_attentions=(step(0), step(1), step(2)),
    )
    tokens, attentions = attention_from_generate(output, 0, eos_token_id=eos, pad_token_id=pad)
    assert tokens == [7, 8]
    assert attentions.shape == (2, positions)
    assert attentions.argmax(-1).tolist() == [0 * 10 + 1, 1 * 10 + 0]
    tokens, attentions = attention_from_generate(output, 1, eos_token_id=[eos], pad_token_id=pad)
    assert tokens == [9]
    assert attentions.argmax(-1).tolist() == [3]
    greedy = SimpleNamespace(sequences=output.sequences, cross_attentions=output.cross_attentions)
    assert attention_from_generate(greedy, 1, eos_token_id=eos)[1].argmax(-1).tolist() == [1]
    with pytest.raises(ValueError, match="output_attentions=True"):
        attention_from_generate(SimpleNamespace(sequences=output.sequences, cross_attentions=None), eos_token_id=eos)


def _curve_records():
    records = [{"step": step, "stage": "xe", "loss": 5.0 / (step + 1)} for step in range(0, 100, 10)]
    records += [{"step": step, "stage": "scst", "loss": -0.1, "reward": step / 200} for step in range(100, 200, 10)]
    records += [{"step": step, "stage": "xe", "val_CIDEr-D": step / 3} for step in (50, 100, 150)]
    return records


def test_plot_training_curves(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(record) for record in _curve_records()) + "\n")
    path = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (3 * 500, 400)  # loss, reward, val CIDEr-D
        png.verify()
    only_loss = [{key: value for key, value in record.items() if key != "reward"} for record in _curve_records()[:10]]
    with Image.open(plot_training_curves(only_loss, tmp_path / "loss.png")) as png:
        assert png.size == (500, 400)
    with pytest.raises(ValueError, match="no records"):
        plot_training_curves([{"step": 1, "lr": 0.1}], tmp_path / "none.png")


@pytest.mark.slow
def test_attention_map_of_a_sat_trained_briefly_on_scenes(tmp_path, capsys):
    """Train a tiny SAT on 64 px scenes for 100 steps, caption a test image with `hfcap caption`, check the map."""
    scenes = load_scenes(tmp_path / "cache", num_train=300, num_val=2, num_test=2, image_size=64, num_workers=1)
    train = scenes["train"]
    processor = tiny_processor([c for captions in train["captions"] for c in captions], image_size=64)
    model = tiny_sat_model(
        processor,
        backbone="test_resnet",  # timm's tiny test ResNet, dilated to stride 8: an 8x8 map at 64 px
        backbone_kwargs={"output_stride": 8},
        visual_feature_dim=96,
        encoder_grid_size=8,
        attention_dim=64,
        embed_dim=64,
        d_model=64,
        dropout=0.1,
    ).eval()
    with torch.no_grad():  # the backbone is frozen: encode every image once, train the decoder on the features
        features = model.encoder(pixel_values=processor(images=train["image"])["pixel_values"]).last_hidden_state
    pairs = [(row, caption) for row, captions in enumerate(train["captions"]) for caption in captions]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses, generator = [], torch.Generator().manual_seed(0)
    for _ in range(100):  # about 15 s on one CPU core
        batch = [pairs[i] for i in torch.randperm(len(pairs), generator=generator)[:32].tolist()]
        labels = processor(text_target=[caption for _, caption in batch])["labels"]
        optimizer.zero_grad()
        loss = model(visual_features=features[[row for row, _ in batch]], labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:3])  # it did learn

    model_dir, image_path, map_path = tmp_path / "sat", tmp_path / "scene.png", tmp_path / "attention.png"
    model.eval().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    scenes["test"][0]["image"].save(image_path)
    argv = [str(image_path), "--model", str(model_dir), "--num-beams", "3", "--max-new-tokens", "20"]
    assert main(["caption", *argv, "--attention-map", str(map_path)]) == 0
    path, caption = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(image_path)
    words = caption.split()
    assert 1 <= len(words) <= 20 and set(words) <= set(processor.tokenizer.get_vocab())
    columns = min(len(words) + 1, 5)
    with Image.open(map_path) as figure:
        assert figure.format == "PNG"
        assert figure.size == (columns * P, math.ceil((len(words) + 1) / columns) * (P + LABEL))
